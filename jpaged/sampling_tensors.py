"""Per-request sampling parameters as rows of arrays (`SamplingTensors`), built on the host
from each running sequence's `SamplingRow`; jpaged.sampler consumes them on device. Token-id
tensors are padded to power-of-two widths so the set of compiled shapes stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jpaged.sampling_params import SamplingParams

_MIN_BUCKET = 16  # smallest padded width of the token-id tensors


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters; S = padded number of sampling rows."""

    temperature: jax.Array  # [S] f32, < SAMPLING_EPS -> greedy
    top_p: jax.Array  # [S] f32, 1.0 -> off
    top_k: jax.Array  # [S] i32, 0 -> off
    min_p: jax.Array  # [S] f32, 0 -> off
    presence_penalty: jax.Array  # [S] f32
    frequency_penalty: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32, 1.0 -> off
    seed: jax.Array  # [S] u32, one per row (the engine draws one for unseeded requests)
    step: jax.Array  # [S] i32, tokens generated so far; PRNG key = fold_in(key(seed), step)
    prompt_token_ids: jax.Array  # [S, P] i32 padded with -1; P = 0 when no repetition penalty
    output_token_ids: jax.Array  # [S, O] i32 padded with -1; O = 0 when no penalty at all
    banned_token_ids: jax.Array  # [S, B] i32 padded with -1: stop ids before min_tokens
    want_logprob: jax.Array  # [S] bool: the row's request uses its sampled logprob


@dataclass(slots=True)
class SamplingRow:
    """Host-side description of one sampling row (one sequence's next token).

    For n > 1 the engine gives each sample its own seed. `eos_token_ids` are banned, with
    `params.stop_token_ids`, while `step < params.min_tokens` (not EOS if `ignore_eos`).
    """

    params: SamplingParams
    seed: int
    step: int
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: Sequence[int] = ()


def _bucket(n: int) -> int:
    """Padded width for n token ids: 0 stays 0, else a power of two >= _MIN_BUCKET."""
    return 0 if n == 0 else max(_MIN_BUCKET, 1 << (n - 1).bit_length())


def _pad_ids(lists: Sequence[Sequence[int]], num_rows: int) -> np.ndarray:
    width = _bucket(max((len(ids) for ids in lists), default=0))
    out = np.full((num_rows, width), -1, np.int32)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = ids
    return out


def build_sampling_tensors(rows: Sequence[SamplingRow], num_rows_padded: int) -> SamplingTensors:
    """Host (numpy) tensors for `rows`, padded to `num_rows_padded` greedy, penalty-free rows.

    Token-id widths P, O, B are bucketed (0, or powers of two >= 16) to bound compilations.
    Raises ValueError if there are more rows than `num_rows_padded`.
    """
    s = num_rows_padded
    if len(rows) > s:
        raise ValueError(f"num_rows_padded must be >= len(rows)={len(rows)}, got {s}")
    temperature = np.zeros(s, np.float32)
    top_p = np.ones(s, np.float32)
    top_k = np.zeros(s, np.int32)
    min_p = np.zeros(s, np.float32)
    presence = np.zeros(s, np.float32)
    frequency = np.zeros(s, np.float32)
    repetition = np.ones(s, np.float32)
    seed = np.zeros(s, np.uint32)
    step = np.zeros(s, np.int32)
    want_logprob = np.zeros(s, bool)
    prompts: list[Sequence[int]] = []
    outputs: list[Sequence[int]] = []
    banned: list[list[int]] = []
    for i, row in enumerate(rows):
        p = row.params
        if not p.is_greedy:
            temperature[i] = p.temperature
            top_p[i], top_k[i], min_p[i] = p.top_p, min(p.top_k, 2**31 - 1), p.min_p
        presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
        repetition[i] = p.repetition_penalty
        seed[i] = row.seed % (1 << 32)
        step[i] = row.step
        want_logprob[i] = wants_logprob(p)
        prompts.append(row.prompt_token_ids if p.repetition_penalty != 1.0 else ())
        any_penalty = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        outputs.append(row.output_token_ids if any_penalty else ())
        stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(row.eos_token_ids))
        banned.append(stops if row.step < p.min_tokens else [])
    return SamplingTensors(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        seed=seed,
        step=step,
        prompt_token_ids=_pad_ids(prompts, s),
        output_token_ids=_pad_ids(outputs, s),
        banned_token_ids=_pad_ids(banned, s),
        want_logprob=want_logprob,
    )


def wants_logprob(params: SamplingParams) -> bool:
    """Whether a request uses its sampled tokens' logprobs: it asks for logprobs, or it has
    n > 1 samples (best_of ranks them by cumulative logprob). As in vLLM, the others'
    cumulative_logprob is None."""
    return params.logprobs is not None or params.n > 1
