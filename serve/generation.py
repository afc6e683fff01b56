"""What completions and chat share: server state, submitting requests, streaming deltas, logprobs.

A `ChoiceCursor` turns one choice's cumulative outputs into deltas: text never shown
twice, never a partial stop string (held back until it is ruled out), each token's
logprobs sent once, and one finish_reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request

from jpaged.detokenizer import stop_holdback
from jpaged.engine import LLMEngine
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer
from serve.async_engine import (
    AsyncEngine,
    EngineUnavailableError,
    QueueFullError,
    RequestAbortedError,
    RequestStream,
)
from serve.errors import APIError, bad_request, error_body, param_of

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
_PROMPT_FIELDS = {"prompt", "n", "max_tokens", "stop_token_ids"}  # fields engine ValueErrors name


@dataclasses.dataclass(slots=True)
class ServerState:
    """What every route needs; built once by `build_app`."""

    engine: LLMEngine
    async_engine: AsyncEngine
    served_model_names: list[str]
    chat_template: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(
                404, f"The model `{requested}` does not exist.", "model", "model_not_found"
            )
        return requested


def check_context(
    num_prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    prompt_param: str,
    max_tokens_param: str,
) -> None:
    """400 when the prompt, or prompt + max_tokens, does not fit max_model_len."""
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens but this model's maximum context "
            f"length (max_model_len) is {max_model_len} tokens, and at least one token must "
            "be left for the completion; shorten the prompt",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"this model's maximum context length (max_model_len) is {max_model_len} tokens, "
            f"but {num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} in {max_tokens_param}); shorten the prompt or lower "
            f"{max_tokens_param}",
            max_tokens_param,
            "context_length_exceeded",
        )


async def submit(
    state: ServerState,
    request_ids: list[str],
    prompts: list[dict[str, Any]],
    params: SamplingParams,
    prompt_param: str,
) -> list[RequestStream]:
    """Add one engine request per prompt; all or none (a failure aborts those added)."""
    arrival = time.time()
    streams: list[RequestStream] = []
    try:
        for request_id, prompt in zip(request_ids, prompts, strict=True):
            streams.append(
                await state.async_engine.add_request(request_id, prompt, params, arrival)
            )
    except BaseException as exc:
        for stream in streams:
            state.async_engine.abort(stream.request_id)
        if isinstance(exc, ValueError):
            field = param_of(str(exc), _PROMPT_FIELDS)
            raise bad_request(str(exc), prompt_param if field == "prompt" else field) from None
        if isinstance(exc, QueueFullError):
            raise APIError(429, str(exc), None, "rate_limit_exceeded") from None
        if isinstance(exc, EngineUnavailableError):
            raise APIError(503, str(exc), None, "service_unavailable") from None
        raise
    return streams


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (stream index, output) from several streams as outputs arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream."""
    last: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge(streams):
        last[i] = out
    return [out for out in last if out is not None]


def abort_unfinished(state: ServerState, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.finished:
            state.async_engine.abort(stream.request_id)


async def unless_disconnected[T](request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (ClientDisconnectedError)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnectedError("client disconnected")
    return task.result()


def aborted_error(exc: Exception) -> APIError:
    """A request the server could not finish: shut down (503) or a failed engine (500)."""
    if isinstance(exc, RequestAbortedError):
        return APIError(503, f"{exc}: the server is shutting down", None, "service_unavailable")
    return APIError(500, f"the engine failed: {type(exc).__name__}: {exc}")


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: Exception) -> str:
    err = exc if isinstance(exc, APIError) else aborted_error(exc)
    return sse(error_body(err.status, err.message, err.param, err.code))


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


@dataclasses.dataclass(slots=True)
class Delta:
    text: str
    token_range: range  # positions in the output's token_ids new in this delta
    finish_reason: str | None


@dataclasses.dataclass(slots=True)
class ChoiceCursor:
    """How much of one choice the client has seen."""

    text_len: int = 0  # characters of the output text sent
    num_tokens: int = 0  # tokens whose logprobs were sent
    text_offset: int = 0  # completions logprobs: characters of token text sent (echo included)
    done: bool = False  # finish_reason sent

    def advance(self, out: CompletionOutput, params: SamplingParams) -> Delta | None:
        """The new part of `out`, or None when there is nothing new to send."""
        if self.done:
            return None
        text = out.text
        shown = len(text)
        if out.finish_reason is None:
            shown -= stop_holdback(text, params.stop, params.include_stop_str_in_output)
        shown = max(shown, self.text_len)
        delta = Delta(text[self.text_len : shown], range(self.num_tokens, len(out.token_ids)),
                      out.finish_reason)  # fmt: skip
        if (
            not delta.text
            and delta.finish_reason is None
            and not (params.logprobs is not None and delta.token_range)
        ):
            return None
        self.text_len = shown
        self.num_tokens = len(out.token_ids)
        self.done = out.finish_reason is not None
        return delta


def _clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) else max(logprob, MIN_LOGPROB)


