"""A/B two or more versions of the C++ attention kernel in one process, interleaved.

    git show 25759cd~1:pallas_kernels/paged_attention_cpu.cc > /tmp/old.cc
    .venv/bin/python benchmarks/attention_ab.py /tmp/old.cc pallas_kernels/paged_attention_cpu.cc

Each source is built (with pallas_kernels/cpu_kernels.h) into its own directory and registered
under its own FFI target, so all versions run in the same process on the same pool. The
workload: SmolLM2-shaped decode attention (benchmarks/attention_cpu.py's `decode_batch`: 9 q
heads, 3 kv heads, head_dim 64, block_size 16) for 30 layers under a `lax.scan`, B sequences
with contexts ~U(100, 499) on shuffled pages; with --q-len Q, each tile holds its sequence's
last Q positions (a verify step's chunk, or a short prefill chunk). Rounds alternate between the versions
(`attention_cpu.timed`); prints one JSON line per version (min / median ms, K/V GB/s read,
and a checksum of the outputs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attention_cpu import (  # noqa: E402
    DTYPES,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    SCALE,
    decode_batch,
    summary,
    timed,
)

from pallas_kernels.cpu_build import load_kernel  # noqa: E402

BLOCK = 16


def build(
    sources: list[str],
    tmp: Path,
    name: str = "paged_attention_cpu.cc",
    symbol: str = "JpagedPagedAttention",
) -> list[str]:
    """Build each version of kernel source `name` (with pallas_kernels' headers) in its own directory and
    register its handler `symbol` under its own FFI target; returns the targets, in order."""
    targets = []
    for i, source in enumerate(sources):
        d = tmp / f"v{i}"
        d.mkdir()
        shutil.copy(source, d / name)
        for header in (ROOT / "pallas_kernels").glob("*.h"):  # cpu_kernels.h, linear_avx2.h
            shutil.copy(header, d / header.name)
        target = f"jpaged_ab_{Path(name).stem}_{i}"
        if not load_kernel(d / name, {target: symbol}, d):
            raise SystemExit(f"{source}: the build failed")
        targets.append(target)
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--q-len", type=int, default=1, help="query slots per tile")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    rng = np.random.default_rng(0)
    num_blocks = args.batch * -(-500 // BLOCK) + 1
    batch = decode_batch(rng, args.batch, 499, num_blocks, BLOCK, dtype, min_context=100)
    shape = (NUM_LAYERS, num_blocks, 2, BLOCK, NUM_KV_HEADS, HEAD_DIM)
    pool = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    q_len = args.q_len
    q = jnp.asarray(
        rng.standard_normal((args.batch, q_len, *batch["q"].shape[2:]), np.float32), dtype
    )
    q_positions = batch["seq_lens"][:, None] - q_len + np.arange(q_len, dtype=np.int32)[None, :]
    args_of_call = [jnp.asarray(batch["block_tables"]), jnp.asarray(batch["seq_lens"]),
                    jnp.asarray(q_positions)]  # fmt: skip

    def make(target: str):  # noqa: ANN202
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, dtype))

        @jax.jit
        def run(q, pool):  # noqa: ANN001, ANN202
            def body(total, layer):  # noqa: ANN001, ANN202
                out = call(q, pool, layer, *args_of_call, scale=np.float32(SCALE))
                return total + out.astype(jnp.float32).sum(), None

            return lax.scan(body, jnp.float32(0), jnp.arange(NUM_LAYERS, dtype=jnp.int32))[0]

        return lambda: run(q, pool)

    with tempfile.TemporaryDirectory() as tmp:
        runs = dict(zip(args.sources, map(make, build(args.sources, Path(tmp))), strict=True))
        checks = {source: float(run()) for source, run in runs.items()}
        times = timed(runs, args.rounds)
    kv_bytes = int(batch["seq_lens"].sum()) * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * 2
    kv_bytes *= jnp.dtype(dtype).itemsize
    cmd = ".venv/bin/python benchmarks/attention_ab.py " + " ".join(sys.argv[1:])
    for source, ms in times.items():
        print(json.dumps({
            "bench": "attention_ab", "source": source, "batch": args.batch, "dtype": args.dtype,
            "q_len": q_len,
            **summary(ms), "kv_gb_s": round(kv_bytes / min(ms) / 1e6, 1),
            "checksum": checks[source], "cmd": cmd,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
