"""Sequence: one token stream (a prompt plus one sample's output) and its KV-cache bookkeeping."""

import enum
import itertools
from dataclasses import dataclass, field

_seq_ids = itertools.count()


def next_seq_id() -> int:
    """A fresh process-wide sequence id: the engine takes parents' ids here, the scheduler forks'."""
    return next(_seq_ids)


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued; holds no blocks and num_computed_tokens == 0
    RUNNING = enum.auto()  # admitted; holds blocks for its computed tokens
    FINISHED = enum.auto()  # done or aborted; blocks already returned


@dataclass(slots=True, eq=False)
class Sequence:
    """A token stream and its KV state. Mutated only by the scheduler and block manager.

    Invariant between steps: the K/V of token_ids[:num_computed_tokens] sit in the pool at
    block_table[pos // block_size], slot pos % block_size.
    """

    seq_id: int
    request_id: str
    token_ids: list[int]  # prompt then generated tokens (copied at construction)
    num_prompt_tokens: int
    n: int = 1  # samples wanted; > 1 only on a request's parent before it forks
    sample_index: int = 0  # which of the request's n outputs this is (0 for the parent)
    arrival: int = 0  # FCFS order, set by Scheduler.add_seq; forks inherit the parent's
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    block_table: list[int] = field(default_factory=list)  # block ids, position order
    max_tokens: int | None = None  # output-token limit, used only for admission (None: none)
    num_cached_tokens: int | None = None  # prefix-cache hit at first scheduling, in tokens
    skip_prefix_cache: bool = False  # compute every prompt token (prompt logprobs need them)
    # Chained prefix-cache hashes of the leading full blocks of token_ids, filled lazily by
    # the block manager. Content-only, so they stay valid across preemption and forks.
    block_hashes: list[bytes] = field(default_factory=list)
    # Speculative tokens for the next step (set by the engine, taken by schedule() whether it
    # uses them or not): they follow the last token in its chunk; postprocess keeps those the
    # model agrees with.
    draft_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)  # never append to the caller's list

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def fork(self, seq_id: int, sample_index: int) -> "Sequence":
        """A copy sharing nothing mutable (n = 1). The block manager must bump the blocks' refs."""
        return Sequence(
            seq_id=seq_id,
            request_id=self.request_id,
            token_ids=self.token_ids,  # copied by __post_init__
            num_prompt_tokens=self.num_prompt_tokens,
            n=1,
            sample_index=sample_index,
            arrival=self.arrival,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            block_table=list(self.block_table),
            max_tokens=self.max_tokens,
            num_cached_tokens=self.num_cached_tokens,
            block_hashes=list(self.block_hashes),
        )
