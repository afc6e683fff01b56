"""Text <-> token ids and chat templates for a model directory.

A directory with a `tokenizer.json` whose tokenizer_config.json asks for no model-specific class
(`PreTrainedTokenizerFast`, as Llama 3, SmolLM and the GGUF import write) loads with the
`tokenizers` library directly (~0.2 s; transformers' import alone takes ~1.5 s of start-up).
Other directories (sentencepiece-only, tokenizer classes with their own Python logic) load
through `transformers.AutoTokenizer`, on a thread when asked. Chat templates render with
jpaged.chat_template either way. tests/test_tokenizer_fast.py checks both paths against
transformers in the same environment, tests/test_tokenizer.py the default model against the
reference environment's.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path
from typing import Any

from jpaged.chat_template import render_chat

# The named special tokens, as transformers lists them (their ids are `all_special_ids`).
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # fmt: skip
_PLAIN_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def _load_hf(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _FastTokenizer:
    """tokenizer.json through `tokenizers`, special tokens and the template from the config."""

    def __init__(self, backend: Any, config: dict[str, Any], special_map: dict[str, Any]) -> None:
        from tokenizers import AddedToken

        self.backend = backend
        backend.no_truncation()
        backend.no_padding()
        added = config.get("added_tokens_decoder") or {}
        known = set(backend.get_added_tokens_decoder())
        for token_id, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
            if int(token_id) not in known and isinstance(spec, dict) and "content" in spec:
                fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
                kw = {k: bool(spec[k]) for k in fields if k in spec}
                backend.add_tokens([AddedToken(spec["content"], **kw)])
        self.special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIAL:
            text = _token_text(config.get(name, special_map.get(name)))
            if text is not None:
                self.special_tokens[name] = text
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.extra_special = [t for t in (_token_text(x) for x in extra) if t is not None]
        self.chat_template: str | None = config.get("chat_template")
        # NOTE: add_bos_token / add_eos_token in the config are not applied: transformers
        # (5.x) ignores them for this class too; tokenizer.json's post-processor decides.
        # tests/test_tokenizer_fast.py holds both to that.

    def token_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def all_special_ids(self) -> list[int]:
        texts = dict.fromkeys([*self.special_tokens.values(), *self.extra_special])
        ids = (self.backend.token_to_id(t) for t in texts)
        return [i for i in ids if i is not None]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # NOTE: transformers skips clean_up_tokenization_spaces for BPE models; other models
        # that ask for it take the transformers path (see try_load).
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    @classmethod
    def try_load(cls, path: Path) -> _FastTokenizer | None:
        """The fast tokenizer of `path`, or None where transformers' own logic is needed."""
        from tokenizers import Tokenizer as RawTokenizer

        config_path, json_path = path / "tokenizer_config.json", path / "tokenizer.json"
        if not json_path.is_file() or not config_path.is_file():
            return None
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") not in _PLAIN_CLASSES:
            return None
        backend = RawTokenizer.from_file(str(json_path))
        if type(backend.model).__name__ != "BPE" and config.get("clean_up_tokenization_spaces"):
            return None  # transformers' clean-up applies: not reproduced here
        map_path = path / "special_tokens_map.json"
        special_map = json.loads(map_path.read_text("utf-8")) if map_path.is_file() else {}
        return cls(backend, config, special_map)


class _HFTokenizer:
    """The same surface over a transformers tokenizer."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.backend = getattr(hf, "backend_tokenizer", hf)
        self.special_tokens = {
            k: v
            for k, v in hf.special_tokens_map.items()
            if k in _NAMED_SPECIAL and isinstance(v, str)
        }
        self.chat_template: str | None = getattr(hf, "chat_template", None)
        self.vocab_size = len(hf)
        self.all_special_ids = list(hf.all_special_ids)

    def token_id(self, name: str) -> int | None:
        return getattr(self.hf, f"{name}_id")

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(ids))


class Tokenizer:
    """Text <-> ids, special tokens and the chat template of one model (see the module doc)."""

    def __init__(self, source: Any, path: Path | str | None = None) -> None:
        """`source`: a transformers tokenizer, a `_FastTokenizer`, or a Future of either (see
        `from_dir`); `path`, the model directory (for `hf` on the fast path)."""
        if not isinstance(source, concurrent.futures.Future | _FastTokenizer | _HFTokenizer):
            source = _HFTokenizer(source)
        self._source = source
        self._path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._hf_loaded: Any = None

    @classmethod
    def from_dir(cls, path: Path | str, *, background: bool = False) -> Tokenizer:
        """Load `tokenizer.json` / `tokenizer_config.json` from an HF model directory.

        A plain tokenizer.json loads at once. Otherwise transformers loads it, and
        background=True returns at once and loads on a thread (importing transformers takes
        ~1.5 s, which then overlaps the weight loading); the first use waits for it and
        raises what the load raised.
        """
        path = Path(path)
        fast = _FastTokenizer.try_load(path)
        if fast is not None:
            return cls(fast, path)
        if not background:
            return cls(_HFTokenizer(_load_hf(str(path))), path)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def load() -> None:
            try:
                future.set_result(_HFTokenizer(_load_hf(str(path))))
            except BaseException as err:  # noqa: BLE001 - handed to the first caller
                future.set_exception(err)

        threading.Thread(target=load, name="jpaged-tokenizer", daemon=True).start()
        return cls(future, path)

    @property
    def _impl(self) -> _FastTokenizer | _HFTokenizer:
        if isinstance(self._source, concurrent.futures.Future):
            with self._lock:
                if isinstance(self._source, concurrent.futures.Future):
                    self._source = self._source.result()
        return self._source

    @property
    def backend(self) -> Any:
        """The `tokenizers.Tokenizer` underneath (for incremental detokenization); a slow
        transformers tokenizer itself where there is none."""
        return self._impl.backend

    @property
    def hf(self) -> Any:
        """The transformers tokenizer of this model (loaded on first use on the fast path)."""
        impl = self._impl
        if isinstance(impl, _HFTokenizer):
            return impl.hf
        with self._lock:
            if self._hf_loaded is None:
                if self._path is None:
                    raise ValueError("hf: this tokenizer was not loaded from a directory")
                self._hf_loaded = _load_hf(str(self._path))
        return self._hf_loaded

    @property
    def eos_token_id(self) -> int | None:
        return self._impl.token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._impl.token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._impl.token_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._impl.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._impl.all_special_ids)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (`bos_token`, `eos_token`, ...) as text."""
        return dict(self._impl.special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self._impl.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the model asks for them."""
        return self._impl.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._impl.decode([int(i) for i in ids], skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._impl.convert_ids_to_tokens([int(i) for i in ids])

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) as the prompt text, or its ids.

        The ids are the encoding of the rendered text without extra special tokens (the template
        writes its own). Raises ValueError if neither the model nor the caller has a template,
        jinja2's TemplateError if the template fails.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise ValueError("chat_template: this model has no chat template and none was given")
        text = render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._impl.special_tokens,
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text
