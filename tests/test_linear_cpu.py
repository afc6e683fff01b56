"""pallas_kernels/linear_cpu.py: the packed-weight matmul kernels (f32 on AVX-512 / AVX2, bf16 on AMX / AVX2)
against float32/float64 numpy, and the model with its linears on them against plain dots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.kv_pool import allocate_kv_pool
from jpaged.model_runner import ModelRunner, StepSeq
from jpaged.paths import kernels_cache_dir
from jpaged.step_shapes import step_shape
from models.config import tiny_llama_config
from models.llama import llama_forward, llama_from_hf_tensors
from models.rope import apply_rope, rope_tables
from pallas_kernels import linear_cpu
from tests.util import random_llama_tensors

OK = {dtype: linear_cpu.available(kernels_cache_dir(), dtype) for dtype in linear_cpu.DTYPES}
needs = {
    dtype: pytest.mark.skipif(not ok, reason=f"no {dtype} cpu linear kernel on this machine")
    for dtype, ok in OK.items()
}
DTYPES = [pytest.param(d, marks=needs[d]) for d in linear_cpu.DTYPES]
needs_bf16_dot = pytest.mark.skipif(not (OK["bfloat16"] and linear_cpu.has_bf16_dot()),
                                    reason="no AMX-BF16 or AVX512-BF16 here")  # fmt: skip
needs_rope = pytest.mark.skipif(not (OK["float32"] and linear_cpu.rope_qkv_supported(jnp.bfloat16, 64)),
                                reason="rope_qkv needs AVX-512F")  # fmt: skip
SHAPES = [(1, 576, 960), (15, 64, 32), (16, 576, 576), (17, 70, 40), (33, 1536, 576),
          (300, 100, 96)]  # fmt: skip


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def test_pack_puts_each_weight_in_its_slot():
    rng = np.random.default_rng(0)
    w = rand(rng, (2, 70, 40), "bfloat16")
    tiles = np.asarray(linear_cpu.pack(w), np.float32)  # [2, NB=4, KB=3, 16, 32]
    panels = np.asarray(linear_cpu.pack(w.astype(jnp.float32)))  # [2, NP=2, K=70, 32]
    assert tiles.shape == (2, 4, 3, 16, 32) and panels.shape == (2, 2, 70, 32)
    w32 = np.asarray(w, np.float32)
    for layer, k, n in [(0, 0, 0), (1, 69, 39), (1, 33, 17), (0, 64, 31)]:
        assert (
            tiles[layer, n // 16, k // 32, (k % 32) // 2, 2 * (n % 16) + k % 2] == w32[layer, k, n]
        )
        assert panels[layer, n // 32, k, n % 32] == w32[layer, k, n]
    # padding is zero: n >= 40 (tile column 16 on in nb 2, all of nb 3), k >= 70 (row 3 on in kb 2)
    assert not tiles[:, 3].any() and not tiles[:, 2, :, :, 16:].any()
    assert not tiles[:, :, 2, 3:].any()
    assert not panels[:, 1, :, 8:].any()
    # a tied embedding's lookup from the packed head: rows of w.T
    ids = jnp.asarray([[0, 39], [17, 5]])
    for packed in (linear_cpu.pack(w[1:]), linear_cpu.pack(w[1:].astype(jnp.float32))):
        got = np.asarray(linear_cpu.packed_rows(packed, ids, 70), np.float32)
        np.testing.assert_array_equal(got, w32[1].T[np.asarray(ids)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_numpy(dtype, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rand(rng, (m, k), dtype)
    w = rand(rng, (3, k, n), dtype, 0.05)
    packed = linear_cpu.pack(w)
    want = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64)
    got = np.asarray(linear_cpu.linear_cpu(x, packed, 2, n=n, out_dtype=jnp.float32))
    # bf16 products are exact in f32: both differ from float64 only by f32 summation
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    default = linear_cpu.linear_cpu(x, packed, 2, n=n)
    assert default.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(default), np.asarray(jnp.asarray(got, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_computes_leading_rows_bit_identically_and_zeroes_the_rest(dtype):
    rng = np.random.default_rng(3)
    x = rand(rng, (37, 96), dtype)
    packed = linear_cpu.pack(rand(rng, (2, 96, 80), dtype, 0.05))
    full = np.asarray(linear_cpu.linear_cpu(x, packed, 1, n=80))
    fn = jax.jit(lambda x, r: linear_cpu.linear_cpu(x, packed, 1, n=80, rows=r))
    for rows in (0, 1, 16, 17, 33, 37, 99, -5):  # a traced count: one compiled program
        got = np.asarray(fn(x, jnp.int32(rows)))
        live = min(max(rows, 0), 37)
        np.testing.assert_array_equal(got[:live], full[:live])
        assert not got[live:].any()
    assert fn._cache_size() == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_errors(dtype):
    rng = np.random.default_rng(1)
    x = rand(rng, (2, 3, 64), dtype)
    packed = linear_cpu.pack(rand(rng, (1, 64, 32), dtype))
    got = linear_cpu.linear_cpu(x, packed, 0, n=32)
    assert got.shape == (2, 3, 32)
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    with pytest.raises(ValueError, match="both be float32 or bfloat16"):
        linear_cpu.linear_cpu(x.astype(other), packed, 0, n=32)
    with pytest.raises(ValueError, match="does not match"):
        linear_cpu.linear_cpu(x, packed, 0, n=64)
    with pytest.raises(ValueError, match="does not match"):
        linear_cpu.linear_cpu(rand(rng, (4, 96), dtype), packed, 0, n=32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        linear_cpu.pack(jnp.zeros((4, 4), jnp.float16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 32])  # bf16 at 32: q|k|v split and RoPE by rope_qkv
def test_model_on_packed_linears_matches_plain_dots(dtype, head_dim):
    config = tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=128,
                               head_dim=head_dim, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=3, eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), dtype)
    rng = np.random.default_rng(2)
    pool = allocate_kv_pool(config, 32, 8, dtype)
    runners = {
        lb: ModelRunner(model, pool, block_size=8, max_model_len=128, linear_backend=lb)
        for lb in ("xla", "cpu")
    }
    assert "packed" in runners["cpu"].params and "wq" not in runners["cpu"].params["layers"]
    # a 40-token prefill chunk next to two short ones: M = 53 rows through every linear
    seqs = [StepSeq(rng.integers(3, 500, n).tolist(), 0, list(range(1 + 6 * i, 7 + 6 * i)))
            for i, n in enumerate((40, 5, 8))]  # fmt: skip
    batch = runners["xla"].build_batch(seqs, [0, 1, 2], step_shape(seqs, 3))
    logits = {  # row 3 pads R to 4: the cpu head skips it (0), as its linears skip padding
        lb: np.asarray(llama_forward(config, r.params, pool, batch, "xla")[0])
        for lb, r in runners.items()
    }
    assert batch.num_rows == 3 and not logits["cpu"][3].any() and logits["xla"][3].any()
    logits = {lb: v[:3] for lb, v in logits.items()}
    scale = np.abs(logits["xla"]).max()
    tol = 1e-5 if dtype == "float32" else 0.03  # bf16: roundings of the layer outputs differ
    np.testing.assert_allclose(logits["cpu"], logits["xla"], atol=tol * scale)
    assert (logits["cpu"].argmax(-1) == logits["xla"].argmax(-1)).all()


def test_config_resolves_linear_backend():
    for dtype, ok in OK.items():
        assert EngineConfig().resolved_linear_backend(dtype) == ("cpu" if ok else "xla")
    assert EngineConfig().resolved_linear_backend("float16") == "xla"
    assert EngineConfig(linear_backend="xla").resolved_linear_backend("float32") == "xla"
    assert EngineConfig().resolved_linear_backend("float32", float_linears=False) == "xla"
    with pytest.raises(ValueError, match="linear_backend cpu needs float32 or bfloat16"):
        EngineConfig(linear_backend="cpu").resolved_linear_backend("float16")
    with pytest.raises(ValueError, match="mesh"):
        EngineConfig(linear_backend="cpu", tensor_parallel_size=2).resolved_linear_backend(
            "float32"
        )
    with pytest.raises(ValueError, match="quantized"):
        EngineConfig(linear_backend="cpu", quantization="int8").resolved_linear_backend("float32")
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="onednn")


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float -> nearest-even bf16, back as float32 (numpy; NaN stays NaN)."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16), np.float32)


@needs["float32"]
@pytest.mark.parametrize("m, f", [(1, 16), (3, 37), (8, 1536), (64, 1536), (300, 100)])
def test_silu_mul_matches_silu_times_up(m, f):
    rng = np.random.default_rng(m * f)
    gu = rng.standard_normal((m, 2 * f)).astype(np.float32) * 4
    gu[0, :3] = [0.0, 60.0, -60.0]  # e^-|g| small, the products still normal floats
    g, u = gu[:, :f].astype(np.float64), gu[:, f:].astype(np.float64)
    exact = g / (1 + np.exp(-g)) * u
    got = np.asarray(linear_cpu.silu_mul(jnp.asarray(gu)))
    assert got.shape == (m, f)
    np.testing.assert_allclose(got, exact, rtol=2e-6, atol=1e-12)
    # bf16: silu rounded to bf16, then the product rounded (torch's bf16 SwiGLU)
    gb = jnp.asarray(gu, jnp.bfloat16)
    g, u = np.asarray(gb, np.float64)[:, :f], np.asarray(gb, np.float64)[:, f:]
    want = bf16_round(bf16_round(g / (1 + np.exp(-g))) * u)
    got = np.asarray(linear_cpu.silu_mul(gb), np.float32)
    # equal except where silu lands within exp's ~2e-7 of a bf16 rounding boundary
    assert np.mean(got == want) > 0.999
    np.testing.assert_allclose(got, want, rtol=2**-7)


@needs["float32"]
def test_silu_mul_leading_dims_nan_and_errors():
    rng = np.random.default_rng(1)
    gu = rng.standard_normal((2, 3, 40)).astype(np.float32)
    gu[1, 2, 5] = np.nan  # a NaN gate gives NaN; its neighbours are untouched
    got = np.asarray(linear_cpu.silu_mul(jnp.asarray(gu)))
    flat = np.asarray(linear_cpu.silu_mul(jnp.asarray(gu.reshape(6, 40)))).reshape(2, 3, 20)
    assert got.shape == (2, 3, 20) and np.isnan(got[1, 2, 5])
    assert np.isnan(got).sum() == 1
    np.testing.assert_array_equal(got, flat)
    with pytest.raises(ValueError, match="2F"):
        linear_cpu.silu_mul(jnp.zeros((4, 7), jnp.float32))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        linear_cpu.silu_mul(jnp.zeros((4, 8), jnp.float16))


@needs_rope
@pytest.mark.parametrize("t, heads, kv_heads, e", [(1, 9, 3, 64), (17, 4, 4, 128), (300, 9, 3, 64)])
def test_rope_qkv_equals_split_and_apply_rope(t, heads, kv_heads, e):
    rng = np.random.default_rng(t)
    qkv = rand(rng, (t, (heads + 2 * kv_heads) * e), "bfloat16", 2.0)
    inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, e, 2) / e), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 8192, t), jnp.int32)
    cos, sin = rope_tables(positions, inv_freq)
    q, k, v = jnp.split(qkv, [heads * e, (heads + kv_heads) * e], axis=-1)
    want = (
        apply_rope(q.reshape(t, heads, e), cos, sin),
        apply_rope(k.reshape(t, kv_heads, e), cos, sin),
        v.reshape(t, kv_heads, e),
    )
    got = linear_cpu.rope_qkv(qkv, cos, sin, num_heads=heads, num_kv_heads=kv_heads)
    for g, w in zip(got, want, strict=True):  # the same bf16 roundings: bit for bit
        assert g.shape == w.shape and g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@needs_rope
def test_rope_qkv_refuses_what_it_does_not_take():
    cos = sin = jnp.zeros((2, 1, 64), jnp.float32)
    assert linear_cpu.rope_qkv_supported(jnp.bfloat16, 64)
    assert not linear_cpu.rope_qkv_supported(jnp.float32, 64)
    assert not linear_cpu.rope_qkv_supported(jnp.bfloat16, 48)
    for qkv in (jnp.zeros((2, 5 * 64), jnp.float32), jnp.zeros((2, 4 * 64), jnp.bfloat16)):
        with pytest.raises(ValueError, match="qkv must be"):
            linear_cpu.rope_qkv(qkv, cos, sin, num_heads=3, num_kv_heads=1)


def _head_case(rng: np.random.Generator, k: int, v: int, rows: int):
    """A random [k, v] head and rows of x, with the hard cases for `head_argmax`: a column
    duplicated (an exact tie: the first must win), one a hair off its twin (bf16 cannot
    tell them apart), and rows pointing at those columns."""
    w = rng.standard_normal((k, v)).astype(np.float32) * 0.05
    w[:, v - 3] = w[:, 5]  # exact twin, later index
    w[:, 7] = w[:, 6] * np.float32(1 + 2**-20)  # near twin
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0] = 40 * w[:, 5]  # ties at 5 and v - 3
    x[1] = 40 * w[:, 6] + 1e-3 * x[1]  # 6 vs 7 decided below bf16's resolution
    x[2] = 0.0  # all logits 0: id 0
    return jnp.asarray(w), jnp.asarray(x)


@needs_bf16_dot
@pytest.mark.parametrize("k,v,rows", [(64, 1000, 5), (576, 4099, 37), (96, 33, 3)])
def test_head_argmax_gives_the_f32_logits_first_argmax(k, v, rows):
    rng = np.random.default_rng(k + v)
    w, x = _head_case(rng, k, v, rows)
    packed = linear_cpu.pack(w[None])
    args = (packed, linear_cpu.pack(w.astype(jnp.bfloat16)[None]), linear_cpu.head_norms(w))
    logits = np.asarray(linear_cpu.linear_cpu(x, packed, 0, n=v, out_dtype=jnp.float32))
    want = logits.argmax(axis=1)  # numpy: first maximum
    assert want[0] == 5 and want[2] == 0
    np.testing.assert_array_equal(np.asarray(linear_cpu.head_argmax(x, *args)), want)
    # rows past `rows` give 0; a NaN row gives V, as row_argmax does
    got = np.asarray(linear_cpu.head_argmax(x, *args, rows=2))
    np.testing.assert_array_equal(got, np.concatenate([want[:2], np.zeros(rows - 2, int)]))
    nan_x = x.at[1, 3].set(jnp.nan)
    assert np.asarray(linear_cpu.head_argmax(nan_x, *args))[1] == v


@needs_bf16_dot
def test_head_argmax_matches_on_the_default_models_head():
    """SmolLM2's own (tied) head, rows from random hidden states scaled as the final norm's."""
    from jpaged.llm import LLM

    llm = LLM(dtype="float32")
    runner = llm.engine.runner
    assert runner.head_screening
    packed, hs = runner.params["packed"]["head"], runner.params["head_screen"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 576)).astype(np.float32) * 2.0)
    logits = np.asarray(linear_cpu.linear_cpu(x, packed, 0, n=49152, out_dtype=jnp.float32))
    got = linear_cpu.head_argmax(x, packed, hs["bf16"], hs["norms"])
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(axis=1))


@needs["bfloat16"]
@pytest.mark.parametrize("m,k,f", [(1, 576, 1536), (37, 64, 48), (300, 100, 32)])
def test_linear_swiglu_equals_silu_mul_of_the_gate_up_product(m, k, f):
    """The fused epilogue rounds where the unfused path does: bit-identical bf16."""
    rng = np.random.default_rng(m + k)
    w_gate, w_up = (rand(rng, (2, k, f), "bfloat16", 0.1) for _ in range(2))
    x = rand(rng, (m, k), "bfloat16")
    unfused = linear_cpu.pack(jnp.concatenate([w_gate, w_up], axis=-1))
    want = linear_cpu.silu_mul(linear_cpu.linear_cpu(x, unfused, 1, n=2 * f))
    fused = linear_cpu.pack_swiglu(w_gate, w_up)
    got = linear_cpu.linear_swiglu(x, fused, 1, f=f)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    live = linear_cpu.linear_swiglu(x, fused, 1, f=f, rows=m // 2)
    np.testing.assert_array_equal(np.asarray(live, np.float32)[: m // 2],
                                  np.asarray(want, np.float32)[: m // 2])  # fmt: skip
    assert not np.asarray(live, np.float32)[m // 2 :].any()
    with pytest.raises(ValueError, match="does not match"):
        linear_cpu.linear_swiglu(x, fused, 1, f=2 * f)
    with pytest.raises(ValueError, match="F % 16"):
        linear_cpu.pack_swiglu(w_gate[..., :8], w_up[..., :8])


@needs["bfloat16"]
@pytest.mark.parametrize("m,k,v", [(1, 576, 49152), (37, 64, 1000), (300, 96, 33)])
def test_linear_argmax_gives_the_logits_first_argmax(m, k, v):
    """Ids straight from the AMX head equal the first argmax of its f32 logits: ties (a
    duplicated column) to the first, all-negative rows never pick a padding column, NaN -> V."""
    rng = np.random.default_rng(m + v)
    w = rng.standard_normal((k, v)).astype(np.float32) * 0.05
    w[:, v - 2] = w[:, 3]
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0] = 30 * w[:, 3]  # ties at 3 and v - 2
    if m > 2:
        w[:, :] = -np.abs(w)  # every logit of an all-positive row is negative
        x[2] = np.abs(x[2])
    wb, xb = jnp.asarray(w, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
    packed = linear_cpu.pack(wb[None])
    logits = np.asarray(linear_cpu.linear_cpu(xb, packed, 0, n=v, out_dtype=jnp.float32))
    got = np.asarray(linear_cpu.linear_argmax(xb, packed, n=v))
    np.testing.assert_array_equal(got, logits.argmax(axis=1))
    if m > 2:
        assert logits[2].max() < 0
    else:
        assert got[0] == 3
    live = np.asarray(linear_cpu.linear_argmax(xb, packed, n=v, rows=m // 2))
    np.testing.assert_array_equal(live, np.r_[got[: m // 2], np.zeros(m - m // 2, int)])
    nan_x = xb.at[0, 1].set(jnp.nan)
    assert np.asarray(linear_cpu.linear_argmax(nan_x, packed, n=v))[0] == v
    with pytest.raises(ValueError, match="does not match"):
        linear_cpu.linear_argmax(xb, packed, n=v + 64)
