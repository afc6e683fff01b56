"""The Pallas kernels (interpret mode on CPU) against the jnp reference and dense attention.

Cases come from tests/test_paged_attention.make_case: shuffled block tables, NaN in block 0
and in every slot past a context, partial last pages, padding sequences and queries. Each
case checks the kernel against float64 dense attention and against the jnp reference.

Tolerances (elementwise): f32 rtol = atol = 1e-5 (measured max |err| 6.4e-7). bf16 (inputs
exactly representable in f64) rtol = atol = 1e-2: besides the output's own bf16 rounding
(2**-8 relative), the kernel rounds the probabilities to bf16 for the PV dot, as GPU flash
attention does, an error <= 2**-9 * max|v| (~1e-2 for |v| <= 5); measured max 4.4e-3.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention_pallas as pallas
from pallas_kernels import paged_attention_reference
from pallas_kernels.kv_write_pallas import write_kv
from pallas_kernels.paged_attention_xla import write_kv as write_kv_xla
from pallas_kernels.paged_decode_pallas import default_num_splits, paged_decode_attention
from pallas_kernels.paged_ragged_pallas import ragged_paged_attention
from tests.test_paged_attention import LAYER, Case, make_case, random_seqs

TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 1e-2, "atol": 1e-2}}


def written_pool(case: Case) -> jnp.ndarray:
    """The pool after this step's K/V writes (the Pallas write kernel has its own exact test
    below and runs in the engine tests; the XLA scatter here saves a compile per case)."""
    return write_kv_xla(case.kv_pool, jnp.int32(LAYER), case.k_new, case.v_new, case.slot_mapping)


def run(case: Case, fn, pool: jnp.ndarray, **kwargs) -> np.ndarray:
    args = (case.q, pool, jnp.int32(LAYER), case.block_tables, case.seq_lens, case.q_positions)
    out = fn(*args, scale=case.scale, **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    return np.asarray(out.astype(jnp.float32))


def check(case: Case, out: np.ndarray, reference: np.ndarray, dtype: str) -> None:
    assert np.isfinite(out).all()
    padding = np.asarray(case.q_positions) < 0  # [S, Q]
    assert (out[padding] == 0).all()  # exactly zero
    np.testing.assert_allclose(out[~padding], case.expected[~padding], **TOL[dtype])
    np.testing.assert_allclose(out[~padding], reference[~padding], **TOL[dtype])


def check_kernel(case: Case, fn, dtype: str, options: list[dict]) -> None:
    pool = written_pool(case)
    reference = run(case, paged_attention_reference, pool)
    for kwargs in options:
        check(case, run(case, fn, pool, **kwargs), reference, dtype)


# Decode batches: contexts 1 (a single key), page-boundary neighbours, and up to 2048.
DECODE_CONTEXTS = [1, 7, 8, 9, 0, 300, 2048, 33]  # 0 = a padding sequence
DECODE = [  # (seed, block_size, head_dim, num_kv_heads, group, dtype, kernel options)
    (0, 8, 64, 2, 1, "float32", [{}, {"num_splits": 3}]),  # default: 8 splits of 4 tiles
    (1, 16, 128, 1, 8, "bfloat16", [{}]),
    (2, 32, 64, 3, 3, "float32", [{"num_splits": 1}]),  # SmolLM2's G = 3 (16 padded rows)
    (3, 16, 64, 2, 4, "bfloat16", [{"pages_per_tile": 1, "num_splits": 5}]),  # 16-key tiles
]


@pytest.mark.parametrize(("seed", "bs", "d", "kv", "g", "dtype", "options"), DECODE)
def test_decode_kernel_matches_dense_and_reference(seed, bs, d, kv, g, dtype, options):
    rng = np.random.default_rng(seed)
    seqs = [(ctx, 1 if ctx else 0) for ctx in rng.permutation(DECODE_CONTEXTS).tolist()]
    case = make_case(rng, seqs, block_size=bs, head_dim=d, num_kv_heads=kv, group=g,
                     dtype=dtype)  # fmt: skip
    check_kernel(case, paged_decode_attention, dtype, options)


RAGGED = [  # (seed, block_size, head_dim, num_kv_heads, group, dtype, num_seqs, max_new, options)
    (10, 8, 128, 4, 1, "float32", 5, 37, {}),  # Q = 37: padded to 64 query slots
    (11, 16, 64, 1, 8, "bfloat16", 4, 32, {}),
    (12, 32, 64, 3, 3, "bfloat16", 6, 16, {}),
    (14, 16, 128, 2, 4, "float32", 4, 24, {"pages_per_tile": 2}),  # 32-key tiles
]


@pytest.mark.parametrize(("seed", "bs", "d", "kv", "g", "dtype", "n", "max_new", "options"),
                         RAGGED)  # fmt: skip
def test_ragged_kernel_matches_dense_and_reference(seed, bs, d, kv, g, dtype, n, max_new,
                                                   options):  # fmt: skip
    """Mixed batches: decode tokens, prefill chunks starting mid-context, padding rows."""
    rng = np.random.default_rng(seed)
    seqs = random_seqs(rng, n, max_new)
    seqs[0] = (2048, min(max_new, 32))  # the last chunk of a 2k context
    seqs[1] = (1, 1)  # a one-token prompt
    case = make_case(rng, seqs, block_size=bs, head_dim=d, num_kv_heads=kv, group=g,
                     dtype=dtype)  # fmt: skip
    check_kernel(case, ragged_paged_attention, dtype, [options])


def test_model_entry_dispatches_by_query_length():
    """The model-facing entry, GQA 2: Q > 1 -> ragged kernel (a whole prompt from position 0
    next to a decode token), Q == 1 -> decode kernel."""
    rng = np.random.default_rng(20)
    for seqs in ([(40, 40), (17, 1), (0, 0), (64, 3)], [(70, 1), (5, 1)]):
        case = make_case(rng, seqs, block_size=16, head_dim=64, num_kv_heads=2, group=2,
                         dtype="float32")  # fmt: skip
        check_kernel(case, pallas.paged_attention, "float32", [{}])


def test_write_kv_kernel_equals_xla_scatter():
    rng = np.random.default_rng(21)
    num_layers, num_blocks, block_size, kv, d = 3, 12, 8, 3, 16
    shape = (num_layers, num_blocks, 2, block_size, kv, d)
    pool = rng.standard_normal(shape).astype(np.float32)
    pool[:, 0] = np.nan
    real = rng.choice(np.arange(block_size, num_blocks * block_size), 9, replace=False)
    slots = jnp.asarray(np.concatenate([real, [0, 2, 2]]).astype(np.int32))  # padding collides
    k, v = (jnp.asarray(x) for x in rng.standard_normal((2, len(slots), kv, d), np.float32))
    for dtype in (jnp.float32, jnp.bfloat16):
        before = jnp.asarray(pool, dtype)
        got = write_kv(before, jnp.int32(2), k, v, slots)
        want = write_kv_xla(before, jnp.int32(2), k, v, slots)
        assert got.dtype == before.dtype and got.shape == before.shape
        # Everything but block 0 of the written layer (padding writes race there) is equal.
        got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
        np.testing.assert_array_equal(got[:, 1:], want[:, 1:])
        np.testing.assert_array_equal(got[:2, 0], want[:2, 0])


def test_default_num_splits():
    assert default_num_splits(num_seqs=1, num_kv_heads=8, num_tiles=128) == 32  # 264 / 8
    assert default_num_splits(num_seqs=1, num_kv_heads=8, num_tiles=16) == 4  # >= 4 tiles each
    assert default_num_splits(num_seqs=64, num_kv_heads=8, num_tiles=128) == 1
    assert default_num_splits(num_seqs=2, num_kv_heads=1, num_tiles=3) == 1


def test_bad_inputs_raise_value_error_naming_the_field():
    rng = np.random.default_rng(22)
    case = make_case(rng, [(9, 2), (4, 1)], block_size=8, head_dim=16, num_kv_heads=2, group=2,
                     dtype="float32")  # fmt: skip
    layer = jnp.int32(LAYER)
    good = dict(q=case.q, kv_pool=case.kv_pool, layer=layer, block_tables=case.block_tables,
                seq_lens=case.seq_lens, q_positions=case.q_positions)  # fmt: skip
    bad = {  # field: (bad value, expected message start)
        "q": (case.q[..., :3, :], r"q heads \(3\)"),
        "kv_pool": (case.kv_pool.astype(jnp.int8), "kv_pool dtype"),
        "block_tables": (case.block_tables.astype(jnp.float32), "block_tables must be int32"),
        "seq_lens": (case.seq_lens[:1], "seq_lens must be"),
        "q_positions": (case.q_positions.astype(jnp.int16), "q_positions must be int32"),
    }
    for fn in (ragged_paged_attention, pallas.paged_attention):
        for field, (value, message) in bad.items():
            with pytest.raises(ValueError, match=message):
                fn(**{**good, field: value}, scale=1.0)
    odd = make_case(rng, [(9, 2)], block_size=8, head_dim=24, num_kv_heads=1, group=1,
                    dtype="float32")  # fmt: skip
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        ragged_paged_attention(odd.q, odd.kv_pool, layer, odd.block_tables, odd.seq_lens,
                               odd.q_positions, scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="for decode"):
        paged_decode_attention(**good, scale=1.0)
    one = dict(good, q=case.q[:, :1], q_positions=case.q_positions[:, :1])
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(**one, scale=1.0, num_splits=0)
    with pytest.raises(ValueError, match="pages_per_tile"):
        paged_decode_attention(**one, scale=1.0, pages_per_tile=3)
    with pytest.raises(ValueError, match="pages_per_tile"):
        ragged_paged_attention(**good, scale=1.0, pages_per_tile=1)  # 8 keys < 16
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(case.kv_pool, layer, case.k_new, case.v_new, case.slot_mapping.astype(jnp.int16))
