"""Beam search inside the engine: beams are sequences that fork and free blocks as they branch.

The rules are transformers' `generate(num_beams=w, do_sample=False)` (its vectorised beam
search, 4.50+), so the same model gives the same beams in the same order:
- each step every running beam offers its top K = (1 + number of EOS ids, at least 2) * w
  continuations, scored by cumulative logprob (raw log_softmax, no processors); the best K
  over all beams are kept;
- of those, the ones ending in EOS (unless ignore_eos) or reaching max_tokens are finished
  when among the best w; their score is cumulative logprob / generated_length ** length_penalty
  (generated tokens, EOS included, prompt excluded); the best w finished hypotheses are kept;
- the best w that do not finish are the next running beams (there are always w of them);
- the search stops at max_tokens, or when no running beam can beat the worst of w finished
  hypotheses (early_stopping=False: the best running beam's score at the current length;
  "never": at max_tokens when length_penalty > 0; True: as soon as w hypotheses finished).

The first step has one beam (the prompt), as transformers' -1e9 scores on beams 1..w-1 make
it. The prompt's sequence carries n = w, so the scheduler forks it into w sequences sharing
the prompt's blocks when the prompt completes; later steps pair new beams with their parent's
sequence, fork a parent with several children (copy-on-write of the partial last block) and
finish a parent with none at once, freeing its blocks. Candidates come from the runner's top
logprobs (NUM_TOP_LOGPROBS = 20), so w <= 10 with one EOS id; the device step is unchanged.
A beam preempted by recompute would fall out of step with its siblings, so the whole request
restarts from its prompt (deterministic: the result is the same).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

from jpaged.model_runner import NUM_TOP_LOGPROBS
from jpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.sampling_tensors import SamplingRow
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence as Seq
from jpaged.sequence import next_seq_id
from jpaged.tokenizer import Tokenizer


@dataclasses.dataclass(slots=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams` (deterministic: no temperature) plus transformers'
    `early_stopping` (False, True or "never"). ValueError names the bad field."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        lp = self.length_penalty
        if not isinstance(lp, int | float) or isinstance(lp, bool) or lp != lp or abs(lp) > 1e6:
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        self.length_penalty = float(lp)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(
                f"early_stopping must be False, True or 'never', got {self.early_stopping!r}"
            )


@dataclasses.dataclass(slots=True)
class BeamSearchSequence:
    """One returned beam. score = cumulative_logprob / len(token_ids) ** length_penalty."""

    token_ids: list[int]  # generated tokens (the EOS included when it ended the beam)
    text: str
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclasses.dataclass(slots=True)
class BeamSearchOutput:
    """The beams of one prompt, best score first (beam_width of them)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]


def beam_score(cumulative_logprob: float, num_tokens: int, length_penalty: float) -> float:
    """transformers' finished-hypothesis score: sum of logprobs / generated_len ** penalty."""
    return cumulative_logprob / (num_tokens**length_penalty)


def max_beam_width(num_eos_ids: int) -> int:
    """Widest beam the runner's top logprobs can serve: K = max(2, 1 + eos) * w <= 20."""
    return NUM_TOP_LOGPROBS // max(2, 1 + num_eos_ids)


@dataclasses.dataclass(slots=True)
class _Beam:
    seq_id: int
    cumulative_logprob: float


@dataclasses.dataclass(slots=True)
class _Hypothesis:
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str


@dataclasses.dataclass(slots=True)
class _Candidate:
    cumulative_logprob: float
    source: int  # index of the beam it extends
    token_id: int


