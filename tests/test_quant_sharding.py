"""Quantized linears under tensor parallelism: sharded packed weights give the unsharded result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jpaged.quantize import rtn_quantize
    from models.quant import int4_from_unpacked, int8_from_float, partition_spec, quant_matmul_xla

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    rng = np.random.default_rng(0)
    k, n = 128, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((5, k)).astype(np.float32))
    r = rtn_quantize(w, 32, sym=True, act_order=True)
    layouts = {"int4": int4_from_unpacked(r.q, r.zeros, r.scales, r.g_idx), "int8": int8_from_float(w)}
    for fmt, parts in layouts.items():
        for name in ("wq", "wo"):  # column-split, row-split
            placed = {}
            for part, a in parts.items():
                spec = PartitionSpec(*partition_spec(name, part)[1:])  # one layer: drop L
                placed[part] = jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))
            want = quant_matmul_xla(x, {p: jnp.asarray(a) for p, a in parts.items()})
            got = jax.jit(quant_matmul_xla)(x, placed)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
            main = "q8" if fmt == "int8" else "qweight"
            shard = placed[main].addressable_shards[0].data.shape
            full = parts[main].shape
            assert shard == ((full[0], full[1] // 2) if name == "wq" else (full[0] // 2, full[1])), shard
            if fmt == "int4":
                g = placed["scales"].addressable_shards[0].data.shape
                assert g == ((4, n // 2) if name == "wq" else (2, n)), g
    print("ok")
    """
)


def test_sharded_quantized_linear_matches_unsharded():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT)
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
