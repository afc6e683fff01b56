"""Streaming detokenization of generated ids, and stop-string detection on the streamed text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded before the first output token, so that the first output token's
# leading space (SentencePiece "▁x", WordPiece "##x") is rendered as it is after the prompt.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas, O(1) amortised per token.

    Each `append` decodes only a small window: the tokens from `prefix_offset` (start of
    the last emitted chunk) to the end, minus the text of the tokens up to `read_offset`
    (end of the last emitted chunk). Text ending in U+FFFD is held back until the rest of
    its UTF-8 bytes arrive; `flush()` releases whatever is left when the sequence ends.

    Invariant: the concatenated deltas after `flush()` equal
    `tokenizer.decode(output_ids, skip_special_tokens=...)` for byte-level BPE tokenizers;
    for tokenizers that strip a leading space at the start of a text (SentencePiece), the
    first delta keeps the space the token has after the prompt, as vLLM does.
    No `clean_up_tokenization_spaces` post-processing is applied (it is not incremental).

    spaces_between_special_tokens=False (with skip_special_tokens=False) emits an added
    token that directly follows another added token as its bare content, without any
    separator the tokenizer's decoder would put between them.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        # `tokenizer` is a transformers PreTrainedTokenizerFast (or a `tokenizers.Tokenizer`).
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._skip_special_tokens = skip_special_tokens
        # token id -> content of added tokens, only needed to suppress separators.
        self._added_contents: dict[int, str] = {}
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added_contents = {
                token_id: added.content
                for token_id, added in self._backend.get_added_tokens_decoder().items()
            }
        context = [int(t) for t in prompt_token_ids[-_CONTEXT_TOKENS:]]
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes are not the output's to finish.
            context = []
        self._token_ids: list[int] = context  # context, then every output token
        self._num_context = len(context)
        self._prefix_offset = 0  # window start: first token of the last emitted chunk
        self._read_offset = len(context)  # tokens before this are already emitted
        self._pieces: list[str] = []  # emitted deltas, joined lazily by output_text

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[self._num_context :]

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenated deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def append(self, token_id: int) -> str:
        """Add one generated token; return the newly completed text (may be "")."""
        self._token_ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Release held-back text (an incomplete character decodes as U+FFFD). Call at the end."""
        if self._read_offset == len(self._token_ids):
            return ""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        ids = self._token_ids
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        if not final and (
            len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
        ):
            # Nothing visible yet (skipped special token) or a character is still incomplete.
            # Keep the window so the next decode sees the same context.
            return ""
        delta = new_text[len(prefix_text) :]
        if self._added_contents and len(ids) - self._read_offset == 1 and len(ids) >= 2:
            content = self._added_contents.get(ids[-1])
            if content is not None and ids[-2] in self._added_contents:
                delta = content
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        if delta:
            self._pieces.append(delta)
        return delta


def check_stop(
    text: str, new_delta_len: int, stop: Sequence[str], include_stop_str_in_output: bool
) -> tuple[int | None, str | None]:
    """Find a stop string completed by the last `new_delta_len` characters of `text`.

    Only matches that end inside the new characters are searched for (the text before
    was checked already), so the scan is O(new_delta_len + longest stop string).
    Among several, the match that ends first wins (then the one that starts first), which
    makes the result independent of how the text was split into deltas.
    Returns (truncate_to, stop_str): the output text is `text[:truncate_to]` — the match
    and what follows are cut, the match itself kept when include_stop_str_in_output —
    or (None, None) when no stop string completed.
    """
    best: tuple[int, int, str] | None = None  # (match end, match start, stop string)
    for stop_str in stop:
        start = max(0, len(text) - new_delta_len - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index < 0:
            continue
        candidate = (index + len(stop_str), index, stop_str)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None:
        return None, None
    end, index, stop_str = best
    return (end if include_stop_str_in_output else index), stop_str


def stop_holdback(text: str, stop: Sequence[str], include_stop_str_in_output: bool) -> int:
    """How many trailing characters of `text` to hold back from streaming.

    They are the longest suffix of `text` that is a proper prefix of a stop string: if the
    stop string completes, it is cut, so it must never have been shown. The shown length
    `len(text) - stop_holdback(...)` never decreases as text grows, and never exceeds the
    cut that `check_stop` makes later. 0 when stop strings stay in the output.
    """
    if include_stop_str_in_output:
        return 0
    held = 0
    for stop_str in stop:
        for length in range(min(len(stop_str) - 1, len(text)), held, -1):
            if text.endswith(stop_str[:length]):
                held = length
                break
    return held
