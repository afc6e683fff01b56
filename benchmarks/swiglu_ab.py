"""SwiGLU on the AMX kernel: gate|up product then silu_mul vs linear_swiglu's fused epilogue.

    .venv/bin/python benchmarks/swiglu_ab.py [--rows 64,256,2048] [--rounds 15]

30 SmolLM2-shaped layers (x [M, 576] -> silu(x W_gate) * (x W_up) [M, 1536]) under
`lax.scan` over stacked bf16 weights, both ways in this process, interleaved. Prints one JSON
line per (M, way) with the best and median ms, and whether the outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jpaged.malloc_tuning import tune_malloc  # noqa: E402
from jpaged.paths import kernels_cache_dir  # noqa: E402
from pallas_kernels import linear_cpu  # noqa: E402

LAYERS, D, F = 30, 576, 1536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,256,2048")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    tune_malloc()
    if not linear_cpu.available(kernels_cache_dir(), "bfloat16"):
        sys.exit("needs the AMX-BF16 linear kernel")
    key = jax.random.PRNGKey(0)
    w_gate, w_up = (jax.random.normal(k, (LAYERS, D, F), jnp.bfloat16) * 0.05
                    for k in jax.random.split(key))  # fmt: skip
    unfused = linear_cpu.pack(jnp.concatenate([w_gate, w_up], axis=-1))
    fused = linear_cpu.pack_swiglu(w_gate, w_up)

    def scan(step):  # noqa: ANN001, ANN202
        @jax.jit
        def run(x: jax.Array, packed: jax.Array) -> jax.Array:
            def body(h: jax.Array, i: jax.Array) -> tuple:
                return h + step(h, packed, i)[:, :D], None

            return jax.lax.scan(body, x, jnp.arange(LAYERS, dtype=jnp.int32))[0]

        return run

    ways = {
        "gate_up_then_silu_mul": (scan(lambda h, p, i: linear_cpu.silu_mul(
            linear_cpu.linear_cpu(h, p, i, n=2 * F))), unfused),
        "linear_swiglu": (scan(lambda h, p, i: linear_cpu.linear_swiglu(h, p, i, f=F)), fused),
    }  # fmt: skip
    for m in (int(r) for r in args.rows.split(",")):
        x = jax.random.normal(key, (m, D), jnp.bfloat16)
        outs = {n: np.asarray(fn(x, p), np.float32) for n, (fn, p) in ways.items()}
        identical = bool(np.array_equal(*outs.values(), equal_nan=True))
        times: dict[str, list[float]] = {n: [] for n in ways}
        for _ in range(args.rounds):
            for name, (fn, p) in ways.items():
                t0 = time.perf_counter()
                fn(x, p).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            print(json.dumps({
                "bench": "swiglu_ab", "rows": m, "way": name,
                "ms_best": round(min(ts) * 1e3, 2),
                "ms_median": round(statistics.median(ts) * 1e3, 2),
                "outputs_identical": identical,
                "cmd": " ".join([".venv/bin/python", *sys.argv]),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
