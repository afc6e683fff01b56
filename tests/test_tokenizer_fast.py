"""jpaged's tokenizer without transformers (tokenizers + jinja2) against transformers itself.

Each case is a model directory: the default model's tokenizer files, rewritten where a case
needs another config (BOS/EOS flags, a post-processor, tokens added by the config, a tokenizer
class with its own logic). jpaged's `Tokenizer.from_dir` and `AutoTokenizer.from_pretrained`
load the same directory and must agree on ids, text, special tokens and chat prompts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest

from jpaged.tokenizer import Tokenizer, _FastTokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  spaces  and\ttabs\n\n",
    "日本語 🤗 naïve — “quotes”",
    '<tool_call>{"name": "f"}</tool_call>',
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2? <b>bold</b> & ünïcode"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
TEMPLATES = {
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    "{{ messages[1] | tojson(indent=2, sort_keys=true) }}",
    "loopcontrols": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ loop.index }}:{{ m.content }};{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% endfor %}{{ bos_token }}{{ ns.n }}{{ eos_token }}{{ pad_token }}{{ unk_token }}",
    "whitespace": "{% for m in messages %}\n    {% if m.role == 'user' %}\n[U] {{ m.content }}\n"
    "    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}[A]{% endif %}",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    "<a>{{ m.content }}</a>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "strftime": "{{ strftime_now('%Y') }}|{{ messages | length }}",
}


def _edit_dir(
    src: Path,
    dst: Path,
    config: Callable[[dict[str, Any]], None] | None = None,
    tokenizer: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    if config:
        config(cfg)
    if tokenizer:
        tokenizer(tok)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _bos_eos_flags(cfg: dict[str, Any]) -> None:
    cfg.update(add_bos_token=True, add_eos_token=True)


def _template_post_processor(tok: dict[str, Any]) -> None:
    tok["post_processor"] = {  # Llama 3's shape: BOS before every sequence
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }  # fmt: skip


def _config_added_tokens(cfg: dict[str, Any]) -> None:
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    cfg["added_tokens_decoder"] = {
        "49152": {"content": "<tool_call>", **flags, "special": True},
        "49153": {"content": "</tool_call>", **flags, "special": False},
    }
    cfg["extra_special_tokens"] = ["<tool_call>"]


CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "bos_eos_flags": {"config": _bos_eos_flags},
    "post_processor": {"tokenizer": _template_post_processor},
    "config_added_tokens": {"config": _config_added_tokens},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(
    request: pytest.FixtureRequest,
    default_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Tokenizer, Any]:
    case = request.param
    d = _edit_dir(default_model_dir, tmp_path_factory.mktemp(case) / "model", **CASES[case])
    ours = Tokenizer.from_dir(d)
    assert isinstance(ours._impl, _FastTokenizer)  # no transformers on this path
    return ours, transformers.AutoTokenizer.from_pretrained(str(d))


def test_ids_and_text(pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = pair
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == list(ref.encode(text, add_special_tokens=special)), (text, special)
        ids = ours.encode(text)
        assert ours.convert_ids_to_tokens(ids) == list(ref.convert_ids_to_tokens(ids))
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


def test_special_tokens(pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = pair
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.special_tokens == dict(ref.special_tokens_map)


@pytest.mark.parametrize("name", ["model", *sorted(TEMPLATES)])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_templates(
    pair: tuple[Tokenizer, Any], name: str, add_generation_prompt: bool
) -> None:
    ours, ref = pair
    template = None if name == "model" else TEMPLATES[name]
    kw = {"add_generation_prompt": add_generation_prompt, "chat_template": template}
    text = ours.apply_chat_template(MESSAGES, **kw)
    assert text == ref.apply_chat_template(MESSAGES, tokenize=False, **kw)
    assert ours.apply_chat_template(MESSAGES, tokenize=True, **kw) == ours.encode(
        text, add_special_tokens=False
    )


def test_raise_exception_and_syntax_errors(pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = pair
    failing = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    for tok in (ours, ref):
        kw = {"chat_template": failing}
        with pytest.raises(jinja2.TemplateError, match="first must be user"):
            tok.apply_chat_template(MESSAGES, **kw)
    with pytest.raises(jinja2.TemplateError):
        ours.apply_chat_template(MESSAGES, chat_template="{% for m in messages %}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox holds
        ours.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")


def test_model_specific_class_goes_through_transformers(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """A tokenizer class with its own Python logic is left to transformers (same results)."""

    def gpt2(cfg: dict[str, Any]) -> None:
        cfg["tokenizer_class"] = "GPT2Tokenizer"

    d = _edit_dir(default_model_dir, tmp_path / "model", config=gpt2)
    ours, fast = Tokenizer.from_dir(d, background=True), Tokenizer.from_dir(default_model_dir)
    assert not isinstance(ours._impl, _FastTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == fast.encode(text)
        assert ours.decode(ours.encode(text), False) == fast.decode(fast.encode(text), False)
    assert ours.apply_chat_template(MESSAGES) == fast.apply_chat_template(MESSAGES)
    assert ours.eos_token_id == fast.eos_token_id


def test_hf_on_the_fast_path_loads_transformers(default_model_dir: Path) -> None:
    tok = Tokenizer.from_dir(default_model_dir)
    assert isinstance(tok.hf, transformers.PreTrainedTokenizerBase)
    assert tok.hf.encode("Hello world!") == tok.encode("Hello world!")
