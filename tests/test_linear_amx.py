"""pallas_kernels/linear_amx.py: the AMX bf16 matmul against float32 numpy, and the model with
its linears on AMX against the plain-dot model (same bf16 weights)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.kv_pool import allocate_kv_pool
from jpaged.model_runner import ModelRunner, StepSeq, step_shape
from jpaged.paths import kernels_cache_dir
from models.config import tiny_llama_config
from models.llama import llama_forward, llama_from_hf_tensors
from pallas_kernels import linear_amx
from tests.util import random_llama_tensors

pytestmark = pytest.mark.skipif(
    not linear_amx.available(kernels_cache_dir()), reason="no AMX-BF16 CPU or no C++ compiler"
)


def bf16(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> jnp.ndarray:
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def test_pack_puts_each_weight_in_its_tile_slot():
    rng = np.random.default_rng(0)
    w = bf16(rng, (2, 70, 40))
    packed = np.asarray(linear_amx.pack(w), np.float32)  # [2, NB=4, KB=3, 16, 32]
    assert packed.shape == (2, 4, 3, 16, 32)
    w32 = np.asarray(w, np.float32)
    for layer, k, n in [(0, 0, 0), (1, 69, 39), (1, 33, 17), (0, 64, 31)]:
        tile = packed[layer, n // 16, k // 32]
        assert tile[(k % 32) // 2, 2 * (n % 16) + k % 2] == w32[layer, k, n]
    # the padding (n >= 40: tile column 16 on in nb 2, all of nb 3; k >= 70: row 3 on in kb 2)
    assert not packed[:, 3].any() and not packed[:, 2, :, :, 16:].any()
    assert not packed[:, :, 2, 3:].any()


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 576, 960), (15, 64, 32), (16, 576, 576), (17, 70, 40), (33, 1536, 576), (300, 100, 96)],
)
def test_matches_float32_matmul(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = bf16(rng, (m, k))
    w = bf16(rng, (3, k, n), 0.05)
    packed = linear_amx.pack(w)
    want = np.asarray(x, np.float32) @ np.asarray(w[2], np.float32)
    got = np.asarray(linear_amx.linear_amx(x, packed, 2, n=n, out_dtype=jnp.float32))
    # bf16 products are exact in f32; only the summation order differs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    got16 = linear_amx.linear_amx(x, packed, 2, n=n)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got16), np.asarray(jnp.asarray(got, jnp.bfloat16)))


def test_leading_dims_and_errors():
    rng = np.random.default_rng(1)
    x = bf16(rng, (2, 3, 64))
    w = bf16(rng, (1, 64, 32))
    packed = linear_amx.pack(w)
    got = linear_amx.linear_amx(x, packed, 0, n=32, out_dtype=jnp.float32)
    want = np.asarray(x, np.float32) @ np.asarray(w[0], np.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bfloat16"):
        linear_amx.linear_amx(x.astype(jnp.float32), packed, 0, n=32)
    with pytest.raises(ValueError, match="does not match"):
        linear_amx.linear_amx(x, packed, 0, n=64)
    with pytest.raises(ValueError, match="does not match"):
        linear_amx.linear_amx(bf16(rng, (4, 96)), packed, 0, n=32)


def test_model_on_amx_matches_plain_dots():
    config = tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=3, eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.bfloat16)
    rng = np.random.default_rng(2)
    pool = allocate_kv_pool(config, 32, 8, jnp.bfloat16)
    runners = {
        lb: ModelRunner(model, pool, block_size=8, max_model_len=128, linear_backend=lb)
        for lb in ("xla", "amx")
    }
    assert "amx" in runners["amx"].params and "wq" not in runners["amx"].params["layers"]
    # a 40-token prefill chunk next to two short ones: M = 53 rows through every linear
    seqs = [StepSeq(rng.integers(3, 500, n).tolist(), 0, list(range(1 + 6 * i, 7 + 6 * i)))
            for i, n in enumerate((40, 5, 8))]  # fmt: skip
    batch = runners["xla"].build_batch(seqs, [0, 1, 2], step_shape(seqs, 3))
    logits = {
        lb: np.asarray(llama_forward(config, r.params, pool, batch, "xla")[0])
        for lb, r in runners.items()
    }
    scale = np.abs(logits["xla"]).max()
    np.testing.assert_allclose(logits["amx"], logits["xla"], atol=0.03 * scale)
    assert (logits["amx"].argmax(-1) == logits["xla"].argmax(-1)).all()


def test_config_resolves_linear_backend():
    assert EngineConfig().resolved_linear_backend("bfloat16") == "amx"
    assert EngineConfig().resolved_linear_backend("float32") == "xla"
    assert EngineConfig(linear_backend="xla").resolved_linear_backend("bfloat16") == "xla"
    assert EngineConfig().resolved_linear_backend("bfloat16", float_linears=False) == "xla"
    with pytest.raises(ValueError, match="linear_backend amx needs bfloat16"):
        EngineConfig(linear_backend="amx").resolved_linear_backend("float32")
    with pytest.raises(ValueError, match="mesh"):
        EngineConfig(linear_backend="amx", tensor_parallel_size=2).resolved_linear_backend(
            "bfloat16"
        )
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="onednn")
