"""pallas_kernels/quant_matmul.py in interpret mode: kernel == jnp reference == dequantize @."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.quantize import rtn_dequantize, rtn_quantize
from models.quant import int4_from_unpacked, int8_from_float
from pallas_kernels.quant_matmul import (
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    quant_matmul,
)


@pytest.mark.parametrize(
    ("gs", "act_order", "m"), [(32, False, 5), (64, True, 16), (128, True, 20)]
)
def test_int4_kernel(gs, act_order, m):
    rng = np.random.default_rng(gs)
    k, n = 256, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    r = rtn_quantize(w, gs, sym=not act_order, act_order=act_order)
    parts = {
        p: jnp.asarray(v) for p, v in int4_from_unpacked(r.q, r.zeros, r.scales, r.g_idx).items()
    }
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    want = np.asarray(x) @ rtn_dequantize(r)
    got = quant_matmul(x, parts, interpret=True)  # gathers x by perm, then the kernel
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
    xs = jnp.take(x, parts["perm"], axis=1) if act_order else x
    ref = int4_matmul_reference(xs, parts["qweight"], parts["scales"], parts["zeros"])
    np.testing.assert_allclose(np.asarray(ref), want, rtol=2e-5, atol=2e-4)


def test_int8_kernel():
    rng = np.random.default_rng(3)
    k, n = 96, 48
    p = int8_from_float(rng.standard_normal((k, n)).astype(np.float32))
    q8, scale = jnp.asarray(p["q8"]), jnp.asarray(p["scale"])
    x = jnp.asarray(rng.standard_normal((9, k)).astype(np.float32))
    got = int8_matmul(x, q8, scale, block_n=16, block_k=32, interpret=True)
    want = np.asarray(x) @ (p["q8"].astype(np.float32) * p["scale"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(
        np.asarray(int8_matmul_reference(x, q8, scale)), want, rtol=2e-5, atol=2e-4
    )


def test_kernel_input_errors():
    x = jnp.zeros((4, 64), jnp.float32)
    qw = jnp.zeros((8, 32), jnp.int32)
    s = jnp.zeros((2, 32), jnp.float16)
    z = jnp.zeros((2, 32), jnp.uint8)
    with pytest.raises(ValueError, match="qweight must be int32"):
        int4_matmul(x, qw.astype(jnp.int8), s, z, interpret=True)
    with pytest.raises(ValueError, match="scales must be"):
        int4_matmul(x, qw, jnp.zeros((3, 32), jnp.float16), z, interpret=True)
    with pytest.raises(ValueError, match="zeros must be integer"):
        int4_matmul(x, qw, s, z.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="block_n 24 must divide"):
        int4_matmul(x, qw, s, z, block_n=24, interpret=True)
    with pytest.raises(ValueError, match="q8 must be int8"):
        int8_matmul(x, jnp.zeros((64, 32), jnp.int32), jnp.zeros((32,)), interpret=True)
    with pytest.raises(ValueError, match="scale must be"):
        int8_matmul(x, jnp.zeros((64, 32), jnp.int8), jnp.zeros((16,)), interpret=True)


def test_kernels_lower_for_gpu():
    """Both kernels lower to Triton for CUDA (no GPU here: an abstract H100 mesh)."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    gpu = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=gpu)
    x = jax.ShapeDtypeStruct((64, 576), jnp.bfloat16)
    int4_args = (x, jax.ShapeDtypeStruct((72, 1536), jnp.int32),
                 jax.ShapeDtypeStruct((9, 1536), jnp.float16), jax.ShapeDtypeStruct((9, 1536), jnp.uint8))  # fmt: skip
    int8_args = (
        x,
        jax.ShapeDtypeStruct((576, 1536), jnp.int8),
        jax.ShapeDtypeStruct((1536,), jnp.bfloat16),
    )
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, args in ((int4_matmul, int4_args), (int8_matmul, int8_args)):
            lowered = (
                jax.jit(lambda *a, fn=fn: fn(*a)).trace(*args).lower(lowering_platforms=("cuda",))
            )
            assert "__gpu$xla.gpu.triton" in lowered.as_text()
