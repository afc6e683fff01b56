"""Chat templates: a checkpoint's Jinja template rendered as its model card expects.

HF checkpoints ship the template as Jinja source in tokenizer_config.json; they are written for
the environment transformers renders them in, which this module reproduces with jinja2 alone
(importing transformers costs ~1.5 s of start-up): a sandbox, `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that leaves non-ASCII and HTML
characters alone, and the `raise_exception` and `strftime_now` globals. `{% generation %}`
blocks (used to mark assistant spans for training) render their body unchanged.
tests/test_tokenizer.py checks the output against transformers' `apply_chat_template`.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template for `source` (cached: a server renders the same one per request)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """`messages` through the template `source`. The template also sees `tools`, `documents`,
    `add_generation_prompt` and the tokenizer's named special tokens (`bos_token`, ...).
    Errors (syntax, `raise_exception`, undefined calls) surface as jinja2's TemplateError."""
    return compile_template(source).render(
        **special_tokens,
        messages=list(messages),
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
    )
