"""The `cpu` linear kernels against XLA's dots: 30 SmolLM2-shaped layers of linears in a scan.

    .venv/bin/python benchmarks/linear_cpu.py [--rows 1,64,512] [--dtype float32,bfloat16]

Each layer runs x [M, 576] @ [576, 4224] (q|k|v|gate|up fused, as a decode step reads them)
then [M, 1536] @ [1536, 576], under `lax.scan` over stacked weights: `xla` slices the stacked
arrays (XLA copies the slices) and calls its dot; `cpu` reads the packed array at the layer
index (pallas_kernels/linear_cpu.py). Both run in this process, interleaved, best of
`--rounds`. Prints one JSON line per (dtype, M, impl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jpaged.paths import kernels_cache_dir  # noqa: E402
from pallas_kernels import linear_cpu  # noqa: E402

LAYERS, D, F, QKV_GU = 30, 576, 1536, 4224


def run(dtype: str, m: int, rounds: int) -> list[dict]:
    key = jax.random.PRNGKey(0)
    w_in = jax.random.normal(key, (LAYERS, D, QKV_GU), dtype) * 0.02
    w_out = jax.random.normal(key, (LAYERS, F, D), dtype) * 0.02
    x = jax.random.normal(key, (m, D), dtype)

    def dot(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)

    @jax.jit
    def xla(x: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
        def body(h: jax.Array, w: tuple) -> tuple:
            return h + dot(dot(h, w[0])[:, :F], w[1]), None

        return jax.lax.scan(body, x, (w_in, w_out))[0]

    p_in, p_out = linear_cpu.pack(w_in), linear_cpu.pack(w_out)

    @jax.jit
    def cpu(x: jax.Array, p_in: jax.Array, p_out: jax.Array) -> jax.Array:
        def body(h: jax.Array, i: jax.Array) -> tuple:
            y = linear_cpu.linear_cpu(h, p_in, i, n=QKV_GU)[:, :F]
            return h + linear_cpu.linear_cpu(y, p_out, i, n=D), None

        return jax.lax.scan(body, x, jnp.arange(LAYERS))[0]

    impls = {"xla": (xla, (x, w_in, w_out)), "cpu": (cpu, (x, p_in, p_out))}
    best = {name: float("inf") for name in impls}
    for fn, args in impls.values():
        fn(*args).block_until_ready()
    for _ in range(rounds):
        for name, (fn, args) in impls.items():
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            best[name] = min(best[name], time.perf_counter() - t0)
    flops = 2 * m * LAYERS * (D * QKV_GU + F * D)
    weight_bytes = LAYERS * (D * QKV_GU + F * D) * jnp.dtype(dtype).itemsize
    return [
        {
            "bench": "linear_cpu",
            "dtype": dtype,
            "rows": m,
            "impl": name,
            "ms_best": round(t * 1e3, 2),
            "gflop_s": round(flops / t / 1e9, 1),
            "weight_gb_s": round(weight_bytes / t / 1e9, 2),
            "cmd": " ".join([".venv/bin/python", *sys.argv]),
        }  # fmt: skip
        for name, t in best.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,64,512")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for dtype in args.dtype.split(","):
        if not linear_cpu.available(kernels_cache_dir(), dtype):
            print(json.dumps({"bench": "linear_cpu", "dtype": dtype, "error": "no kernel here"}))
            continue
        for m in (int(r) for r in args.rows.split(",")):
            for line in run(dtype, m, args.rounds):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
