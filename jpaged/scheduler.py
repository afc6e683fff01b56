"""Continuous-batching scheduler: picks each step's tokens under a token budget (vLLM v1 style).

There is no prefill or decode phase: every sequence's num_computed_tokens catches up with
its num_tokens, a chunk per step. Each step serves running sequences oldest first (one
token for a decode, a chunk for an unfinished prefill), then admits waiting ones FCFS.
When blocks run out the newest running sequence is preempted by recompute. A prefill chunk
is cut short only when the budget is used up, and running sequences are served oldest
first, so every decode is older than any unfinished prefill and is never starved by it
(max_num_seqs is capped at max_num_batched_tokens).

Contract with the engine: take parents' seq ids from jpaged.sequence.next_seq_id() (forks
take theirs there too) and set Sequence.max_tokens so admission can check the pool. A
decoding seq's draft_token_ids (speculative tokens) join its one-token chunk when blocks
and budget allow; the engine samples after each and passes the drafts it keeps. Per
step: schedule() -> run the model (block copies first) -> postprocess(out, sampled) ->
stop checks -> finish_seq() for every finished sequence, including any that reached
max_model_len tokens (schedule() raises rather than let a sequence grow past it).
"""

import itertools
from collections import deque
from dataclasses import dataclass

from jpaged.block_manager import BlockManager
from jpaged.sequence import Sequence, SequenceStatus, next_seq_id


@dataclass(slots=True)
class ScheduledSeq:
    seq_id: int
    token_ids: list[int]  # [num_new] tokens whose K/V are computed this step
    start_position: int  # num_computed_tokens before the step; token i is at start_position + i
    block_table: list[int]  # the seq's blocks (a copy), covering start_position + num_new tokens
    # Seqs given a token sampled from this seq's last logits: [] for a prefill chunk short of
    # the end of token_ids, [seq_id] normally, [parent, child1, ...] when a parent with n > 1
    # completes its prompt this step.
    sample_seq_ids: list[int]
    num_draft: int = 0  # trailing speculative tokens in token_ids (their argmaxes verify them)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # decodes (one token reaching the end) first, then prefill chunks
    block_copies: list[tuple[int, int]]  # (src, dst) whole-block copies to do before the forward
    num_batched_tokens: int  # sum of len(token_ids) over scheduled; <= max_num_batched_tokens
    preempted_seq_ids: list[int]  # sent back to waiting this step (their K/V is dropped)


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int  # tokens found there (cumulative)
    blocks_in_use: int  # blocks with readers now
    peak_blocks_in_use: int  # since start
    num_cached_blocks: int  # free blocks still holding a prefix hash (reusable until evicted)


def _age(seq: Sequence) -> tuple[int, int]:
    return (seq.arrival, seq.sample_index)  # forks share the parent's (unique) arrival


