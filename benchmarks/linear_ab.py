"""A/B two or more versions of the C++ linear kernels (bf16 AMX or f32) in one process, interleaved.

    git show HEAD~1:pallas_kernels/linear_cpu.cc > /tmp/old.cc
    .venv/bin/python benchmarks/linear_ab.py /tmp/old.cc pallas_kernels/linear_cpu.cc [--dtype float32]

Each source is built (with pallas_kernels/cpu_kernels.h) into its own directory and registered
under its own FFI target. The workload is benchmarks/linear_cpu.py's: 30 SmolLM2-shaped
layers, x [M, 576] @ [576, 4224] then [M, 1536] @ [1536, 576], under `lax.scan`, for each M
in --rows. Rounds alternate between the versions; prints one JSON line per (M, version) with
the best and median ms, the weight GB/s and TFLOP/s, and a checksum of the outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attention_ab import build  # noqa: E402
from linear_cpu import LAYERS, QKV_GU, D, F  # noqa: E402

from jpaged.malloc_tuning import tune_malloc  # noqa: E402
from pallas_kernels import linear_cpu  # noqa: E402


def make(target: str):  # noqa: ANN201
    def call(x: jax.Array, packed: jax.Array, layer: jax.Array, n: int) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], n), x.dtype)
        rows = jnp.int32(x.shape[0])  # every row (the kernels skip rows past this)
        return jax.ffi.ffi_call(target, out)(x, packed, layer, rows)

    @jax.jit
    def run(x: jax.Array, p_in: jax.Array, p_out: jax.Array) -> jax.Array:
        def body(h: jax.Array, i: jax.Array) -> tuple:
            y = call(h, p_in, i, QKV_GU)[:, :F]
            return h + call(y, p_out, i, D), None

        return jax.lax.scan(body, x, jnp.arange(LAYERS, dtype=jnp.int32))[0]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--rows", default="1,64,2048")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    symbol = "JpagedLinearAmx" if args.dtype == "bfloat16" else "JpagedLinearF32"
    tune_malloc()  # as the engine does: XLA's temporaries stay on the heap, no page faults
    key = jax.random.PRNGKey(0)
    p_in = linear_cpu.pack(jax.random.normal(key, (LAYERS, D, QKV_GU), dtype) * 0.02)
    p_out = linear_cpu.pack(jax.random.normal(key, (LAYERS, F, D), dtype) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        fns = [make(t) for t in build(args.sources, Path(tmp), "linear_cpu.cc", symbol)]
        for m in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(key, (m, D), dtype)
            sums = [float(jnp.sum(fn(x, p_in, p_out).astype(jnp.float32))) for fn in fns]
            times: list[list[float]] = [[] for _ in fns]
            for _ in range(args.rounds):
                for fn, ts in zip(fns, times, strict=True):
                    t0 = time.perf_counter()
                    fn(x, p_in, p_out).block_until_ready()
                    ts.append(time.perf_counter() - t0)
            weight_bytes = LAYERS * (D * QKV_GU + F * D) * dtype.itemsize
            flops = 2 * m * LAYERS * (D * QKV_GU + F * D)
            for source, ts, s in zip(args.sources, times, sums, strict=True):
                best = min(ts)
                print(json.dumps({
                    "bench": "linear_ab", "source": source, "dtype": args.dtype, "rows": m,
                    "ms_best": round(best * 1e3, 2),
                    "ms_median": round(statistics.median(ts) * 1e3, 2),
                    "weight_gb_s": round(weight_bytes / best / 1e9, 2),
                    "tflop_s": round(flops / best / 1e12, 3), "checksum": s,
                    "cmd": " ".join([".venv/bin/python", *sys.argv]),
                }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
