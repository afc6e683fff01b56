"""A/B two or more versions of the C++ attention kernel in one process, interleaved.

    git show 25759cd~1:pallas_kernels/paged_attention_cpu.cc > /tmp/old.cc
    .venv/bin/python benchmarks/attention_ab.py /tmp/old.cc pallas_kernels/paged_attention_cpu.cc

Each source is built (with pallas_kernels/cpu_kernels.h) into its own directory and registered
under its own FFI target, so all versions run in the same process on the same pool. The
workload: SmolLM2-shaped decode attention (9 q heads, 3 kv heads, head_dim 64, block_size 16)
for 30 layers under a `lax.scan`, B sequences with contexts ~U(100, 500) on shuffled pages.
Rounds alternate between the versions; prints one JSON line per version (best / median ms,
K/V GB/s read, and a checksum of the outputs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pallas_kernels.cpu_build import load_kernel  # noqa: E402

LAYERS, KV_HEADS, HEADS, HEAD_DIM, BLOCK = 30, 3, 9, 64, 16


def build(sources: list[str], tmp: Path) -> list[str]:
    targets = []
    for i, source in enumerate(sources):
        d = tmp / f"v{i}"
        d.mkdir()
        shutil.copy(source, d / "paged_attention_cpu.cc")
        shutil.copy(ROOT / "pallas_kernels" / "cpu_kernels.h", d / "cpu_kernels.h")
        target = f"jpaged_attention_ab_{i}"
        if not load_kernel(d / "paged_attention_cpu.cc", {target: "JpagedPagedAttention"}, d):
            raise SystemExit(f"{source}: the build failed")
        targets.append(target)
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    lens = rng.integers(100, 500, args.batch).astype(np.int32)
    width = int(np.ceil(lens.max() / BLOCK))
    num_blocks = args.batch * width + 1
    pages = rng.permutation(np.arange(1, num_blocks))[: args.batch * width]
    tables = jnp.asarray(pages.reshape(args.batch, width).astype(np.int32))
    shape = (LAYERS, num_blocks, 2, BLOCK, KV_HEADS, HEAD_DIM)
    pool = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    q = jnp.asarray(
        rng.standard_normal((LAYERS, args.batch, 1, HEADS, HEAD_DIM), dtype=np.float32), dtype
    )
    positions = jnp.asarray((lens - 1)[:, None])
    seq_lens = jnp.asarray(lens)

    def make(target: str):  # noqa: ANN202
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape[1:], dtype))

        @jax.jit
        def run(q, pool):  # noqa: ANN001, ANN202
            def body(total, xs):  # noqa: ANN001, ANN202
                layer, q_layer = xs
                out = call(q_layer, pool, layer, tables, seq_lens, positions,
                           scale=np.float32(HEAD_DIM**-0.5))  # fmt: skip
                return total + out.astype(jnp.float32).sum(), None

            return lax.scan(body, jnp.float32(0), (jnp.arange(LAYERS, dtype=jnp.int32), q))[0]

        return run

    with tempfile.TemporaryDirectory() as tmp:
        runs = [make(t) for t in build(args.sources, Path(tmp))]
        checks = [float(run(q, pool)) for run in runs]
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(args.rounds):
            for i, run in enumerate(runs):
                t0 = time.perf_counter()
                run(q, pool).block_until_ready()
                times[i].append(time.perf_counter() - t0)
    kv_bytes = int(lens.sum()) * LAYERS * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
    cmd = ".venv/bin/python benchmarks/attention_ab.py " + " ".join(sys.argv[1:])
    for source, ts, check in zip(args.sources, times, checks, strict=True):
        ts = sorted(ts)
        print(json.dumps({
            "bench": "attention_ab", "source": source, "batch": args.batch, "dtype": args.dtype,
            "best_ms": round(ts[0] * 1e3, 2), "median_ms": round(ts[len(ts) // 2] * 1e3, 2),
            "kv_gb_s": round(kv_bytes / ts[0] / 1e9, 1), "checksum": check, "cmd": cmd,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
