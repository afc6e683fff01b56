"""Workload W (the Engine issue): 64 requests, seeded prompt and output lengths."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class RoundRun:
    round: int
    engine: str
    seconds: float
    tokens: int
    outputs_sha256: str  # of the output ids, 16 hex digits


def interleaved_w_rounds(engines: dict[str, Any], rounds: int) -> Iterator[RoundRun]:
    """Run W greedily on every `jpaged.LLM` of `engines`, `rounds` times, the order reversed
    every other round and every prompt's first token shifted per round (so the prefix cache
    never serves a round from the one before); yields each run as it ends."""
    from jpaged.sampling_params import SamplingParams

    prompts, out_lens = workload_w()
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    for r in range(rounds):
        shifted = [[(p[0] + 7 * (r + 1)) % VOCAB] + p[1:] for p in prompts]
        for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            t0 = time.perf_counter()
            outs = engines[name].generate(shifted, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            ids = [list(o.outputs[0].token_ids) for o in outs]
            sha = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
            yield RoundRun(r, name, dt, sum(map(len, ids)), sha)