def _token_text(token_id: int, entry: Logprob | None, tokenizer: Tokenizer) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _ranked(position: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    """The requested top entries (rank 1, 2, ...) of one position, best first."""
    return sorted(
        ((tid, lp) for tid, lp in position.items() if lp.rank is not None),
        key=lambda item: item[1].rank or 0,
    )


def completion_logprobs(
    out: CompletionOutput, positions: range, cursor: ChoiceCursor, tokenizer: Tokenizer
) -> dict[str, list[Any]]:
    """/v1/completions `logprobs` for the given output positions (advances text_offset)."""
    result: dict[str, list[Any]] = {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []
    }  # fmt: skip
    assert out.logprobs is not None
    for pos in positions:
        token_id, position = out.token_ids[pos], out.logprobs[pos]
        chosen = position.get(token_id)
        token = _token_text(token_id, chosen, tokenizer)
        result["tokens"].append(token)
        result["token_logprobs"].append(_clamp(chosen.logprob) if chosen else None)
        top = {_token_text(t, lp, tokenizer): _clamp(lp.logprob) for t, lp in _ranked(position)}
        if chosen is not None:
            top.setdefault(token, _clamp(chosen.logprob))
        result["top_logprobs"].append(top)
        result["text_offset"].append(cursor.text_offset)
        cursor.text_offset += len(token)
    return result


def chat_logprobs(
    out: CompletionOutput, positions: range, top_k: int, tokenizer: Tokenizer
) -> dict[str, list[dict[str, Any]]]:
    """/v1/chat/completions `logprobs` ({"content": [...]}) for the given output positions."""
    content = []
    assert out.logprobs is not None
    for pos in positions:
        token_id, position = out.token_ids[pos], out.logprobs[pos]
        chosen = position.get(token_id)
        token = _token_text(token_id, chosen, tokenizer)
        top = [
            {
                "token": (text := _token_text(t, lp, tokenizer)),
                "logprob": _clamp(lp.logprob),
                "bytes": list(text.encode("utf-8")),
            }
            for t, lp in _ranked(position)[:top_k]
        ]
        content.append(
            {
                "token": token,
                "logprob": _clamp(chosen.logprob) if chosen else MIN_LOGPROB,
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": top,
            }
        )
    return {"content": content}


class ClientDisconnectedError(Exception):
    """The client went away before its (non-streaming) response was ready."""


async def stream_events(
    state: ServerState,
    streams: list[RequestStream],
    params: SamplingParams,
    make_choice: Callable[[int, CompletionOutput, Delta, ChoiceCursor], dict[str, Any]],
    make_chunk: Callable[[list[dict[str, Any]]], dict[str, Any]],
    num_prompt_tokens: int,
    include_usage: bool,
    prologue: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[str]:
    """The SSE body: prologue chunks, one chunk per choice delta, usage if asked, [DONE].

    make_choice(choice_index, output, delta, cursor) -> the chunk's choice dict;
    make_chunk(choices) -> the chunk. A client that goes away cancels this generator,
    which aborts its unfinished requests.
    """
    n = params.n
    cursors = [[ChoiceCursor() for _ in range(n)] for _ in streams]
    last: list[RequestOutput | None] = [None] * len(streams)
    extra = {"usage": None} if include_usage else {}
    try:
        for chunk in prologue:
            yield sse({**chunk, **extra})
        async for i, out in merge(streams):
            last[i] = out
            for j, output in enumerate(out.outputs):
                cursor = cursors[i][j]
                delta = cursor.advance(output, params)
                if delta is not None:
                    choice = make_choice(i * n + j, output, delta, cursor)
                    yield sse({**make_chunk([choice]), **extra})
        if include_usage:
            generated = sum(len(o.token_ids) for out in last if out for o in out.outputs)
            yield sse({**make_chunk([]), "usage": usage(num_prompt_tokens, generated)})
    except Exception as exc:  # aborted at shutdown, or the engine failed: tell the client
        yield sse_error(exc)
    finally:
        abort_unfinished(state, streams)
    yield SSE_DONE
