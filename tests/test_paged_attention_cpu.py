"""Tests for pallas_kernels.paged_attention_cpu (the C++ FFI kernel, the `cpu` backend).

Same cases and float64 ground truth as tests/test_paged_attention.py: shuffled block tables,
NaN in block 0 and in every slot past a context, partial last pages, decode tokens mixed
with prefill chunks and padding. Tolerances (vs float64): f32 and f16/bf16 queries as there;
fp8 pools are compared with the dense attention of the fp8-rounded K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.paths import kernels_cache_dir
from pallas_kernels import cpu_build, paged_attention, paged_attention_cpu, write_kv
from tests.test_paged_attention import (
    LAYER,
    attend,
    check,
    make_case,
    random_seqs,
)

pytestmark = pytest.mark.skipif(
    not paged_attention_cpu.load(kernels_cache_dir()), reason="no C++ compiler on this machine"
)
kernel = paged_attention_cpu.paged_attention_cpu

CONFIGS = [  # (seed, block_size, head_dim, num_kv_heads, group, dtype, num_seqs, max_new)
    (0, 8, 16, 2, 1, "float32", 5, 64),
    (1, 16, 64, 2, 4, "float32", 4, 64),
    (2, 32, 128, 1, 8, "float32", 3, 40),
    (3, 16, 64, 3, 3, "float32", 9, 1),  # a pure decode batch, Q = 1, SmolLM2's heads
    (4, 64, 64, 1, 2, "float32", 3, 24),
    (5, 16, 64, 3, 3, "bfloat16", 5, 48),
    (6, 32, 16, 2, 4, "bfloat16", 4, 64),
    # bf16 with head_dim % 32 == 0 runs on AMX tiles where the CPU has them: 8-token pages
    # (a 32-key block spans pages), 16+ query rows per item (several row blocks), D = 128
    (7, 8, 64, 2, 8, "bfloat16", 5, 40),
    (8, 64, 128, 1, 4, "bfloat16", 4, 33),
    (9, 16, 32, 3, 3, "bfloat16", 9, 1),
    # decode batches of 20+ tiles: the non-AMX kernel's items then take all of a tile's kv heads
    (10, 16, 64, 3, 3, "float32", 24, 1),
    (11, 16, 64, 3, 3, "bfloat16", 24, 1),
]


@pytest.mark.parametrize(("seed", "bs", "d", "kv", "g", "dtype", "n", "max_new"), CONFIGS)
def test_cpu_kernel_matches_dense(seed, bs, d, kv, g, dtype, n, max_new):
    rng = np.random.default_rng(seed)
    case = make_case(
        rng, random_seqs(rng, n, max_new), block_size=bs, head_dim=d, num_kv_heads=kv,
        group=g, dtype=dtype,
    )  # fmt: skip
    out = attend(case, kernel)
    check(case, out, dtype)
    # and it agrees with the xla backend on the same pool (bf16: up to one output rounding)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(out, attend(case, paged_attention), rtol=tol, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_context_decode_and_chunk(dtype):
    rng = np.random.default_rng(9)
    seqs = [(2048, 1), (1, 1), (1500, 32), (0, 0), (777, 1)]
    case = make_case(rng, seqs, block_size=16, head_dim=64, num_kv_heads=2, group=4,
                     dtype=dtype)  # fmt: skip
    check(case, attend(case, kernel), dtype)


@pytest.mark.parametrize("kv_dtype", ["float16", "float8_e4m3fn", "float8_e5m2"])
def test_low_precision_pools(kv_dtype):
    """The pool in f16 / fp8: equal to dense attention over the same rounded K/V."""
    rng = np.random.default_rng(21)
    case = make_case(rng, random_seqs(rng, 5, 24), block_size=16, head_dim=64, num_kv_heads=2,
                     group=3, dtype="float32")  # fmt: skip
    pool = write_kv(case.kv_pool, jnp.int32(LAYER), case.k_new, case.v_new, case.slot_mapping)
    low = pool.astype(kv_dtype)
    meta = (jnp.int32(LAYER), case.block_tables, case.seq_lens, case.q_positions)
    got = np.asarray(kernel(case.q, low, *meta, scale=case.scale))
    # oracle: the xla backend over the rounded pool converted back to f32 (NaN slots stay NaN
    # or become garbage; neither may be read)
    want = np.asarray(paged_attention(case.q, low.astype(jnp.float32), *meta, scale=case.scale))
    padding = np.asarray(case.q_positions) < 0
    assert np.isfinite(got).all() and (got[padding] == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_in_a_jitted_layer_scan_with_donated_pool():
    """Inside lax.scan with the pool as the carry (as the model runs it): same as eager."""
    rng = np.random.default_rng(5)
    case = make_case(rng, [(40, 1), (17, 3), (0, 0), (64, 1)], block_size=8, head_dim=16,
                     num_kv_heads=2, group=2, dtype="float32")  # fmt: skip
    meta = (case.block_tables, case.seq_lens, case.q_positions)

    def step(kv_pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        def layer_step(pool: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
            pool = write_kv(pool, layer, case.k_new, case.v_new, case.slot_mapping)
            return pool, kernel(case.q, pool, layer, *meta, scale=case.scale)

        return jax.lax.scan(layer_step, kv_pool, jnp.arange(2, dtype=jnp.int32))

    _, outs = jax.jit(step, donate_argnums=0)(case.kv_pool.copy())
    check(case, np.asarray(outs[LAYER]), "float32")


def test_bad_inputs_raise_value_error():
    rng = np.random.default_rng(3)
    case = make_case(rng, [(9, 2), (4, 1)], block_size=4, head_dim=8, num_kv_heads=2, group=2,
                     dtype="float32")  # fmt: skip
    args = (jnp.int32(LAYER), case.block_tables, case.seq_lens, case.q_positions)
    with pytest.raises(ValueError, match=r"q heads \(3\)"):
        kernel(case.q[..., :3, :], case.kv_pool, *args, scale=1.0)
    with pytest.raises(ValueError, match="q dtype"):
        kernel(case.q.astype(jnp.int32), case.kv_pool, *args, scale=1.0)
    with pytest.raises(ValueError, match="kv_pool dtype"):
        kernel(case.q, case.kv_pool.astype(jnp.int8), *args, scale=1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uninitialized_pool(dtype, monkeypatch):
    """The engine's start-up pool: allocated, not written; usable like any array once written
    (what the kernel reads of it is covered above, where unwritten slots hold NaN)."""
    shape = (2, 5, 2, 8, 3, 16)
    pool = paged_attention_cpu.uninitialized(shape, jnp.dtype(dtype))
    assert pool.shape == shape and pool.dtype == jnp.dtype(dtype)
    written = jax.jit(lambda p: p.at[1, 2].set(1.5), donate_argnums=0)(pool)
    np.testing.assert_array_equal(np.asarray(written[1, 2], np.float32), 1.5)
    monkeypatch.delitem(cpu_build._loaded, str(paged_attention_cpu.SOURCE))  # as if not built
    with pytest.raises(RuntimeError, match="not loaded"):
        paged_attention_cpu.uninitialized(shape, jnp.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("bs", "kv", "g", "q_len"), [(16, 3, 3, 4), (8, 2, 1, 8), (16, 1, 4, 2)])
def test_multi_query_tiles_equal_single_query_tiles_bitwise(dtype, bs, kv, g, q_len):
    """A query's output does not depend on how many queries share its tile: a verify step's
    4-token tile gives the bits of 4 decode steps (bf16 on AMX: the all-rows softmax for many
    rows, the per-row one for few), which speculative decoding's exactness rests on."""
    rng = np.random.default_rng(bs + kv + g + q_len)
    num_seqs, d, width = 6, 64, 40
    num_blocks = num_seqs * width + 1
    pool = rng.standard_normal((2, num_blocks, 2, bs, kv, d)).astype(np.float32)
    tables = (1 + rng.permutation(num_blocks - 1)[: num_seqs * width]).reshape(num_seqs, width)
    seq_lens = rng.integers(q_len, width * bs, num_seqs).astype(np.int32)
    seq_lens[0] = q_len  # a chunk that is its whole context
    q = rng.standard_normal((num_seqs, q_len, kv * g, d)).astype(np.float32)
    q_pos = (seq_lens[:, None] - q_len + np.arange(q_len)[None, :]).astype(np.int32)
    dt = jnp.dtype(dtype)
    pool, q = jnp.asarray(pool, dt), jnp.asarray(q, dt)
    together = kernel(q, pool, LAYER, tables, seq_lens, q_pos, scale=0.125)
    alone = kernel(
        q.reshape(num_seqs * q_len, 1, kv * g, d), pool, LAYER, np.repeat(tables, q_len, axis=0),
        np.repeat(seq_lens, q_len), q_pos.reshape(-1, 1), scale=0.125,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(together, np.float32).reshape(-1),
                                  np.asarray(alone, np.float32).reshape(-1))  # fmt: skip
