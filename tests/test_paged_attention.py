"""Tests for pallas_kernels.paged_attention_xla: write_kv, paged_attention and its reference.

Ground truth is causal attention per sequence over contiguous K/V in numpy float64, rebuilt
independently of the pool from the pages written before the step plus this step's new K/V.
Tolerances (elementwise, vs float64): f32 rtol = atol = 1e-5; bf16 inputs (exactly
representable in f64) rtol 5e-3 (one bf16 rounding of the output is 2**-8 relative), atol 1e-5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels import paged_attention, paged_attention_reference, write_kv

TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 5e-3, "atol": 1e-5}}
NUM_LAYERS, LAYER = 2, 1


def dense_causal_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, scale: float
) -> np.ndarray:
    """One sequence, float64. q: [Q, H, D]; k, v: [C, KV, D] (positions 0..C-1);
    q_positions: [Q] (-1 = padding query, output 0). Query at p sees keys 0..p. -> [Q, H, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [C, H, D]
    out = np.zeros(q.shape, np.float64)
    for i, pos in enumerate(q_positions):
        if pos < 0:
            continue
        scores = scale * np.einsum("hd,chd->hc", q[i], k[: pos + 1])
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[i] = np.einsum("hc,chd->hd", probs / probs.sum(axis=1, keepdims=True), v[: pos + 1])
    return out


@dataclasses.dataclass
class Case:
    """A step: the pool before it, this step's new K/V and queries, and the expected output."""

    kv_pool: jax.Array  # [L, NB, 2, bs, KV, D], slots past each context and block 0 are NaN
    k_new: jax.Array  # [T, KV, D], tokens in shuffled order, padding tokens included
    v_new: jax.Array  # [T, KV, D]
    slot_mapping: jax.Array  # [T]
    q: jax.Array  # [S, Q, H, D]
    block_tables: jax.Array  # [S, W]
    seq_lens: jax.Array  # [S]
    q_positions: jax.Array  # [S, Q]
    expected: np.ndarray  # [S, Q, H, D] float64
    scale: float


def make_case(
    rng: np.random.Generator,
    seqs: list[tuple[int, int]],
    *,
    block_size: int,
    head_dim: int,
    num_kv_heads: int,
    group: int,
    dtype: str,
    extra_columns: int = 1,
    num_padding_tokens: int = 3,
    spare_blocks: int = 5,
) -> Case:
    """seqs: (context_len including this step's tokens, new tokens this step); (0, 0) = padding."""
    num_heads, scale, dtype = num_kv_heads * group, head_dim**-0.5, jnp.dtype(dtype)
    pages = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = 1 + sum(pages) + spare_blocks  # spare blocks stay untouched
    width = max(pages) + extra_columns
    q_len = max(1, max(new for _, new in seqs))
    shape = (NUM_LAYERS, num_blocks, 2, block_size, num_kv_heads, head_dim)
    pool = rng.standard_normal(shape).astype(dtype)
    pool[:, 0] = np.nan  # block 0 is garbage; so is every slot past a sequence's context
    free = iter(1 + rng.permutation(num_blocks - 1))  # shuffled, never block 0
    block_tables = np.zeros((len(seqs), width), np.int32)
    q_positions = np.full((len(seqs), q_len), -1, np.int32)
    q = rng.standard_normal((len(seqs), q_len, num_heads, head_dim)).astype(dtype)
    expected = np.zeros(q.shape, np.float64)
    k_new, v_new, slots = [], [], []
    for s, (ctx, new) in enumerate(seqs):
        block_tables[s, : pages[s]] = [next(free) for _ in range(pages[s])]
        positions = np.arange(ctx)
        blocks, offsets = block_tables[s, positions // block_size], positions % block_size
        tail = np.arange(ctx, pages[s] * block_size)
        pool[LAYER, block_tables[s, tail // block_size], :, tail % block_size] = np.nan
        k_ctx = pool[LAYER, blocks, 0, offsets].copy()  # [ctx, KV, D]
        v_ctx = pool[LAYER, blocks, 1, offsets].copy()
        k_ctx[ctx - new :] = rng.standard_normal((new, num_kv_heads, head_dim))
        v_ctx[ctx - new :] = rng.standard_normal((new, num_kv_heads, head_dim))
        pool[LAYER, blocks[ctx - new :], :, offsets[ctx - new :]] = np.nan  # not written yet
        k_new.append(k_ctx[ctx - new :])
        v_new.append(v_ctx[ctx - new :])
        slots.append(blocks[ctx - new :] * block_size + offsets[ctx - new :])
        q_positions[s, :new] = positions[ctx - new :]
        expected[s] = dense_causal_attention(q[s], k_ctx, v_ctx, q_positions[s], scale)
    # Padding tokens write into block 0 (they may collide).
    pad_kv = rng.standard_normal((2, num_padding_tokens, num_kv_heads, head_dim)).astype(dtype)
    k_new.append(pad_kv[0])
    v_new.append(pad_kv[1])
    slots.append(rng.integers(0, block_size, num_padding_tokens))
    order = rng.permutation(sum(len(x) for x in slots))
    return Case(
        kv_pool=jnp.asarray(pool),
        k_new=jnp.asarray(np.concatenate(k_new)[order]),
        v_new=jnp.asarray(np.concatenate(v_new)[order]),
        slot_mapping=jnp.asarray(np.concatenate(slots)[order].astype(np.int32)),
        q=jnp.asarray(q),
        block_tables=jnp.asarray(block_tables),
        seq_lens=jnp.asarray([ctx for ctx, _ in seqs], jnp.int32),
        q_positions=jnp.asarray(q_positions),
        expected=expected,
        scale=scale,
    )


def random_seqs(rng: np.random.Generator, num_seqs: int, max_new: int) -> list[tuple[int, int]]:
    """A mixed batch: decode tokens, prefill chunks starting mid-context, padding sequences."""
    seqs = []
    for _ in range(num_seqs):
        kind = rng.choice(["decode", "prefill", "padding"], p=[0.45, 0.4, 0.15])
        ctx = int(rng.integers(1, 301))
        if kind == "padding":
            seqs.append((0, 0))
        elif kind == "decode" or max_new == 1:
            seqs.append((ctx, 1))
        else:
            seqs.append((ctx, int(rng.integers(1, min(max_new, ctx) + 1))))
    seqs[int(rng.integers(num_seqs))] = (300, min(max_new, 37))  # a long one, partial last block
    return seqs


def attend(case: Case, fn=paged_attention, **kwargs) -> np.ndarray:
    kv_pool = write_kv(case.kv_pool, jnp.int32(LAYER), case.k_new, case.v_new, case.slot_mapping)
    args = (case.q, kv_pool, jnp.int32(LAYER), case.block_tables, case.seq_lens)
    out = fn(*args, case.q_positions, scale=case.scale, **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    return np.asarray(out.astype(jnp.float32))


def check(case: Case, out: np.ndarray, dtype: str) -> None:
    assert np.isfinite(out).all()
    padding = np.asarray(case.q_positions) < 0  # [S, Q]
    assert (out[padding] == 0).all()  # exactly zero
    np.testing.assert_allclose(out[~padding], case.expected[~padding], **TOL[dtype])


CONFIGS = [  # (seed, block_size, head_dim, num_kv_heads, group, dtype, num_seqs, max_new)
    (0, 8, 16, 2, 1, "float32", 5, 64),
    (1, 16, 64, 2, 4, "float32", 4, 64),
    (2, 32, 16, 3, 2, "float32", 6, 40),
    (3, 16, 16, 3, 3, "float32", 7, 1),  # a pure decode batch, Q = 1
    (4, 8, 64, 1, 2, "float32", 3, 24),
    (5, 16, 64, 3, 3, "bfloat16", 5, 48),
    (6, 32, 16, 2, 4, "bfloat16", 4, 64),
]


@pytest.mark.parametrize(("seed", "bs", "d", "kv", "g", "dtype", "n", "max_new"), CONFIGS)
def test_paged_attention_matches_dense(seed, bs, d, kv, g, dtype, n, max_new):
    rng = np.random.default_rng(seed)
    case = make_case(
        rng, random_seqs(rng, n, max_new), block_size=bs, head_dim=d, num_kv_heads=kv,
        group=g, dtype=dtype,
    )  # fmt: skip
    for pages_per_tile in (1, 3, None):  # 3 does not divide W; None = ~64-token tiles
        check(case, attend(case, pages_per_tile=pages_per_tile), dtype)
    check(case, attend(case, paged_attention_reference), dtype)


def test_padding_sequences_and_queries_are_exactly_zero():
    rng = np.random.default_rng(7)
    seqs = [(0, 0), (20, 1), (0, 0), (33, 5)]
    case = make_case(rng, seqs, block_size=8, head_dim=16, num_kv_heads=2, group=2, dtype="float32")
    for fn in (paged_attention, paged_attention_reference):
        out = attend(case, fn)
        assert (out[[0, 2]] == 0).all() and (out[1, 1:] == 0).all()
        assert np.abs(out[1, 0]).min() > 0 and np.isfinite(out).all()
    # A batch of padding only: zero trips through the tile loop.
    case = make_case(rng, [(0, 0)] * 3, block_size=8, head_dim=16, num_kv_heads=2, group=1,
                     dtype="float32")  # fmt: skip
    assert (attend(case) == 0).all()


def test_write_kv_writes_exactly_the_slots():
    rng = np.random.default_rng(11)
    num_layers, num_blocks, block_size, kv, d = 3, 12, 4, 2, 8
    pool = rng.standard_normal((num_layers, num_blocks, 2, block_size, kv, d)).astype(np.float32)
    real_slots = rng.choice(np.arange(block_size, num_blocks * block_size), 9, replace=False)
    slots = np.concatenate([real_slots, [0, 2, 2]]).astype(np.int32)  # padding collides in block 0
    k, v = rng.standard_normal((2, len(slots), kv, d)).astype(np.float32)
    for dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        before = np.asarray(jnp.asarray(pool, dtype).astype(jnp.float32))
        out = write_kv(jnp.asarray(pool, dtype), jnp.int32(2), jnp.asarray(k), jnp.asarray(v),
                       jnp.asarray(slots))  # fmt: skip
        assert out.dtype == dtype and out.shape == pool.shape
        expected = before.copy()
        blocks, offsets = real_slots // block_size, real_slots % block_size
        expected[2, blocks, 0, offsets] = np.asarray(jnp.asarray(k[:9], dtype), np.float32)
        expected[2, blocks, 1, offsets] = np.asarray(jnp.asarray(v[:9], dtype), np.float32)
        got = np.asarray(out.astype(jnp.float32))
        np.testing.assert_array_equal(got[:, 1:], expected[:, 1:])
        np.testing.assert_array_equal(got[:2, 0], expected[:2, 0])  # other layers' block 0
        assert not np.array_equal(got[2, 1:], before[2, 1:])


def test_scan_over_layers_updates_donated_pool_in_place():
    rng = np.random.default_rng(5)
    seqs = [(40, 1), (17, 1), (0, 0), (64, 1)]
    case = make_case(rng, seqs, block_size=8, head_dim=16, num_kv_heads=2, group=2,
                     dtype="float32", num_padding_tokens=0, spare_blocks=500)  # fmt: skip
    num_layers = case.kv_pool.shape[0]
    k_layers = jnp.stack([-case.k_new, case.k_new])  # [L, T, KV, D]; layer 1 is the case
    meta = (case.block_tables, case.seq_lens, case.q_positions)

    def step(kv_pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        def layer_step(pool: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
            pool = write_kv(pool, layer, k_layers[layer], case.v_new, case.slot_mapping)
            return pool, paged_attention(case.q, pool, layer, *meta, scale=case.scale)

        return lax.scan(layer_step, kv_pool, jnp.arange(num_layers, dtype=jnp.int32))

    jitted = jax.jit(step, donate_argnums=0)
    memory = jitted.lower(case.kv_pool).compile().memory_analysis()
    assert memory.alias_size_in_bytes == case.kv_pool.nbytes  # the output pool is the input
    assert memory.temp_size_in_bytes < case.kv_pool.nbytes // 4  # no copy of the pool inside
    pool_in = case.kv_pool.copy()
    want_pool, want_outs = pool_in, []
    for layer in range(num_layers):
        want_pool = write_kv(want_pool, jnp.int32(layer), k_layers[layer], case.v_new,
                             case.slot_mapping)  # fmt: skip
        want_outs.append(paged_attention(case.q, want_pool, jnp.int32(layer), *meta,
                                         scale=case.scale))  # fmt: skip
    got_pool, got_outs = jitted(case.kv_pool)
    np.testing.assert_array_equal(np.asarray(got_pool), np.asarray(want_pool))
    np.testing.assert_array_equal(np.asarray(got_outs), np.asarray(jnp.stack(want_outs)))
    check(case, np.asarray(got_outs[LAYER]), "float32")


def test_bad_shapes_raise_value_error_naming_the_field():
    rng = np.random.default_rng(3)
    case = make_case(rng, [(9, 2), (4, 1)], block_size=4, head_dim=8, num_kv_heads=2, group=2,
                     dtype="float32")  # fmt: skip
    layer = jnp.int32(LAYER)
    good = dict(q=case.q, kv_pool=case.kv_pool, layer=layer, block_tables=case.block_tables,
                seq_lens=case.seq_lens, q_positions=case.q_positions)  # fmt: skip
    bad = {  # field: (bad value, expected message start)
        "q": (case.q[..., :3, :], r"q heads \(3\)"),  # 3 query heads over 2 kv heads
        "kv_pool": (case.kv_pool[:, :, :1], "kv_pool must be"),
        "layer": (jnp.zeros(2, jnp.int32), "layer must be"),
        "block_tables": (case.block_tables[:1], "block_tables must be"),
        "seq_lens": (case.seq_lens[:, None], "seq_lens must be"),
        "q_positions": (case.q_positions[:, :1], "q_positions must be"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            paged_attention(**{**good, field: value}, scale=1.0)
    with pytest.raises(ValueError, match="pages_per_tile"):
        paged_attention(**good, scale=1.0, pages_per_tile=0)
    k = case.k_new
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(case.kv_pool, layer, k, case.v_new, case.slot_mapping[1:])
    with pytest.raises(ValueError, match="k must be"):
        write_kv(case.kv_pool, layer, k[..., :4], case.v_new[..., :4], case.slot_mapping)