@dataclasses.dataclass(slots=True)
class BeamRequest:
    """One beam-search request's state between steps."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: BeamSearchParams
    max_tokens: int  # resolved: params.max_tokens or what fits max_model_len
    row_params: SamplingParams  # greedy, asking for the top K logprobs
    metrics: RequestMetrics
    prompt_seq_id: int = -1
    running: list[_Beam] = dataclasses.field(default_factory=list)  # best first
    finished: list[_Hypothesis] = dataclasses.field(default_factory=list)  # best first, <= w
    num_generated: int = 0
    improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    restart: bool = False  # a beam was preempted: rerun from the prompt after this step

    @property
    def num_candidates(self) -> int:
        return self.row_params.logprobs or 0


class BeamSearcher:
    """The engine's beam-search requests; the engine calls it around each step."""

    def __init__(
        self, scheduler: Scheduler, tokenizer: Tokenizer, eos_token_ids: Iterable[int]
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, BeamRequest] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def __len__(self) -> int:
        return len(self.requests)

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: BeamSearchParams,
        max_model_len: int,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. ValueError when beam_width is too wide or it can never fit."""
        widest = max_beam_width(len(self.eos_token_ids))
        if params.beam_width > widest:
            raise ValueError(f"beam_width must be <= {widest}, got {params.beam_width}")
        room = max_model_len - len(prompt_token_ids)
        if room < 1:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens but max_model_len is {max_model_len}"
            )
        max_tokens = min(params.max_tokens, room)
        bm = self.scheduler.block_manager
        shared = len(prompt_token_ids) // bm.block_size  # full prompt blocks, never copied
        worst = shared + params.beam_width * (
            bm.blocks_for(len(prompt_token_ids) + max_tokens - 1) - shared
        )
        if worst > bm.num_usable_blocks:  # else a lone request could preempt itself forever
            raise ValueError(
                f"beam_width {params.beam_width} with max_tokens {max_tokens} needs up to "
                f"{worst} blocks but the KV pool has {bm.num_usable_blocks}"
            )
        k = max(2, 1 + len(self.eos_token_ids)) * params.beam_width
        req = BeamRequest(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            max_tokens=max_tokens,
            row_params=SamplingParams(
                temperature=0.0, max_tokens=max_tokens, logprobs=k, ignore_eos=True
            ),
            metrics=RequestMetrics(arrival_time=arrival_time or time.time()),
        )
        self._queue_prompt(req)
        self.requests[request_id] = req

    def _queue_prompt(self, req: BeamRequest) -> None:
        seq = Seq(
            seq_id=next_seq_id(),
            request_id=req.request_id,
            token_ids=req.prompt_token_ids,
            num_prompt_tokens=len(req.prompt_token_ids),
            n=req.params.beam_width,
            max_tokens=req.max_tokens,
        )
        self.scheduler.add_seq(seq)  # ValueError when the pool can never hold it
        req.prompt_seq_id = seq.seq_id

    def sampling_row(self, seq: Seq) -> SamplingRow | None:
        """The row for a beam's next token, or None when seq is not a beam."""
        req = self.requests.get(seq.request_id)
        if req is None:
            return None
        return SamplingRow(req.row_params, 0, seq.num_output_tokens, (), ())

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False when it is not a beam request."""
        if self.requests.pop(request_id, None) is None:
            return False
        self.scheduler.abort_request(request_id)
        return True

    def note_preempted(self, seq_ids: Sequence[int]) -> None:
        """After schedule(): a request that lost a beam's K/V restarts after the step."""
        for seq_id in seq_ids:
            req = self.requests.get(self.scheduler.get_seq(seq_id).request_id)
            if req is not None and req.num_generated:
                req.restart = True

    def process(
        self, rows: Sequence[tuple[int, int]], result: Any
    ) -> tuple[list[RequestOutput], int]:
        """After postprocess(): advance every beam request from its rows' top logprobs.

        rows: (row index in `result`, seq id) for beam seqs. Returns the outputs of the
        requests that finished and the number of beam tokens scored.
        """
        by_request: dict[str, dict[int, int]] = {}
        for r, seq_id in rows:
            by_request.setdefault(self.scheduler.get_seq(seq_id).request_id, {})[seq_id] = r
        finished = []
        for req in list(self.requests.values()):
            if req.restart:
                self._restart(req)
            elif req.request_id in by_request:
                if self._advance(req, by_request[req.request_id], result):
                    finished.append(self._finish(req))
        return finished, len(rows)

    def _restart(self, req: BeamRequest) -> None:
        self.scheduler.abort_request(req.request_id)
        req.running.clear()
        req.finished.clear()
        req.num_generated, req.improvable, req.restart = 0, True, False
        self._queue_prompt(req)

    def _advance(self, req: BeamRequest, row_of: dict[int, int], result: Any) -> bool:
        """One beam step; returns True when the search is over."""
        w, k, p = req.params.beam_width, req.num_candidates, req.params
        if req.num_generated == 0:  # the prompt: one beam, held by w identical seqs
            sources = [(0.0, row_of[req.prompt_seq_id], list(row_of))]
            req.metrics.first_token_time = req.metrics.first_token_time or time.time()
        else:
            sources = [(b.cumulative_logprob, row_of[b.seq_id], [b.seq_id]) for b in req.running]
        candidates = []
        for i, (cum, r, _) in enumerate(sources):
            ids, lps = result.top_token_ids[r][:k], result.top_logprobs[r][:k]
            candidates += [
                _Candidate(cum + float(lp), i, int(t)) for t, lp in zip(ids, lps, strict=True)
            ]
        candidates.sort(key=lambda c: -c.cumulative_logprob)  # stable: beam, then rank order
        del candidates[k:]
        req.num_generated += 1
        g = req.num_generated
        at_limit = g >= req.max_tokens
        running: list[_Candidate] = []
        for rank, c in enumerate(candidates):
            eos = not p.ignore_eos and c.token_id in self.eos_token_ids
            if not (eos or at_limit):
                if len(running) < w:
                    running.append(c)
                continue
            full = len(req.finished) == w
            if rank < w and req.improvable and not (p.early_stopping is True and full):
                seq = self.scheduler.get_seq(sources[c.source][2][0])
                tokens = seq.output_token_ids[:-1] + [c.token_id]  # [-1]: postprocess's argmax
                self._add_finished(req, tokens, c.cumulative_logprob, "stop" if eos else "length")
        if not running:  # max_tokens reached (or every candidate ended)
            return True
        best = running[0].cumulative_logprob
        length = req.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else g
        if len(req.finished) == w:
            req.improvable &= beam_score(best, length, p.length_penalty) > req.finished[-1].score
        if not req.improvable or (p.early_stopping is True and len(req.finished) == w):
            return True
        self._branch(req, sources, running)
        return False

    def _add_finished(self, req: BeamRequest, tokens: list[int], cum: float, reason: str) -> None:
        score = beam_score(cum, len(tokens), req.params.length_penalty)
        hyps = req.finished
        hyps.append(_Hypothesis(tokens, cum, score, reason))
        hyps.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del hyps[req.params.beam_width :]

    def _branch(
        self, req: BeamRequest, sources: list[tuple[float, int, list[int]]], new: list[_Candidate]
    ) -> None:
        """Re-point the seqs at the new beams: reuse, fork (sharing blocks) or free at once."""
        sched = self.scheduler
        forks: list[tuple[int, int]] = []  # (new beam index, seq to fork)
        spare: list[int] = []
        children: list[list[int]] = [[] for _ in sources]
        for j, c in enumerate(new):
            children[c.source].append(j)
        seq_of = [-1] * len(new)  # the seq each new beam lives in
        for i, (_, _, seq_ids) in enumerate(sources):
            kids = children[i]
            for n, j in enumerate(kids):
                if n < len(seq_ids):
                    seq_of[j] = seq_ids[n]
                    sched.replace_last_token(seq_ids[n], new[j].token_id)
                else:
                    forks.append((j, seq_ids[0]))
            spare += seq_ids[len(kids) :]
        for seq_id in spare:  # fallen out: blocks back now, before any fork needs one
            sched.finish_seq(seq_id)
        for j, parent in forks:
            seq_of[j] = sched.fork_seq(parent, new[j].token_id).seq_id
        req.running = [
            _Beam(seq_id, c.cumulative_logprob) for seq_id, c in zip(seq_of, new, strict=True)
        ]

    def _finish(self, req: BeamRequest) -> RequestOutput:
        del self.requests[req.request_id]
        self.scheduler.abort_request(req.request_id)  # the running beams: blocks freed now
        now = time.time()
        req.metrics.finished_time = req.metrics.last_token_time = now
        outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(h.token_ids),
                token_ids=h.token_ids,
                cumulative_logprob=h.cumulative_logprob,
                logprobs=None,
                finish_reason=h.finish_reason,
            )
            for i, h in enumerate(req.finished)
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=None,
            outputs=outputs,
            finished=True,
            metrics=req.metrics,
        )


def to_beam_output(out: RequestOutput, length_penalty: float) -> BeamSearchOutput:
    """A finished beam request's RequestOutput as vLLM's BeamSearchOutput."""
    return BeamSearchOutput(
        request_id=out.request_id,
        prompt=out.prompt,
        prompt_token_ids=out.prompt_token_ids,
        sequences=[
            BeamSearchSequence(
                token_ids=o.token_ids,
                text=o.text,
                cumulative_logprob=o.cumulative_logprob or 0.0,
                score=beam_score(o.cumulative_logprob or 0.0, len(o.token_ids), length_penalty),
                finish_reason=o.finish_reason or "length",
            )
            for o in out.outputs
        ],
    )
