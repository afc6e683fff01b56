"""What the engine returns per request: completions, logprobs and timings (vLLM's shapes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Logprob:
    """Log probability of one token under the raw model distribution.

    `rank` is 1-based (1 = most likely); `decoded_token` is the token's text, when detokenized.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated (or prompt) position: token id -> its Logprob. The dict holds
# the chosen token plus the requested top-k tokens.
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's `n` completions, cumulative so far.

    finish_reason: None while running, then "stop" (EOS, stop token or stop string),
    "length" (max_tokens or context) or "abort".
    stop_reason: the stop token id or stop string that ended it; None for EOS or "length".
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock timestamps of one request (seconds, `time.time()` clock)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    last_token_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        """Seconds from arrival to first being scheduled."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """Everything known about one request after an engine step.

    prompt_logprobs: one entry per prompt token, the first None (it has no predecessor);
    None when not requested. num_cached_tokens: prompt tokens served from the prefix cache.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None


def logprob_entry(
    decode: Callable[..., str], token_id: int, logprob: float, rank: int, top_ids: Any,
    top_lps: Any, k: int,
) -> dict[int, Logprob]:  # fmt: skip
    """vLLM's per-position dict: the top-k tokens (rank 1..k) plus the actual token.
    `decode`: the tokenizer's decode(ids, skip_special_tokens=...)."""
    entry = {
        int(t): Logprob(float(v), r + 1, decode([int(t)], skip_special_tokens=False))
        for r, (t, v) in enumerate(zip(top_ids[:k], top_lps[:k], strict=True))
    }
    if token_id not in entry:
        entry[token_id] = Logprob(
            float(logprob), int(rank), decode([token_id], skip_special_tokens=False)
        )
    return entry
