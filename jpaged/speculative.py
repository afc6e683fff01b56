"""N-gram speculative decoding (prompt lookup), greedy requests only.

Each decode step, a greedy sequence whose last n tokens (n = prompt_lookup_max down to
prompt_lookup_min) occurred earlier in its prompt or output proposes the k tokens that
followed that earlier occurrence (the most recent one), read on as a repeat where they run
into the sequence's end (a seq looping with period 2 drafts k tokens, not 1). The step
computes the last token and the k drafts together, as a short chunk, and takes the argmax
after each of them; the drafts are kept up to the first that differs from the argmax before
it, and that argmax follows them. So a step yields 1 to k + 1 tokens, and each is the token
plain greedy decoding gives: every row of a step is computed as it would be alone (the
kernels work row by row, and a query sees exactly its causal context), so outputs are
bit-identical with speculation on or off. The rejected drafts' K/V slots are given back or
overwritten later.

A step reads the weights and every context's K/V once for up to k + 1 tokens a sequence,
but each row still costs its matmul flops: it pays where decode is bound by memory or by the
per-step cost (bf16 on this project's CPU), less where the matmuls are bound by compute (f32
here), since the cpu linears compute every real row. See README (Benchmarks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import ScheduledSeq, Scheduler
from jpaged.sequence import Sequence as Seq

MAX_SPECULATIVE_TOKENS = 15  # a verify chunk is at most 16 tokens


@dataclasses.dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` for method "ngram"."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # vLLM's dynamic speculation: inclusive batch-size ranges (start, end, k), the first
    # starting at 1; a batch size in a gap or past the last range takes the k before it.
    num_speculative_tokens_per_batch_size: tuple[tuple[int, int, int], ...] | None = None

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """From None, a SpeculativeConfig, or a dict like vLLM's; ValueError naming the key."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or None, got {value!r}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "num_speculative_tokens_per_batch_size"}  # fmt: skip
        if unknown := sorted(set(value) - known):
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        if value.get("method", "ngram") != "ngram":
            raise ValueError(
                f"speculative_config.method must be 'ngram', got {value.get('method')!r}"
            )

        def get_int(key: str, default: int | None, low: int, high: int) -> int:
            v = value.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ValueError(
                    f"speculative_config.{key} must be an int in {low}..{high}, got {v!r}"
                )
            return v

        k = get_int("num_speculative_tokens", None, 1, MAX_SPECULATIVE_TOKENS)
        hi = get_int("prompt_lookup_max", 4, 1, 64)
        lo = get_int("prompt_lookup_min", 1, 1, hi)
        schedule = _batch_size_schedule(value.get("num_speculative_tokens_per_batch_size"))
        return cls(k, hi, lo, schedule)

    def tokens_for_batch(self, batch_size: int) -> int:
        """Drafts a seq may take in a step of batch_size seqs (at most num_speculative_tokens)."""
        k = self.num_speculative_tokens
        for start, _end, ki in self.num_speculative_tokens_per_batch_size or ():
            if start > batch_size:
                break
            k = min(ki, self.num_speculative_tokens)
        return k


def _batch_size_schedule(value: Any) -> tuple[tuple[int, int, int], ...] | None:
    """num_speculative_tokens_per_batch_size, checked as vLLM checks it, sorted by start."""
    if value is None:
        return None
    key = "speculative_config.num_speculative_tokens_per_batch_size"
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key} must be a non-empty list of [start, end, k], got {value!r}")
    entries = []
    for entry in value:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 3
        if not ok or any(isinstance(v, bool) or not isinstance(v, int) for v in entry):
            raise ValueError(f"{key}: each entry must be [start, end, k] ints, got {entry!r}")
        start, end, k = entry
        if not 1 <= start <= end or k < 0:
            raise ValueError(f"{key}: need 1 <= start <= end and k >= 0, got {entry!r}")
        entries.append((start, end, k))
    entries.sort()
    if entries[0][0] != 1:
        raise ValueError(f"{key}: the first range must start at 1, got {entries[0]!r}")
    for (_, prev_end, _), (start, _, _) in zip(entries, entries[1:], strict=False):
        if start <= prev_end:
            raise ValueError(f"{key}: ranges overlap at batch size {start}")
    return tuple(entries)


def speculates(params: SamplingParams) -> bool:
    """Whether a request's samples may take drafts: greedy, n = 1, no penalties, no logprobs."""
    return (
        params.is_greedy
        and params.n == 1
        and params.logprobs is None
        and not params.presence_penalty
        and not params.frequency_penalty
        and params.repetition_penalty == 1.0
    )


