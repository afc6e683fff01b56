"""Benchmark the Pallas paged-attention kernels on a GPU: achieved HBM bandwidth vs peak.

One JSON line per configuration. Decode lines give the kernel's time, the bytes it must
read, the achieved bandwidth and its fraction of the device's peak, and the `xla` backend's
time on the same inputs; prefill lines give the ragged kernel's time and TFLOP/s. On a
machine without a GPU it prints one line saying so (and the roofline figures below) and
exits 0; `--allow-cpu` runs tiny shapes in interpret mode (a check of this script only:
interpret-mode times mean nothing).

Roofline (per layer; bs = block size, itemsize 2 for bf16, H100 SXM HBM3 at 3.35 TB/s):

Decode must read every context page of every sequence once: K and V rows of each kv head,
shared by the G query heads of its group.
    bytes = sum_s ctx_s * 2 * KV * D * itemsize         (K/V, dominant)
          + S * H * D * itemsize * 2                     (q in, out)
          + S * KV * splits * G * (D + 2) * 4 * 2        (split partials written, re-read)
  Llama-3-8B heads (H 32, KV 8, D 128), bf16: 4096 B per token of context.
    S=64, ctx 2048:  537 MB ->  160 us per layer,  5.1 ms for 32 layers
    S=256, ctx 1024: 1.07 GB -> 320 us per layer
    S=8, ctx 8192:   268 MB ->   80 us per layer (split-K keeps all SMs reading)
  SmolLM2-135M heads (H 9, KV 3, D 64), bf16: 768 B per token of context.
    S=64, ctx 512:   25.2 MB -> 7.5 us per layer, 225 us for 30 layers
Ragged prefill must read each page of a chunk's context once and is compute-bound for long
chunks: FLOPs = 4 * H * D * (visible keys summed over queries). Each program holds 64 query
rows (64 / G' queries, G' = G rounded up to a power of two), so a chunk of C queries
re-reads its context ceil(C * G' / 64) times, from L2 when the context fits there.
  Llama-3-8B heads, one 2048-token prompt, bf16: 34.4 GFLOP -> 35 us at 989 TFLOP/s
  (dense bf16); minimum K/V read 8.4 MB -> 2.5 us; re-reads <= 537 MB (causal half of
  128 row blocks x 8.4 MB), mostly L2 hits (50 MB L2).

Run: .venv/bin/python benchmarks/attention_gpu.py [--rounds N] [--allow-cpu]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.paged_attention_xla import paged_attention as xla_attention  # noqa: E402
from pallas_kernels.paged_decode_pallas import (  # noqa: E402
    default_num_splits,
    paged_decode_attention,
)
from pallas_kernels.paged_ragged_pallas import ragged_paged_attention  # noqa: E402
from pallas_kernels.paged_tiles import TILE_TOKENS  # noqa: E402

H100_BANDWIDTH = 3.35e12
# Peak HBM bandwidth (bytes/s) by device_kind prefix; unknown devices report null.
PEAK_BANDWIDTH = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100": 3.35e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
    "NVIDIA A100": 1.555e12,
    "NVIDIA L40S": 0.864e12,
    "NVIDIA L4": 0.3e12,
}
MODELS = {  # name: (heads, kv_heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
DECODE = [("llama3-8b", 64, 2048), ("llama3-8b", 256, 1024), ("llama3-8b", 8, 8192),
          ("smollm2-135m", 64, 512)]  # fmt: skip
PREFILL = [("llama3-8b", 2048), ("smollm2-135m", 2048)]
TINY_DECODE = [("smollm2-135m", 4, 100)]
TINY_PREFILL = [("smollm2-135m", 64)]
BLOCK_SIZE = 16
PREFILL_TILE = 32  # query slots per row, as the model runner pads prefill steps


def peak_bandwidth(device_kind: str) -> float | None:
    for prefix, peak in PEAK_BANDWIDTH.items():
        if device_kind.startswith(prefix):
            return peak
    return None


def decode_bytes(
    ctx: np.ndarray, heads: int, kv_heads: int, head_dim: int, itemsize: int, splits: int
) -> int:
    """Bytes the decode kernel must move for one layer (see the module docstring)."""
    seqs, group = len(ctx), heads // kv_heads
    kv = int(ctx.sum()) * 2 * kv_heads * head_dim * itemsize
    q_out = seqs * heads * head_dim * itemsize * 2
    partials = seqs * kv_heads * splits * group * (head_dim + 2) * 4 * 2
    return kv + q_out + partials


def make_pool(rng: np.random.Generator, ctx: np.ndarray, kv_heads: int, head_dim: int, dtype):
    """A 1-layer pool holding every sequence's pages in shuffled blocks, and the tables."""
    pages = -(-ctx // BLOCK_SIZE)
    width = int(pages.max())
    num_blocks = 1 + int(pages.sum())
    order = 1 + rng.permutation(num_blocks - 1)
    tables = np.zeros((len(ctx), width), np.int32)
    start = 0
    for s, n in enumerate(pages):
        tables[s, :n] = order[start : start + n]
        start += n
    shape = (1, num_blocks, 2, BLOCK_SIZE, kv_heads, head_dim)
    pool = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    return pool, jnp.asarray(tables)


def median_ms(fn, rounds: int) -> float:
    for _ in range(2):  # compile + warm; twice: jax retraces once after the first Pallas call
        jax.block_until_ready(fn())  # (a Pallas config state joins the trace context)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def bench_decode(model: str, seqs: int, ctx_len: int, dtype, rounds: int, interpret: bool) -> dict:
    heads, kv_heads, head_dim = MODELS[model]
    rng = np.random.default_rng(0)
    ctx = np.full(seqs, ctx_len, np.int32)
    pool, tables = make_pool(rng, ctx, kv_heads, head_dim, dtype)
    q = jax.random.normal(jax.random.key(1), (seqs, 1, heads, head_dim), jnp.float32).astype(dtype)
    args = (q, pool, jnp.int32(0), tables, jnp.asarray(ctx), jnp.asarray(ctx - 1)[:, None])
    scale = head_dim**-0.5
    pallas_fn = functools.partial(paged_decode_attention, scale=scale, interpret=interpret)
    xla_fn = functools.partial(xla_attention, scale=scale)
    pallas_ms = median_ms(lambda: pallas_fn(*args), rounds)
    xla_ms = median_ms(lambda: xla_fn(*args), rounds)
    num_tiles = -(-tables.shape[1] // max(1, TILE_TOKENS // BLOCK_SIZE))
    splits = default_num_splits(seqs, kv_heads, num_tiles)
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = decode_bytes(ctx, heads, kv_heads, head_dim, itemsize, splits)
    achieved = nbytes / (pallas_ms * 1e-3)
    peak = peak_bandwidth(jax.devices()[0].device_kind)
    return {
        "kernel": "decode", "model_heads": model, "seqs": seqs, "context": ctx_len,
        "dtype": jnp.dtype(dtype).name, "block_size": BLOCK_SIZE, "splits": splits,
        "bytes": nbytes, "pallas_ms": round(pallas_ms, 4), "xla_ms": round(xla_ms, 4),
        "achieved_GBps": round(achieved / 1e9, 1),
        "peak_GBps": None if peak is None else round(peak / 1e9, 1),
        "fraction_of_peak": None if peak is None else round(achieved / peak, 3),
        "roofline_ms_h100": round(1e3 * nbytes / H100_BANDWIDTH, 4),
    }  # fmt: skip


def bench_prefill(model: str, prompt: int, dtype, rounds: int, interpret: bool) -> dict:
    """One prompt, laid out as the runner does: rows of PREFILL_TILE consecutive queries."""
    heads, kv_heads, head_dim = MODELS[model]
    rows = -(-prompt // PREFILL_TILE)
    rng = np.random.default_rng(0)
    pool, table = make_pool(rng, np.array([prompt]), kv_heads, head_dim, dtype)
    tables = jnp.broadcast_to(table, (rows, table.shape[1]))
    positions = np.arange(rows * PREFILL_TILE, dtype=np.int32).reshape(rows, PREFILL_TILE)
    positions = np.where(positions < prompt, positions, -1)
    shape = (rows, PREFILL_TILE, heads, head_dim)
    q = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    seq_lens = jnp.full((rows,), prompt, jnp.int32)
    args = (q, pool, jnp.int32(0), tables, seq_lens, jnp.asarray(positions))
    fn = functools.partial(ragged_paged_attention, scale=head_dim**-0.5, interpret=interpret)
    ms = median_ms(lambda: fn(*args), rounds)
    flops = 4 * heads * head_dim * prompt * (prompt + 1) / 2
    return {
        "kernel": "ragged_prefill", "model_heads": model, "prompt": prompt,
        "dtype": jnp.dtype(dtype).name, "block_size": BLOCK_SIZE, "pallas_ms": round(ms, 4),
        "TFLOPs": round(flops / (ms * 1e-3) / 1e12, 2),
        "kv_bytes_min": prompt * 2 * kv_heads * head_dim * jnp.dtype(dtype).itemsize,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run tiny shapes in interpret mode off a GPU (checks the script)")  # fmt: skip
    args = parser.parse_args()
    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    if not on_gpu and not args.allow_cpu:
        print(json.dumps({"benchmark": "kernels", "status": "needs a GPU", "backend": backend,
                          "note": "the Pallas kernels are Triton GPU kernels; off a GPU they "
                                  "only run in interpret mode (see --allow-cpu)"}))  # fmt: skip
        for model, seqs, ctx_len in DECODE:
            heads, kv_heads, head_dim = MODELS[model]
            ctx = np.full(seqs, ctx_len, np.int64)
            nbytes = decode_bytes(ctx, heads, kv_heads, head_dim, 2, splits=1)
            print(json.dumps({"kernel": "decode", "model_heads": model, "seqs": seqs,
                              "context": ctx_len, "dtype": "bfloat16", "bytes": nbytes,
                              "roofline_ms_h100": round(1e3 * nbytes / H100_BANDWIDTH, 4),
                              "measured": None}))  # fmt: skip
        return
    decode, prefill = (DECODE, PREFILL) if on_gpu else (TINY_DECODE, TINY_PREFILL)
    rounds = args.rounds if on_gpu else 1
    device = jax.devices()[0].device_kind
    for model, seqs, ctx_len in decode:
        line = bench_decode(model, seqs, ctx_len, jnp.bfloat16, rounds, not on_gpu)
        print(json.dumps({"device": device, **line}), flush=True)
    for model, prompt in prefill:
        line = bench_prefill(model, prompt, jnp.bfloat16, rounds, not on_gpu)
        print(json.dumps({"device": device, **line}), flush=True)


if __name__ == "__main__":
    main()
