"""Request bodies of the OpenAI API (plus vLLM's extra sampling fields) and their SamplingParams.

Pydantic checks types (a mistyped field is a 400 naming it); ranges are checked once, by
`SamplingParams`, whose ValueError names the field. Unknown fields are ignored, as OpenAI
and vLLM do; fields jpaged cannot honour yet are rejected rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jpaged.sampling_params import MAX_LOGPROBS, SamplingParams
from serve.beam import check_beam_fields
from serve.errors import bad_request, param_of

_SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__}
_INT32_MAX = 2**31 - 1
# The sampler divides positive logits by the penalty in float32: smaller ones overflow to inf
# (NaN probabilities). 1e-6 already makes any repeated token win.
MIN_REPETITION_PENALTY = 1e-6


def check_text(text: str, param: str) -> str:
    """`text`, or a 400 naming `param` when it holds a lone surrogate: JSON can carry one
    (`"\\ud800"`) but it is not text, and neither the tokenizer nor UTF-8 output takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(
            f"{param} is not valid Unicode text (it holds a lone surrogate)", param
        ) from None
    return text


def _ranged(default: Any, **bounds: float) -> Any:
    """A field whose JSON-schema range (`minimum`, `maximum`, `exclusiveMinimum`) is shown in
    /openapi.json; SamplingParams enforces it, with messages naming the field."""
    return Field(default, json_schema_extra=bounds)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = _ranged(1, minimum=1)
    temperature: float | None = _ranged(None, minimum=0)  # None: 1.0, as OpenAI
    top_p: float | None = _ranged(None, exclusiveMinimum=0, maximum=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = _ranged(None, minimum=-2, maximum=2)
    frequency_penalty: float | None = _ranged(None, minimum=-2, maximum=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling fields
    top_k: int | None = _ranged(None, minimum=-1)
    min_p: float | None = _ranged(None, minimum=0, maximum=1)
    repetition_penalty: float | None = _ranged(None, minimum=MIN_REPETITION_PENALTY)
    ignore_eos: bool = False
    min_tokens: int = _ranged(0, minimum=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False  # serve/beam.py
    length_penalty: float = 1.0

    def check_common(self) -> None:
        """Checks that need no engine: unsupported fields and stream_options without stream."""
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if self.logit_bias:
            raise bad_request("logit_bias is not supported yet", "logit_bias")
        for stop in [self.stop] if isinstance(self.stop, str) else self.stop or ():
            check_text(stop, "stop")

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, param_names: dict[str, str]
    ) -> SamplingParams:
        """The request's SamplingParams; a bad value is a 400 naming the request's field.

        param_names maps a SamplingParams field to the request field it came from.
        """
        options: dict[str, Any] = {
            "n": self.n,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            # the sampler treats top_k >= vocab as off, but its int32 arrays must hold it
            "top_k": 0 if self.top_k is None else min(self.top_k, _INT32_MAX),
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0
            if self.repetition_penalty is None
            else self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
        }
        try:
            params = SamplingParams(**options)
        except ValueError as exc:
            field = param_of(str(exc), _SAMPLING_FIELDS)
            param = param_names.get(field, field) if field else None
            message = str(exc)
            if field and param != field:
                message = f"{param}{message[len(field) :]}"
            raise bad_request(message, param) from None
        if params.repetition_penalty < MIN_REPETITION_PENALTY:
            raise bad_request(
                f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}, "
                f"got {params.repetition_penalty}",
                "repetition_penalty",
            )
        return params


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        json_schema_extra={"minLength": 1, "minItems": 1}  # not empty (prompts() checks)
    )
    max_tokens: int | None = _ranged(16, minimum=1)  # OpenAI's default for completions
    logprobs: int | None = _ranged(None, minimum=0, maximum=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a string or token ids each)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.echo and self.logprobs is not None:
            raise bad_request(
                "echo with logprobs needs prompt logprobs, which are not supported yet", "echo"
            )
        params = self.sampling_params(self.max_tokens, self.logprobs, {})
        check_beam_fields(n=self.n, best_of=self.best_of, use_beam_search=self.use_beam_search,
                          stream=self.stream, params=params, logprobs_param="logprobs")  # fmt: skip
        return params


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the template

    role: str
    content: str | list[TextPart] | None = None

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as the chat template sees it (content parts joined into text)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.type != "text":
                    raise bad_request(
                        f"messages.{index}.content: only text parts are supported, "
                        f"got type {part.type!r}",
                        "messages",
                    )
                if part.text is None:
                    raise bad_request(
                        f"messages.{index}.content: a text part needs a `text` field", "messages"
                    )
                texts.append(part.text)
            message["content"] = "\n".join(texts)
        elif self.content is None:
            message["content"] = ""
        return message


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _ranged(None, minimum=1)  # None: whatever fits the context
    max_completion_tokens: int | None = _ranged(None, minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = _ranged(None, minimum=0, maximum=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        self.check_common()
        if self.tools:
            raise bad_request("tools are not supported yet", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format type 'text' is supported", "response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                    "top_logprobs",
                )
        max_tokens, name = self.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, name = self.max_tokens, "max_tokens"
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self.sampling_params(
            max_tokens, logprobs, {"max_tokens": name, "logprobs": "top_logprobs"}
        )
        check_beam_fields(n=self.n, best_of=None, use_beam_search=self.use_beam_search,
                          stream=self.stream, params=params, logprobs_param="logprobs")  # fmt: skip
        return params


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered by the template first."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]