class _NgramIndex:
    """For n = 1..max_n, the end position of the latest occurrence of each n-gram of a
    token list, over occurrences ending at or before `upto` (grown as the list grows)."""

    __slots__ = ("ends", "upto")

    def __init__(self, max_n: int) -> None:
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        self.upto = 0

    def extend(self, tokens: Sequence[int], upto: int) -> None:
        for end in range(self.upto + 1, upto + 1):
            for n in range(1, min(len(self.ends) - 1, end) + 1):
                self.ends[n][tuple(tokens[end - n : end])] = end
        self.upto = max(self.upto, upto)


class NgramProposer:
    """Drafts for each sequence from its own tokens (see the module doc)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._index: dict[int, _NgramIndex] = {}

    def propose(self, seq_id: int, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to min(k, limit) tokens that followed the latest earlier occurrence of the
        longest matching suffix of `tokens`; [] when none matches."""
        c = self.config
        limit = min(limit, c.num_speculative_tokens)
        length = len(tokens)
        if limit <= 0 or length < 2:
            return []
        index = self._index.get(seq_id)
        if index is None:
            index = self._index[seq_id] = _NgramIndex(c.prompt_lookup_max)
        index.extend(tokens, length - 1)  # occurrences ending before the suffix's end
        for n in range(min(c.prompt_lookup_max, length - 1), c.prompt_lookup_min - 1, -1):
            end = index.ends[n].get(tuple(tokens[length - n :]))
            if end is not None:
                return continuation(tokens, end, limit)
        return []

    def retain(self, seq_ids: Iterable[int]) -> None:
        """Forget every sequence not in seq_ids (finished or aborted ones)."""
        keep = set(seq_ids)
        for seq_id in [s for s in self._index if s not in keep]:
            del self._index[seq_id]


def continuation(tokens: Sequence[int], end: int, limit: int) -> list[int]:
    """The `limit` tokens predicted to follow `tokens` when its suffix recurs at `end`: the
    tokens after `end`, and past the list's end the drafts themselves again (the stretch from
    end on repeats with period len - end), so a seq in a short loop still drafts `limit`."""
    drafts = list(tokens[end : end + limit])
    period = len(tokens) - end
    while len(drafts) < limit:
        drafts.append(drafts[len(drafts) - period])
    return drafts


def num_accepted(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """How many leading drafts equal the argmax before them: sampled[j] follows the chunk's
    token j (the last token, then the drafts), so draft j is kept iff sampled[j] == drafts[j]."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


def propose_drafts(
    proposer: NgramProposer, scheduler: Scheduler, limit_of: Callable[[Seq], int]
) -> None:
    """Set every running seq's draft_token_ids for the next step (at most limit_of(seq), and
    the schedule's k for len(running) seqs, see SpeculativeConfig.tokens_for_batch),
    [] unless that step only decodes: a prefill chunk beside drafts would need step shapes
    outside the warm-up set, so with any waiting or mid-prefill seq nobody drafts."""
    running = scheduler.running
    proposer.retain(s.seq_id for s in running)
    decode_only = not scheduler.waiting and all(
        s.num_computed_tokens == s.num_tokens - 1 for s in running
    )
    k = proposer.config.tokens_for_batch(len(running)) if decode_only else 0
    for seq in running:
        limit = min(limit_of(seq), k) if k else 0
        seq.draft_token_ids = (
            proposer.propose(seq.seq_id, seq.token_ids, limit) if limit > 0 else []
        )


@dataclasses.dataclass(slots=True)
class StepTokens:
    """What one step yields, from its sampled rows (a row per sample, and one per draft)."""

    sampled: dict[int, int]  # seq id -> the token sampled after its last kept token
    accepted: dict[int, list[int]]  # seq id -> the drafts kept (seqs that had drafts)
    emitted: list[tuple[int, int]]  # (row, seq id) of every token yielded, in order
    num_drafts: int = 0
    num_kept: int = 0


def step_tokens(scheduled: Sequence[ScheduledSeq], token_ids: Sequence[int]) -> StepTokens:
    """Split a step's sampled ids (rows laid out as LLMEngine.step builds them: for each
    scheduled seq and each of its sample seqs, num_draft + 1 rows) into StepTokens."""
    out = StepTokens({}, {}, [])
    r = 0
    for s in scheduled:
        for sid in s.sample_seq_ids:
            got = list(token_ids[r : r + s.num_draft + 1])
            a = 0
            if s.num_draft:
                a = num_accepted(s.token_ids[len(s.token_ids) - s.num_draft :], got)
                out.accepted[sid] = got[:a]
                out.num_drafts += s.num_draft
                out.num_kept += a
            out.sampled[sid] = got[a]
            out.emitted += [(r + j, sid) for j in range(a + 1)]
            r += s.num_draft + 1
    return out
