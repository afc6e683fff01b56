"""On-device token sampling: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Every request's parameters are rows of arrays (`SamplingTensors`), so one compiled `sample`
serves any mix of greedy and random requests. A row's draw depends only on its logits, seed
and step — never on its position in the batch or the batch size.

Cost model (CPU, S=64, V=49152): a full sort of the vocabulary is ~300 ms, so none is done.
- Filters are per-row thresholds, `scaled >= k-th largest` (top-k) and
  `probs >= max(nucleus floor, min_p)` (top-p, min-p), so ties at a boundary are all kept.
- `lax.cond` skips the threshold search when no row uses top-k/top-p, and skips random
  sampling when every row is greedy.
- Thresholds come from `lax.top_k` over `_NUM_CANDIDATES` candidates when each row's top-k
  and nucleus fit in them (the usual case); otherwise from an exact 30-32 step bisection
  over float bit patterns (one compare-and-sum pass over [S, V] per step, ~1 ms each).
- The draw is inverse-CDF with one uniform per row (drawing V Gumbels per row costs ~100 ms):
  block sums pick a `_CDF_BLOCK`-wide block, a cumsum inside it picks the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jpaged.sampling_params import SAMPLING_EPS
from jpaged.sampling_tensors import SamplingTensors
from pallas_kernels import sampling_cpu

_NUM_CANDIDATES = 128  # top-k/top-p candidate set before falling back to bisection
_CDF_BLOCK = 256  # vocabulary block width of the two-level inverse CDF
_ONE_BITS = 0x3F800000  # bit pattern of float32 1.0


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    """Chosen tokens and their logprobs under the raw model distribution (log_softmax of logits)."""

    token_ids: jax.Array  # [S] i32
    logprob: jax.Array  # [S] f32, raw logprob of token_ids
    rank: jax.Array  # [S] i32, 1-based: number of tokens with raw logprob >= the chosen one's
    top_token_ids: jax.Array  # [S, K] i32, K = num_logprobs (0 -> [S, 0])
    top_logprobs: jax.Array  # [S, K] f32, raw logprobs, descending


def _scatter_ids(ids: jax.Array, vocab_size: int, values: jax.Array | float) -> jax.Array:
    """[S, V] f32 sum of `values` at each row's ids ([S, N], -1 padding dropped)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    ids = jnp.where(ids < 0, vocab_size, ids)  # out of range -> dropped (-1 would wrap)
    zeros = jnp.zeros((ids.shape[0], vocab_size), jnp.float32)
    return zeros.at[rows, ids].add(values, mode="drop")


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM's penalties on [S, V] logits, then -inf at banned ids.

    Repetition over prompt+output tokens (logit > 0 -> / r, else * r); then
    frequency * count and presence * [count > 0] over output tokens are subtracted.
    Work is skipped statically when the token-id tensors have width 0.
    """
    vocab_size = logits.shape[1]
    has_prompt = t.prompt_token_ids.shape[1] > 0
    has_output = t.output_token_ids.shape[1] > 0
    if has_prompt or has_output:
        counts = _scatter_ids(t.output_token_ids, vocab_size, 1.0) if has_output else None
        seen = jnp.zeros(logits.shape, bool)
        if has_prompt:
            seen = _scatter_ids(t.prompt_token_ids, vocab_size, 1.0) > 0
        if counts is not None:
            seen = seen | (counts > 0)
        rep = t.repetition_penalty[:, None]
        penalised = jnp.where(logits > 0, logits / rep, logits * rep)
        logits = jnp.where(seen, penalised, logits)
        if counts is not None:
            logits = logits - t.frequency_penalty[:, None] * counts
            logits = logits - t.presence_penalty[:, None] * (counts > 0)
    if t.banned_token_ids.shape[1] > 0:
        banned = _scatter_ids(t.banned_token_ids, vocab_size, 1.0) > 0
        logits = jnp.where(banned, -jnp.inf, logits)
    return logits


def _argmax(x: jax.Array) -> jax.Array:
    """[S, V] -> [S] i32, equal to jnp.argmax (first maximum) for NaN-free rows, ~8x faster on CPU."""
    iota = jax.lax.broadcasted_iota(jnp.float32, x.shape, 1)  # exact: V < 2**24
    is_max = x == jnp.max(x, axis=1, keepdims=True)
    return jnp.min(jnp.where(is_max, iota, x.shape[1]), axis=1).astype(jnp.int32)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k behind an optimization barrier.

    NOTE: without it XLA:CPU rewrites top_k whose outputs are sliced into a full sort
    (~500 ms instead of ~8 ms at [64, 49152]).
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(x, k))


def _order_key(x: jax.Array) -> jax.Array:
    """Order-preserving uint32 key of f32 values: a < b <=> key(a) < key(b) (-0.0 < +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _key_value(key: jax.Array) -> jax.Array:
    """Inverse of _order_key."""
    positive = (key >> 31) == 1
    return jax.lax.bitcast_convert_type(
        jnp.where(positive, key ^ jnp.uint32(0x80000000), ~key), jnp.float32
    )


# Bisections search the integer keys of float32 values but compare the floats themselves
# (XLA:CPU runs a float compare-and-sum pass ~1.5x faster than the integer one).


def _bisect_top_k(scaled: jax.Array, k: jax.Array) -> jax.Array:
    """[S] f32 k-th largest value of each row of [S, V] `scaled` (ties counted); -inf if k=0."""

    def body(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # keys; invariant: count(scaled >= value(lo)) >= k, answer in [lo, hi]
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        count = jnp.sum(jnp.where(scaled >= _key_value(mid)[:, None], 1.0, 0.0), axis=1)
        ok = count >= k  # exact: counts < 2**24
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = _order_key(jnp.min(scaled, axis=1))
    hi = _order_key(jnp.max(scaled, axis=1))
    lo = jax.lax.fori_loop(0, 32, body, (lo, hi))[0]
    return jnp.where(k > 0, _key_value(lo), -jnp.inf)


def _bisect_top_p(probs: jax.Array, mass: jax.Array) -> jax.Array:
    """[S] f32 smallest p with sum(probs[probs > p]) < mass; top-p keeps probs >= p.

    probs: [S, V] in [0, 1]; non-negative floats order like their bit patterns.
    """

    def body(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # bit patterns; invariant: answer in [lo, hi]
        mid = lo + ((hi - lo) >> 1)
        mid_value = jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None]
        ok = jnp.sum(jnp.where(probs > mid_value, probs, 0.0), axis=1) < mass
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros(probs.shape[0], jnp.uint32)
    hi = jnp.full(probs.shape[0], _ONE_BITS, jnp.uint32)
    lo = jax.lax.fori_loop(0, 30, body, (lo, hi))[0]  # 2**30 > _ONE_BITS
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _filter_thresholds(
    scaled: jax.Array, probs: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Top-k then top-p (on the renormalised top-k distribution) as two [S] f32 thresholds.

    Keeps `scaled >= k_thr` and `probs >= p_thr`; top-p keeps token i iff the top-k mass of
    tokens more probable than i is < top_p * (top-k mass).
    top_k: [S] i32, 0 = off; top_p: [S] f32, 1 = off; probs: [S, V] exp(scaled - max).
    """
    num_cand = min(_NUM_CANDIDATES, scaled.shape[1])
    cand_vals, cand_ids = _top_k(scaled, num_cand)  # [S, C] descending
    k_ok = top_k <= num_cand
    k_cand = jnp.take_along_axis(cand_vals, jnp.clip(top_k - 1, 0, num_cand - 1)[:, None], 1)
    k_cand = jnp.where(top_k > 0, k_cand[:, 0], -jnp.inf)
    k_thr = jax.lax.cond(
        jnp.all(k_ok), lambda: k_cand, lambda: jnp.where(k_ok, k_cand, _bisect_top_k(scaled, top_k))
    )
    top_k_probs = jnp.where(scaled >= k_thr[:, None], probs, 0.0)  # [S, V]
    mass = top_p * jnp.sum(top_k_probs, axis=1)  # [S]
    cand_probs = jnp.take_along_axis(top_k_probs, cand_ids, 1)  # [S, C] non-increasing
    above = jnp.cumsum(cand_probs, axis=1) - cand_probs  # exclusive prefix mass
    last = jnp.sum(above < mass[:, None], axis=1) - 1  # last kept candidate (>= 0)
    p_cand = jnp.take_along_axis(cand_probs, last[:, None], 1)[:, 0]
    p_cand = jnp.where(top_p >= 1.0, 0.0, p_cand)
    # Exact when the first dropped candidate lies inside the candidate set.
    p_ok = (top_p >= 1.0) | (num_cand == scaled.shape[1]) | (above[:, -1] >= mass)
    p_thr = jax.lax.cond(
        jnp.all(p_ok),
        lambda: p_cand,
        lambda: jnp.where(p_ok, p_cand, _bisect_top_p(top_k_probs, mass)),
    )
    return k_thr, p_thr


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Token drawn from unnormalised [S, V] weights (>= 0, each row some > 0) at u in [0, 1).

    Only ids with weight > 0 can be returned, whatever the rounding of the prefix sums.
    """
    num_rows, vocab_size = weights.shape
    num_blocks = -(-vocab_size // _CDF_BLOCK)
    padded = jnp.pad(weights, ((0, 0), (0, num_blocks * _CDF_BLOCK - vocab_size)))
    blocks = padded.reshape(num_rows, num_blocks, _CDF_BLOCK)
    block_mass = jnp.sum(blocks, axis=2)  # [S, NB]
    block_cdf = jnp.cumsum(block_mass, axis=1)
    target = u * block_cdf[:, -1]
    block = _first_above(block_cdf, block_mass, target)  # [S]
    before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], 1)[:, 0]
    chosen = jnp.take_along_axis(blocks, block[:, None, None], 1)[:, 0]  # [S, BLOCK]
    inner = _first_above(jnp.cumsum(chosen, axis=1), chosen, target - before)
    return (block * _CDF_BLOCK + inner).astype(jnp.int32)


def _first_above(cdf: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
    """[S] first index with cdf > target and mass > 0; else the last index with mass > 0."""
    iota = jax.lax.broadcasted_iota(jnp.int32, cdf.shape, 1)
    width = cdf.shape[1]
    first = jnp.min(jnp.where((cdf > target[:, None]) & (mass > 0), iota, width), axis=1)
    last_positive = jnp.max(jnp.where(mass > 0, iota, -1), axis=1)
    return jnp.where(first < width, first, last_positive)


def sampling_weights(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """[S, V] unnormalised probabilities that each non-greedy row draws from.

    Temperature, then top-k, top-p (on the renormalised top-k distribution), min-p
    (p >= min_p * p_max); filtered tokens get 0. `logits` are the penalised logits.
    """
    vocab_size = logits.shape[1]
    greedy = t.temperature < SAMPLING_EPS
    temperature = jnp.where(greedy, 1.0, t.temperature)[:, None]
    top_k = jnp.where(greedy | (t.top_k >= vocab_size), 0, jnp.maximum(t.top_k, 0))
    top_p = jnp.where(greedy, 1.0, t.top_p)

    def scaled_probs() -> tuple[jax.Array, jax.Array]:
        # NOTE: called inside and after the cond rather than passed into it: cond operands
        # must be materialised ([S, V] each, ~4 ms apiece at S=64), recomputing them fuses.
        scaled = logits / temperature
        probs = jnp.exp(scaled - jnp.max(scaled, axis=1, keepdims=True))  # [S, V], max = 1
        return scaled, probs

    k_thr, p_thr = jax.lax.cond(
        jnp.any((top_k > 0) | (top_p < 1.0)),
        lambda: _filter_thresholds(*scaled_probs(), top_k, top_p),
        lambda: (jnp.full(top_k.shape, -jnp.inf), jnp.zeros(top_k.shape)),
    )
    scaled, probs = scaled_probs()
    keep = (scaled >= k_thr[:, None]) & (probs >= jnp.maximum(p_thr, t.min_p)[:, None])
    return jnp.where(keep, probs, 0.0)


def _draw(weights: jax.Array, t: SamplingTensors) -> jax.Array:
    """[S] ids drawn from [S, V] weights with one uniform per row from fold_in(key(seed), step)."""
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(t.seed, t.step)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    return _inverse_cdf(weights, u)


def compute_logprobs(
    logits: jax.Array, token_ids: jax.Array, num_logprobs: int, cpu_kernels: bool = False
) -> SamplerOutput:
    """Raw log_softmax logprob and rank of `token_ids` ([T] i32) under [T, V] logits, and the
    top `num_logprobs` (static) tokens. Used for sampled tokens and for prompt logprobs.
    cpu_kernels: the logsumexp and the rank come from pallas_kernels.sampling_cpu (loaded)."""
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, token_ids[:, None], 1)[:, 0]
    if cpu_kernels:
        lse, rank = sampling_cpu.row_logprob(logits, token_ids)
    else:
        lse = jax.nn.logsumexp(logits, axis=1)  # [T]
        rank = jnp.sum(logits >= chosen[:, None], axis=1, dtype=jnp.int32)
    if num_logprobs > 0:
        top_vals, top_ids = _top_k(logits, num_logprobs)
    else:
        top_vals = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SamplerOutput(
        token_ids=token_ids.astype(jnp.int32),
        logprob=chosen - lse,
        rank=rank,
        top_token_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_vals - lse[:, None],
    )


def penalty_free(t: SamplingTensors) -> bool:
    """Statically: no row of `t` has penalties or banned ids (the logits are used raw)."""
    ids = (t.prompt_token_ids, t.output_token_ids, t.banned_token_ids)
    return all(a.shape[1] == 0 for a in ids)


def greedy_without_logprobs(t: SamplingTensors) -> jax.Array:
    """Traced bool: every row is greedy and none wants its logprob (see wants_logprob)."""
    return jnp.all(t.temperature < SAMPLING_EPS) & ~jnp.any(t.want_logprob)


def ids_only_output(token_ids: jax.Array) -> SamplerOutput:
    """A SamplerOutput of ids alone, for rows that use no logprob (logprob 0, rank 1);
    greedy or sampled."""
    s = token_ids.shape[0]
    return SamplerOutput(
        token_ids=token_ids.astype(jnp.int32),
        logprob=jnp.zeros(s, jnp.float32),
        rank=jnp.ones(s, jnp.int32),
        top_token_ids=jnp.zeros((s, 0), jnp.int32),
        top_logprobs=jnp.zeros((s, 0), jnp.float32),
    )


def sample(
    logits: jax.Array, t: SamplingTensors, num_logprobs: int, cpu_kernels: bool = False
) -> SamplerOutput:
    """Next token per row from [S, V] logits; `num_logprobs` is static (0 or K).

    Greedy rows take the first argmax of the penalised logits; other rows draw with key
    fold_in(key(seed), step). Logprobs are of the raw (unpenalised, untempered) logits, computed
    only when num_logprobs > 0 or a row wants its logprob (else 0, rank 1).
    cpu_kernels: the argmax and the logprob reductions run as pallas_kernels.sampling_cpu's
    C++ kernels (loaded; same ids and ranks, logprobs equal up to summation order).
    """
    logits = logits.astype(jnp.float32)
    penalised = apply_penalties(logits, t)
    greedy_ids = sampling_cpu.row_argmax(penalised) if cpu_kernels else _argmax(penalised)
    greedy = t.temperature < SAMPLING_EPS
    token_ids = jax.lax.cond(
        jnp.all(greedy),
        lambda: greedy_ids,
        lambda: jnp.where(greedy, greedy_ids, _draw(sampling_weights(penalised, t), t)),
    )
    # NaN weights (e.g. extreme penalties) must never yield an id outside the vocabulary
    token_ids = jnp.clip(token_ids, 0, logits.shape[1] - 1)
    if num_logprobs > 0:
        return compute_logprobs(logits, token_ids, num_logprobs, cpu_kernels)
    return jax.lax.cond(  # the logsumexp over the vocabulary only where a row uses it
        jnp.any(t.want_logprob),
        lambda: compute_logprobs(logits, token_ids, 0, cpu_kernels),
        lambda: ids_only_output(token_ids),
    )
