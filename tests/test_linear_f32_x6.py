"""f32 linears as bf16 x 6 on AMX (pallas_kernels.linear_cpu: split_bf16, pack_split, the
jpaged_linear_f32_amx kernel, $JPAGED_F32_LINEAR): the split is exact, the layout is `pack`'s
per plane, the kernel is at least as close to float64 as the f32 FMA kernel, and the model
gives the same logits either way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.paths import kernels_cache_dir
from pallas_kernels import linear_cpu

AMX = linear_cpu.available(kernels_cache_dir(), "bfloat16") and linear_cpu.has_amx()
needs_amx = pytest.mark.skipif(not AMX, reason="the f32-on-AMX kernel needs AMX-BF16")


def test_split_bf16_is_exact_and_pack_split_stacks_packs_planes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 70, 40)).astype(np.float32) * np.float32(0.05)
    w[0, 0, 0], w[0, 1, 1] = 1.0 + 2**-23, -3.0e-30  # a full significand; a tiny value
    planes = np.asarray(linear_cpu.split_bf16(jnp.asarray(w)), np.float64)
    assert planes.shape == (3, 2, 70, 40)
    np.testing.assert_array_equal(planes.sum(0), w.astype(np.float64))
    # each term is at most 2^-8 of the one before it (bf16's 8 significand bits)
    assert (np.abs(planes[1]) <= np.abs(planes[0]) * 2**-8).all()
    assert (np.abs(planes[2]) <= np.abs(planes[1]) * 2**-8).all()
    packed = np.asarray(linear_cpu.pack_split(jnp.asarray(w)), np.float32)
    assert packed.shape == (2, 4, 3, 3, 16, 32)
    for p in range(3):
        plane = linear_cpu.pack(jnp.asarray(planes[p], jnp.bfloat16))
        np.testing.assert_array_equal(packed[:, :, :, p], np.asarray(plane, np.float32))
    with pytest.raises(ValueError, match="float32"):
        linear_cpu.pack_split(jnp.zeros((4, 4), jnp.bfloat16))


def test_f32_linear_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JPAGED_F32_LINEAR", "fma")
    assert not linear_cpu.f32_on_amx()
    monkeypatch.setenv("JPAGED_F32_LINEAR", "amx")
    assert linear_cpu.f32_on_amx() == linear_cpu.has_amx()
    monkeypatch.setenv("JPAGED_F32_LINEAR", "fast")
    with pytest.raises(ValueError, match="JPAGED_F32_LINEAR must be amx or fma"):
        linear_cpu.f32_on_amx()


def _rel_err(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    """max |got - x @ w| over |x| @ |w|, in float64: the error per unit of the sum's size."""
    want = x.astype(np.float64) @ w.astype(np.float64)
    return float((np.abs(got - want) / (np.abs(x) @ np.abs(w) + 1e-30)).max())


@needs_amx
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (17, 70, 40), (64, 576, 1536), (300, 100, 96)])
def test_x6_is_as_close_to_float64_as_f32_fma(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((2, k, n)) * 0.05).astype(np.float32)
    split, panels = linear_cpu.pack_split(jnp.asarray(w)), linear_cpu.pack(jnp.asarray(w))
    x6 = np.asarray(linear_cpu.linear_cpu(jnp.asarray(x), split, 1, n=n))
    fma = np.asarray(linear_cpu.linear_cpu(jnp.asarray(x), panels, 1, n=n))
    assert x6.dtype == np.float32 and x6.shape == (m, n)
    # x6 drops the three smallest cross terms (~2^-24 each) and sums in f32 like FMA does
    assert _rel_err(x6, x, w[1]) <= max(2 * _rel_err(fma, x, w[1]), 4 * k * 2**-24)
    assert _rel_err(x6, x, w[1]) < 1e-5


@needs_amx
def test_x6_rows_zeroes_the_padding_and_refuses_bad_shapes():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((37, 96)), jnp.float32)
    split = linear_cpu.pack_split(jnp.asarray(rng.standard_normal((2, 96, 80)), jnp.float32))
    full = np.asarray(linear_cpu.linear_cpu(x, split, 1, n=80))
    fn = jax.jit(lambda x, r: linear_cpu.linear_cpu(x, split, 1, n=80, rows=r))
    for rows in (0, 1, 16, 17, 37, 99):
        got = np.asarray(fn(x, jnp.int32(rows)))
        live = min(rows, 37)
        np.testing.assert_array_equal(got[:live], full[:live])
        assert not got[live:].any()
    with pytest.raises(ValueError, match="does not match split"):
        linear_cpu.linear_cpu(x, split, 1, n=128)
    with pytest.raises(ValueError, match="does not match split"):
        linear_cpu.linear_cpu(x[:, :64], split, 1, n=80)
    with pytest.raises(ValueError, match="does not match split"):
        linear_cpu.linear_cpu(x, split, 1, n=80, out_dtype=jnp.bfloat16)


@needs_amx
def test_model_logits_agree_with_amx_and_fma_f32_linears(monkeypatch):
    """The tiny model's packed f32 params either way: same greedy ids, logits within f32 noise."""
    from jpaged.kv_pool import allocate_kv_pool
    from jpaged.model_runner import ModelRunner, StepSeq
    from jpaged.step_shapes import step_shape
    from models.config import tiny_llama_config
    from models.llama import llama_forward, llama_from_hf_tensors
    from tests.util import random_llama_tensors

    config = tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=3, eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), "float32")
    pool = allocate_kv_pool(config, 32, 8, "float32")
    rng = np.random.default_rng(2)
    seqs = [StepSeq(rng.integers(3, 500, n).tolist(), 0, list(range(1 + 6 * i, 7 + 6 * i)))
            for i, n in enumerate((40, 5, 8))]  # fmt: skip
    logits = {}
    for mode in ("amx", "fma"):
        monkeypatch.setenv("JPAGED_F32_LINEAR", mode)
        runner = ModelRunner(model, pool, block_size=8, max_model_len=128, linear_backend="cpu")
        assert (runner.params["packed"]["qkv"].ndim == 6) == (mode == "amx")
        batch = runner.build_batch(seqs, [0, 1, 2], step_shape(seqs, 3))
        logits[mode] = np.asarray(llama_forward(config, runner.params, pool, batch, "xla")[0])[:3]
    scale = np.abs(logits["fma"]).max()
    np.testing.assert_allclose(logits["amx"], logits["fma"], atol=1e-5 * scale)
    assert (logits["amx"].argmax(-1) == logits["fma"].argmax(-1)).all()
