"""Text <-> token ids and chat templates for a model directory (a transformers fast tokenizer)."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any


def _load_hf(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class Tokenizer:
    """Thin wrapper over `transformers.AutoTokenizer` (fast, Rust-backed; no torch needed)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        """`hf_tokenizer`: a transformers tokenizer, or a Future of one (see `from_dir`)."""
        self._source = hf_tokenizer
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: Path | str, *, background: bool = False) -> Tokenizer:
        """Load `tokenizer.json` / `tokenizer_config.json` from an HF model directory.

        background=True returns at once and loads on a thread (importing transformers takes
        ~1.5 s, which then overlaps the weight loading); the first use waits for it and
        raises what the load raised.
        """
        if not background:
            return cls(_load_hf(str(path)))
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def load() -> None:
            try:
                future.set_result(_load_hf(str(path)))
            except BaseException as err:  # noqa: BLE001 - handed to the first caller
                future.set_exception(err)

        threading.Thread(target=load, name="jpaged-tokenizer", daemon=True).start()
        return cls(future)

    @property
    def _hf(self) -> Any:
        if isinstance(self._source, concurrent.futures.Future):
            with self._lock:
                if isinstance(self._source, concurrent.futures.Future):
                    self._source = self._source.result()
        return self._source

    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer (for incremental detokenization)."""
        return self._hf

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self._hf)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._hf.all_special_ids)

    @property
    def chat_template(self) -> str | None:
        return getattr(self._hf, "chat_template", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the model asks for them."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) as the prompt text, or its ids.

        The ids are the encoding of the rendered text without extra special tokens (the template
        writes its own). Raises ValueError if neither the model nor the caller has a template.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise ValueError("chat_template: this model has no chat template and none was given")
        text = self._hf.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text