class Scheduler:
    """Sequences in, SchedulerOutput out. Plain Python: never touches device arrays."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        # Capped by the budget so that every running decode fits one step (none is starved).
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()  # FCFS; preempted seqs go back to the head
        self.running: list[Sequence] = []  # sorted by _age at the start of each schedule()
        self._seqs: dict[int, Sequence] = {}  # every unfinished seq
        self._request_seqs: dict[str, list[int]] = {}  # request id -> its unfinished seq ids
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # -- requests in and out ---------------------------------------------------------------
    def add_seq(self, seq: Sequence) -> None:
        """Queue a new seq (its n samples fork when its prompt completes); sets seq.arrival.

        Raises ValueError if it can never run: prompt >= max_model_len, n > max_num_seqs,
        or its longest possible length needs more blocks than the pool has.
        """
        p = seq.num_prompt_tokens
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq_id {seq.seq_id} is already in use")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(
                f"seq {seq.seq_id} is not new: status, num_computed_tokens, block_table"
            )
        if p < 1 or p != seq.num_tokens:
            raise ValueError(f"num_prompt_tokens is {p} but token_ids has {seq.num_tokens} tokens")
        if not 1 <= seq.n <= self.max_num_seqs:
            raise ValueError(f"n is {seq.n} but max_num_seqs is {self.max_num_seqs}")
        if seq.max_tokens is not None and seq.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {seq.max_tokens}")
        if p >= self.max_model_len:
            raise ValueError(f"prompt has {p} tokens but max_model_len is {self.max_model_len}")
        max_len = min(self.max_model_len, p + (seq.max_tokens or self.max_model_len))
        # The last sampled token's K/V is never computed: a seq holds at most max_len - 1.
        needed = self.block_manager.blocks_for(max_len - 1)
        if needed > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"prompt of {p} tokens plus up to {max_len - p} output tokens needs {needed} "
                f"blocks but the KV pool has {self.block_manager.num_usable_blocks}"
            )
        seq.arrival = next(self._arrivals)
        self._register(seq)
        self.waiting.append(seq)

    def finish_seq(self, seq_id: int) -> None:
        """Mark the seq FINISHED and free its blocks now (full blocks stay cached)."""
        seq = self.get_seq(seq_id)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        del self._seqs[seq_id]
        ids = self._request_seqs[seq.request_id]
        ids.remove(seq_id)
        if not ids:
            del self._request_seqs[seq.request_id]

    def abort_request(self, request_id: str) -> list[int]:
        """Finish every unfinished seq of the request; returns their ids ([] if none)."""
        seq_ids = list(self._request_seqs.get(request_id, ()))
        for seq_id in seq_ids:
            self.finish_seq(seq_id)
        return seq_ids

    def fork_seq(self, seq_id: int, last_token_id: int) -> Sequence:
        """A running copy of a running seq (beam search), sharing all its blocks, whose last
        (not yet computed) token is last_token_id; it runs from the next schedule().

        Raises KeyError for an unknown seq, ValueError unless it runs with exactly its last
        token left to compute.
        """
        seq = self._check_decoding(seq_id)
        child_id = next_seq_id()
        while child_id in self._seqs:
            child_id = next_seq_id()
        child = seq.fork(child_id, seq.sample_index)
        child.token_ids[-1] = last_token_id
        self.block_manager.fork(seq, child)
        self._register(child)
        self.running.append(child)
        return child

    def replace_last_token(self, seq_id: int, token_id: int) -> None:
        """Swap a running seq's last (not yet computed) token, as beam search re-picks it."""
        self._check_decoding(seq_id).token_ids[-1] = token_id

    def _check_decoding(self, seq_id: int) -> Sequence:
        seq = self.get_seq(seq_id)
        if (
            seq.status is not SequenceStatus.RUNNING
            or seq.num_computed_tokens != seq.num_tokens - 1
        ):
            raise ValueError(f"seq {seq_id} is not running with only its last token to compute")
        return seq

    def get_seq(self, seq_id: int) -> Sequence:
        """An unfinished seq (waiting or running). KeyError once finished."""
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"seq {seq_id} is unknown or finished") from None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=bm.num_query_tokens,
            prefix_cache_hits=bm.num_hit_tokens,
            blocks_in_use=bm.num_used_blocks,
            peak_blocks_in_use=bm.peak_used_blocks,
            num_cached_blocks=bm.num_cached_blocks,
        )

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens; allocates blocks, preempts, forks. See the module doc."""
        for seq in self.running:
            if seq.num_tokens >= self.max_model_len:
                raise RuntimeError(
                    f"seq {seq.seq_id} has {seq.num_tokens} tokens and max_model_len is "
                    f"{self.max_model_len}: the engine must finish_seq it"
                )
        bm = self.block_manager
        self.running.sort(key=_age)  # oldest first: the newest is running[-1]
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted: list[int] = []
        forks: list[Sequence] = []  # join running after this step: they run from the next
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = self._fit_drafts(seq, num_new, budget, len(self.running) - i - 1)
            seq_copies = bm.allocate_for(seq, num_new + len(drafts)) if drafts else None
            if seq_copies is None:
                drafts = []  # drafts never cost a preemption
            while seq_copies is None and (seq_copies := bm.allocate_for(seq, num_new)) is None:
                victim = self.running.pop()  # the newest; index >= i, so not yet scheduled
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq_copies is None:
                break
            copies += seq_copies
            scheduled.append(self._schedule_seq(seq, num_new, forks, drafts))
            budget -= num_new + len(drafts)
            i += 1
        if not preempted:  # out of blocks: admitting now would only thrash
            slots = sum(s.n for s in self.running) + len(forks)  # a parent counts as n
            while self.waiting and budget > 0 and slots + self.waiting[0].n <= self.max_num_seqs:
                seq = self.waiting[0]
                cached_blocks = [] if seq.skip_prefix_cache else bm.match_prefix(seq)
                num_cached = len(cached_blocks) * self.block_size
                num_new = min(seq.num_tokens - num_cached, budget)
                if bm.allocate_for(seq, num_new, cached_blocks) is None:
                    break  # FCFS: nobody skips the head
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                seq.num_computed_tokens = num_cached
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = num_cached
                self.running.append(seq)
                slots += seq.n
                scheduled.append(self._schedule_seq(seq, num_new, forks))
                budget -= num_new
        self.running += forks
        scheduled.sort(key=lambda s: not (len(s.token_ids) == 1 and s.sample_seq_ids))  # stable
        return SchedulerOutput(
            scheduled=scheduled,
            block_copies=copies,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted_seq_ids=preempted,
        )

    def postprocess(
        self,
        out: SchedulerOutput,
        sampled: dict[int, int],
        accepted: dict[int, list[int]] | None = None,
    ) -> None:
        """Advance every scheduled seq's num_computed_tokens; append sampled[id] to each
        seq in sample_seq_ids. Seqs finished since schedule() are skipped.

        accepted[id]: the leading drafts kept of a seq scheduled with drafts (default none);
        they are appended before sampled[id], and the blocks of the rest are given back.
        Raises ValueError if sampled lacks a token for a live seq in sample_seq_ids, or
        accepted is not a prefix of the drafts.
        """
        accepted = accepted or {}
        for s in out.scheduled:
            num_computed = s.start_position + len(s.token_ids)
            seq = self._seqs.get(s.seq_id)
            if s.num_draft and seq is not None:
                kept = accepted.get(s.seq_id, [])
                drafts = s.token_ids[len(s.token_ids) - s.num_draft :]
                if kept != drafts[: len(kept)]:
                    raise ValueError(f"accepted tokens of seq {s.seq_id} are not its drafts")
                num_computed -= s.num_draft - len(kept)
                seq.token_ids += kept
                seq.num_computed_tokens = num_computed
                self.block_manager.trim(seq)
                self.block_manager.cache_full_blocks(seq, s.start_position)
            elif seq is not None:
                seq.num_computed_tokens = num_computed
                self.block_manager.cache_full_blocks(seq, s.start_position)
            for sample_id in s.sample_seq_ids:
                target = self._seqs.get(sample_id)
                if target is None:
                    continue
                if sample_id not in sampled:
                    raise ValueError(f"sampled has no token for seq {sample_id}")
                target.num_computed_tokens = num_computed  # forks: the parent's
                target.append_token(sampled[sample_id])

    # -- internals -------------------------------------------------------------------------
    def _register(self, seq: Sequence) -> None:
        self._seqs[seq.seq_id] = seq
        self._request_seqs.setdefault(seq.request_id, []).append(seq.seq_id)

    def _fit_drafts(self, seq: Sequence, num_new: int, budget: int, others: int) -> list[int]:
        """The drafts of seq that fit: only after a decode's one token, within the budget,
        with room under max_model_len for the token sampled after the last draft, and with
        a block (plus one to copy) left for each of the `others` seqs still to schedule."""
        drafts, seq.draft_token_ids = seq.draft_token_ids, []  # consumed, used or not
        if not drafts or num_new != 1 or seq.num_computed_tokens != seq.num_tokens - 1:
            return []
        room = min(budget - 1, self.max_model_len - seq.num_tokens - 1)
        drafts = drafts[: max(room, 0)]
        bm = self.block_manager
        extra = bm.blocks_for(seq.num_tokens + len(drafts)) - bm.blocks_for(seq.num_tokens)
        return drafts if bm.can_allocate(extra + 2 * (others + 1)) else []

    def _schedule_seq(
        self, seq: Sequence, num_new: int, forks: list[Sequence], drafts: list[int] = ()
    ) -> ScheduledSeq:
        """Describe seq's chunk (blocks already allocated); fork its samples if it completes."""
        start = seq.num_computed_tokens
        end = start + num_new
        sample_seq_ids = []
        if end == seq.num_tokens:
            sample_seq_ids.append(seq.seq_id)
            for sample_index in range(1, seq.n):
                child_id = next_seq_id()
                while child_id in self._seqs:
                    child_id = next_seq_id()
                child = seq.fork(child_id, sample_index)
                child.status = SequenceStatus.RUNNING
                self.block_manager.fork(seq, child)
                self._register(child)
                forks.append(child)
                sample_seq_ids.append(child_id)
            seq.n = 1
        return ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids[start:end] + list(drafts),
            start_position=start,
            block_table=list(seq.block_table),
            sample_seq_ids=sample_seq_ids,
            num_draft=len(drafts),
        )

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop seq's K/V and requeue it at the head of waiting."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def check_invariants(self) -> None:
        """Between steps: block accounting exact and every seq's state consistent."""
        bm, W, R = self.block_manager, SequenceStatus.WAITING, SequenceStatus.RUNNING
        bm.check_invariants(self._seqs.values())
        if len(self._seqs) != len(self.running) + len(self.waiting):
            raise AssertionError("a seq is lost or listed twice")
        for seq in self.waiting:
            if seq.status is not W or seq.num_computed_tokens or seq.block_table:
                raise AssertionError(f"waiting seq {seq.seq_id} holds state")
        for seq in self.running:
            if seq.status is not R or len(seq.block_table) != bm.blocks_for(
                seq.num_computed_tokens
            ):
                raise AssertionError(f"running seq {seq.seq_id}: bad status or block count")
            if not seq.num_computed_tokens < seq.num_tokens <= self.max_model_len:
                raise AssertionError(f"seq {seq.seq_id} has nothing to compute or is too long")
        if sum(s.n for s in self.running) > self.max_num_seqs:
            raise AssertionError("more running samples than max_num_seqs")
