"""Per-request engine state: prompt, sampling params, and one output track per sample."""

from __future__ import annotations

import dataclasses
import time

from jpaged.detokenizer import IncrementalDetokenizer, check_stop
from jpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass(slots=True)
class SampleTrack:
    """What one of the request's n samples has produced so far."""

    index: int
    seed: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    cumulative_logprob: float | None = 0.0  # None: not tracked (see wants_logprob)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclasses.dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what fits max_model_len
    eos_token_ids: frozenset[int]
    tracks: list[SampleTrack]
    metrics: RequestMetrics
    num_finished: int = 0
    # one entry per prompt token (the first None), filled as prefill chunks run
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.tracks)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[t.to_output() for t in self.tracks],
            finished=self.finished,
            metrics=self.metrics,
        )

    def prompt_logprob_rows(self, start: int, num_tokens: int) -> list[tuple[int, int]]:
        """(offset in the chunk, next prompt token) for each position of the chunk
        [start, start + num_tokens) whose prompt logprob is still to record: logits at
        position p score prompt token p + 1."""
        assert self.prompt_logprobs is not None
        first = max(start, len(self.prompt_logprobs) - 1)
        last = min(start + num_tokens, len(self.prompt_token_ids) - 1)
        return [(p - start, self.prompt_token_ids[p + 1]) for p in range(first, last)]

    def append_token(
        self, track: SampleTrack, token_id: int, logprob: float, top: dict[int, Logprob] | None
    ) -> bool:
        """Record a sampled token; apply EOS / stop ids / stop strings / max_tokens.

        Returns True when this sample has just finished.
        """
        p = self.params
        now = time.time()
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        track.token_ids.append(token_id)
        if track.cumulative_logprob is not None:
            track.cumulative_logprob += logprob
        if top is not None:
            assert track.logprobs is not None
            track.logprobs.append(top)
        num_out = len(track.token_ids)
        can_stop = num_out >= p.min_tokens
        if can_stop and not p.ignore_eos and token_id in self.eos_token_ids:
            track.finish_reason = "stop"
        elif can_stop and p.stop_token_ids and token_id in p.stop_token_ids:
            track.finish_reason, track.stop_reason = "stop", token_id
        delta = track.detokenizer.append(token_id)
        if track.finish_reason is None or p.include_stop_str_in_output:
            track.text += delta
        if track.finish_reason is None and can_stop and p.stop and delta:
            cut, matched = check_stop(track.text, len(delta), p.stop, p.include_stop_str_in_output)
            if matched is not None:
                track.text = track.text[:cut]
                track.finish_reason, track.stop_reason = "stop", matched
        if track.finish_reason is None and num_out >= self.max_tokens:
            track.finish_reason = "length"
        if track.finish_reason is not None:
            if not isinstance(track.stop_reason, str):  # no stop string cut the text
                track.text += track.detokenizer.flush()
            self.num_finished += 1
            if self.finished:
                self.metrics.finished_time = now
            return True
        return False
