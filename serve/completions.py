"""POST /v1/completions and POST /v1/chat/completions: prompts in, OpenAI responses or SSE out."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams
from serve.async_engine import RequestStream
from serve.beam import best_n, engine_params
from serve.errors import bad_request
from serve.generation import (
    ChoiceCursor,
    ClientDisconnectedError,
    Delta,
    ServerState,
    abort_unfinished,
    aborted_error,
    chat_logprobs,
    check_context,
    collect,
    completion_logprobs,
    stream_events,
    submit,
    unless_disconnected,
    usage,
)
from serve.protocol import ChatCompletionRequest, CompletionRequest, check_text

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# status for a response nobody will read (nginx's "client closed request")
CLIENT_CLOSED = 499


def _token_prompt(state: ServerState, ids: list[int]) -> list[int]:
    vocab = state.engine.model_config.vocab_size
    for token_id in ids:
        if not 0 <= token_id < vocab:
            raise bad_request(f"prompt token ids must be in [0, {vocab}), got {token_id}", "prompt")
    return ids


async def _finish(
    state: ServerState, request: Request, streams: list[RequestStream]
) -> list[RequestOutput] | Response:
    """Wait for every stream's final output; a Response instead if the client left."""
    try:
        return await unless_disconnected(request, collect(streams))
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED)
    except Exception as exc:  # aborted at shutdown, or the engine failed
        raise aborted_error(exc) from None
    finally:
        abort_unfinished(state, streams)


def _choice_text_fields(out: CompletionOutput) -> dict[str, Any]:
    return {"finish_reason": out.finish_reason, "stop_reason": out.stop_reason}


async def create_completion(
    body: CompletionRequest, request: Request, state: ServerState
) -> Response:
    """/v1/completions: one engine request per prompt; choice index = prompt index * n + sample."""
    model = state.model_name(body.model)
    params = body.to_sampling_params()
    prompts, echo_texts = [], []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            text, ids = prompt, state.tokenizer.encode(check_text(prompt, "prompt"))
        else:
            ids = _token_prompt(state, prompt)
            text = state.tokenizer.decode(ids, skip_special_tokens=False) if body.echo else None
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        check_context(len(ids), params.max_tokens, state.max_model_len, "prompt", "max_tokens")
        prompts.append({"prompt": text, "prompt_token_ids": ids})
        echo_texts.append((text or "") if body.echo else "")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = []
    for i, prompt in enumerate(prompts):  # engine params depend on the prompt's context room
        submitted = engine_params(params, best_of=body.best_of, use_beam_search=body.use_beam_search,
                                  length_penalty=body.length_penalty,
                                  room=state.max_model_len - len(prompt["prompt_token_ids"]))  # fmt: skip
        try:
            streams += await submit(state, [f"{request_id}-{i}"], [prompt], submitted, "prompt")
        except BaseException:
            abort_unfinished(state, streams)
            raise
    created = int(time.time())
    num_prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    n = params.n

    if body.stream:
        echoed: set[int] = set()

        def make_choice(
            index: int, out: CompletionOutput, delta: Delta, cursor: ChoiceCursor
        ) -> dict[str, Any]:
            text = delta.text
            if index not in echoed:
                echoed.add(index)
                text = echo_texts[index // n] + text
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(out, delta.token_range, cursor, state.tokenizer)
            return {"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason,
                    "stop_reason": out.stop_reason if delta.finish_reason else None}  # fmt: skip

        def make_chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": request_id, "object": "text_completion", "created": created,
                    "model": model, "choices": choices}  # fmt: skip

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(state, streams, params, make_choice, make_chunk,
                               num_prompt_tokens, include_usage)  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    finals = await _finish(state, request, streams)
    if isinstance(finals, Response):
        return finals
    choices, generated = [], 0
    for i, final in enumerate(finals):
        generated += sum(len(out.token_ids) for out in final.outputs)  # best_of: all count
        for j, out in enumerate(best_n(final, n, body.use_beam_search).outputs):
            logprobs = None
            if params.logprobs is not None:
                cursor = ChoiceCursor(text_offset=len(echo_texts[i]))
                logprobs = completion_logprobs(
                    out, range(len(out.token_ids)), cursor, state.tokenizer
                )
            choices.append({"index": i * n + j, "text": echo_texts[i] + out.text,
                            "logprobs": logprobs, **_choice_text_fields(out)})  # fmt: skip
    return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                         "model": model, "choices": choices,
                         "usage": usage(num_prompt_tokens, generated)})  # fmt: skip


def render_chat(state: ServerState, messages: list[dict[str, Any]], add_generation_prompt: bool
                ) -> tuple[str, list[int]]:  # fmt: skip
    """The chat prompt text and its token ids; 400 (param messages) if the template fails."""
    try:
        text = state.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, chat_template=state.chat_template
        )
    except Exception as exc:  # jinja errors, raise_exception() in the template, missing template
        raise bad_request(f"messages: the chat template failed: {exc}", "messages") from None
    assert isinstance(text, str)
    return text, state.tokenizer.encode(check_text(text, "messages"), add_special_tokens=False)


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ServerState
) -> Response:
    """/v1/chat/completions: the messages through the chat template, then one engine request."""
    model = state.model_name(body.model)
    params: SamplingParams = body.to_sampling_params()
    messages = [m.to_template(i) for i, m in enumerate(body.messages)]
    text, ids = render_chat(state, messages, body.add_generation_prompt)
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    check_context(len(ids), params.max_tokens, state.max_model_len, "messages", max_tokens_param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    prompt = {"prompt": text, "prompt_token_ids": ids}
    submitted = engine_params(params, best_of=None, use_beam_search=body.use_beam_search,
                              length_penalty=body.length_penalty,
                              room=state.max_model_len - len(ids))  # fmt: skip
    streams = await submit(state, [request_id], [prompt], submitted, "messages")
    created = int(time.time())
    top_k = body.top_logprobs or 0

    def logprobs_of(out: CompletionOutput, positions: range) -> dict[str, Any] | None:
        if not body.logprobs:
            return None
        return chat_logprobs(out, positions, top_k, state.tokenizer)

    if body.stream:

        def make_choice(
            index: int, out: CompletionOutput, delta: Delta, _cursor: ChoiceCursor
        ) -> dict[str, Any]:
            return {"index": index, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": logprobs_of(out, delta.token_range),
                    "finish_reason": delta.finish_reason,
                    "stop_reason": out.stop_reason if delta.finish_reason else None}  # fmt: skip

        def make_chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices}  # fmt: skip

        role = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for j in range(params.n)]  # fmt: skip
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(state, streams, params, make_choice, make_chunk, len(ids),
                               include_usage, [make_chunk([c]) for c in role])  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    finals = await _finish(state, request, streams)
    if isinstance(finals, Response):
        return finals
    outs = finals[0].outputs
    choices = [
        {"index": out.index, "message": {"role": "assistant", "content": out.text},
         "logprobs": logprobs_of(out, range(len(out.token_ids))), **_choice_text_fields(out)}
        for out in outs
    ]  # fmt: skip
    generated = sum(len(out.token_ids) for out in outs)
    return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                         "model": model, "choices": choices,
                         "usage": usage(len(ids), generated)})  # fmt: skip
