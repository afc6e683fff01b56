"""Workload W (the Engine issue): 64 requests, seeded prompt and output lengths."""

from __future__ import annotations

import numpy as np

VOCAB = 49152


def workload_w(
    num_requests: int = 64, vocab_size: int = VOCAB
) -> tuple[list[list[int]], list[int]]:
    """(prompts as token ids, output lengths); greedy, ignore_eos, max_tokens = output length."""
    rng = np.random.default_rng(0)
    prompt_lens = rng.integers(16, 257, num_requests)
    output_lens = rng.integers(16, 257, num_requests)
    prompts = [rng.integers(100, vocab_size - 100, int(n)).tolist() for n in prompt_lens]
    return prompts, [int(n) for n in output_lens]
