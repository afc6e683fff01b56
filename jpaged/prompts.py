"""What `add_request` accepts as a prompt, turned into (text, token ids) with the errors users see."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jpaged.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]


def tokenize_prompt(
    prompt: PromptType, tokenizer: Tokenizer, vocab_size: int
) -> tuple[str | None, list[int]]:
    """Accepts text, token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}.

    ValueError (naming the field) for an empty prompt, ids outside [0, vocab_size), or any
    other type."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), check_token_ids(prompt["prompt_token_ids"], vocab_size)
        if "prompt" in prompt:
            return tokenize_prompt(prompt["prompt"], tokenizer, vocab_size)
        raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, list | tuple):
        return None, check_token_ids(prompt, vocab_size)
    raise ValueError(f"prompt must be a string, token ids or a dict, got {type(prompt).__name__}")


def check_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """`ids` as a list; ValueError unless it is non-empty and every id is an int in range."""
    ids = list(ids)
    if not ids:
        raise ValueError("prompt must not be empty")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids must be ints in [0, {vocab_size}), got {t!r}")
    return ids
