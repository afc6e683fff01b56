"""Benchmark the `xla` paged-attention backend on CPU: one JSON line per configuration.

Sections:
  layer  SmolLM2-shaped decode attention for one layer (9 q heads, 3 kv heads, head_dim 64,
         B=64, contexts ~U(16, 512), block_size 16): `paged_attention` for each pages_per_tile,
         `paged_attention_reference`, the C++ `cpu` kernel, and dense attention over an
         already contiguous cache.
  width  short contexts with an 8- vs 512-column block table: the same time (dynamic trips).
  scan   a jitted 30-layer `lax.scan` of write_kv + paged_attention with the pool donated, at
         two pool sizes; the time must not grow with num_blocks (ratio goal <= 1.1).

Run: .venv/bin/python benchmarks/attention_cpu.py [--section layer|width|scan|all] [--dtype ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jpaged.paths import kernels_cache_dir  # noqa: E402
from pallas_kernels import paged_attention_cpu  # noqa: E402
from pallas_kernels.paged_attention_xla import (  # noqa: E402
    paged_attention,
    paged_attention_reference,
    write_kv,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 9, 3, 64, 30
SCAN_BLOCK_SIZE = 16
SCALE = HEAD_DIM**-0.5
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def timed(fns: dict[Any, Callable[[], jax.Array]], rounds: int) -> dict[Any, list[float]]:
    """Milliseconds per call of each fn; rounds interleave the fns so machine noise is shared."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def decode_batch(
    rng: np.random.Generator,
    num_seqs: int,
    max_context: int,
    num_blocks: int,
    block_size: int,
    dtype: jnp.dtype,
    min_context: int = 16,
) -> dict[str, np.ndarray]:
    """A decode batch: contexts ~U(min, max), shuffled block tables, unused table entries 0."""
    seq_lens = rng.integers(min_context, max_context + 1, num_seqs).astype(np.int32)
    width = -(-max_context // block_size)
    pages = -(-seq_lens // block_size)
    if pages.sum() > num_blocks - 1:
        raise ValueError(f"num_blocks {num_blocks} too small for {pages.sum()} pages")
    free = 1 + rng.permutation(num_blocks - 1)[: pages.sum()]
    block_tables = np.zeros((num_seqs, width), np.int32)
    offsets = np.concatenate([[0], np.cumsum(pages)])
    for s in range(num_seqs):
        block_tables[s, : pages[s]] = free[offsets[s] : offsets[s + 1]]
    pos = seq_lens - 1
    slots = block_tables[np.arange(num_seqs), pos // block_size] * block_size + pos % block_size
    q = rng.standard_normal((num_seqs, 1, NUM_HEADS, HEAD_DIM), dtype=np.float32)
    return {
        "q": jnp.asarray(q, dtype),
        "block_tables": block_tables,
        "seq_lens": seq_lens,
        "q_positions": pos[:, None].astype(np.int32),
        "slot_mapping": slots.astype(np.int32),
    }


@jax.jit
def contiguous_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, seq_lens: jax.Array
) -> jax.Array:
    """Decode attention over a contiguous cache. q: [S, 1, H, D]; k, v: [S, KV, T, D].

    [S, KV, T, D] is the layout a non-paged engine would keep (d minor for both dots); with
    [S, T, KV, D] XLA on CPU picks a transposed dot operand and runs ~15x slower.
    """
    num_seqs, _, _, head_dim = q.shape
    qg = (q.reshape(num_seqs, NUM_KV_HEADS, -1, head_dim) * SCALE).astype(k.dtype)
    f32 = jnp.float32
    scores = jnp.einsum("skgd,sktd->skgt", qg, k, preferred_element_type=f32)
    visible = jnp.arange(k.shape[2]) < seq_lens[:, None, None, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1).astype(v.dtype)
    out = jnp.einsum("skgt,sktd->skgd", probs, v, preferred_element_type=f32)
    return out.reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames="pages_per_tile")
def gather_only(kv_pool: jax.Array, block_tables: jax.Array, pages_per_tile: int) -> jax.Array:
    """The copy floor: fetch every table page (one take per tile of K+V pages) and sum them."""
    num_layers, num_blocks = kv_pool.shape[:2]
    num_seqs, width = block_tables.shape
    rows = num_blocks + block_tables.reshape(num_seqs, width // pages_per_tile, pages_per_tile)
    pool_rows = kv_pool.reshape(num_layers * num_blocks, *kv_pool.shape[2:])

    def body(tile: jax.Array, acc: jax.Array) -> jax.Array:
        tile_rows = lax.dynamic_index_in_dim(rows, tile, axis=1, keepdims=False)
        return acc + jnp.take(pool_rows, tile_rows, axis=0).astype(jnp.float32).sum((1, 3))

    init = jnp.zeros((num_seqs, *kv_pool.shape[2:3], *kv_pool.shape[4:]), jnp.float32)
    return lax.fori_loop(0, width // pages_per_tile, body, init)


def summary(times: list[float]) -> dict[str, float]:
    return {"ms_min": round(min(times), 3), "ms_median": round(float(np.median(times)), 3)}


def bench_layer(
    dtype_name: str, rounds: int, seed: int, block_size: int, pages_per_tile: list[int]
) -> None:
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    num_seqs, max_context, num_layers = 64, 512, 2
    num_blocks = num_seqs * max_context // block_size + 1
    batch = decode_batch(rng, num_seqs, max_context, num_blocks, block_size, dtype)
    shape = (num_layers, num_blocks, 2, block_size, NUM_KV_HEADS, HEAD_DIM)
    kv_pool = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    layer = jnp.int32(1)
    args = (batch["q"], kv_pool, layer) + tuple(
        jnp.asarray(batch[n]) for n in ("block_tables", "seq_lens", "q_positions")
    )
    # The same contexts laid out contiguously.
    pages = np.asarray(kv_pool[1])[batch["block_tables"]]  # [S, W, 2, bs, KV, D]
    dense = pages.transpose(2, 0, 4, 1, 3, 5).reshape(2, num_seqs, NUM_KV_HEADS, -1, HEAD_DIM)
    k_dense, v_dense = jnp.asarray(dense[0]), jnp.asarray(dense[1])  # [S, KV, T, D]
    seq_lens = jnp.asarray(batch["seq_lens"])

    fns: dict[str, Callable[[], jax.Array]] = {}
    for ppt in pages_per_tile:
        fns[f"paged_attention[pages_per_tile={ppt}]"] = lambda ppt=ppt: paged_attention(
            *args, scale=SCALE, pages_per_tile=ppt
        )
    if paged_attention_cpu.load(kernels_cache_dir()):  # the C++ FFI kernel (`cpu` backend)
        fns["paged_attention_cpu"] = lambda: paged_attention_cpu.paged_attention_cpu(
            *args, scale=SCALE
        )
    fns["paged_attention_reference"] = lambda: paged_attention_reference(*args, scale=SCALE)
    fns["contiguous_attention"] = lambda: contiguous_attention(
        batch["q"], k_dense, v_dense, seq_lens
    )
    floor_ppt = max(1, 64 // block_size)
    fns[f"gather_only[pages_per_tile={floor_ppt}] (copy floor, full width)"] = lambda: gather_only(
        kv_pool, args[3], floor_ppt
    )
    expected = np.asarray(fns["paged_attention_reference"](), np.float32)
    times = timed(fns, rounds)
    cmd = (
        f".venv/bin/python benchmarks/attention_cpu.py --section layer --dtype {dtype_name} "
        f"--block-size {block_size} --pages-per-tile {','.join(map(str, pages_per_tile))}"
    )
    for name, fn in fns.items():
        result = np.asarray(fn(), np.float32)
        err = float(np.abs(result - expected).max()) if result.shape == expected.shape else None
        line = {
            "bench": "attention_layer_decode",
            "impl": name,
            "dtype": dtype_name,
            "num_seqs": num_seqs,
            "context": f"U(16,{max_context})",
            "mean_context": float(batch["seq_lens"].mean()),
            "block_size": block_size,
            "heads": f"{NUM_HEADS}q/{NUM_KV_HEADS}kv/d{HEAD_DIM}",
            **summary(times[name]),
            "max_abs_diff_vs_reference": err,
            "rounds": rounds,
            "cmd": cmd,
        }
        print(json.dumps(line), flush=True)


def bench_table_width(dtype_name: str, rounds: int, seed: int) -> None:
    """Short contexts, table width 8 vs 512 columns: the tile loop's trip count is dynamic."""
    dtype, block_size, num_seqs, max_context = DTYPES[dtype_name], 16, 64, 128
    rng = np.random.default_rng(seed)
    num_blocks = num_seqs * max_context // block_size + 1
    batch = decode_batch(rng, num_seqs, max_context, num_blocks, block_size, dtype)
    shape = (2, num_blocks, 2, block_size, NUM_KV_HEADS, HEAD_DIM)
    kv_pool = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    fns = {}
    for width in (8, 512):
        block_tables = np.zeros((num_seqs, width), np.int32)
        block_tables[:, :8] = batch["block_tables"]
        args = (batch["q"], kv_pool, jnp.int32(1), jnp.asarray(block_tables))
        args += (jnp.asarray(batch["seq_lens"]), jnp.asarray(batch["q_positions"]))
        fns[width] = lambda args=args: paged_attention(*args, scale=SCALE)
    times = timed(fns, rounds)
    cmd = f".venv/bin/python benchmarks/attention_cpu.py --section width --dtype {dtype_name}"
    for width, t in times.items():
        line = {
            "bench": "paged_attention_table_width",
            "dtype": dtype_name,
            "table_width": width,
            "num_seqs": num_seqs,
            "context": f"U(16,{max_context})",
            "block_size": block_size,
            **summary(t),
            "rounds": rounds,
            "cmd": cmd,
        }
        print(json.dumps(line), flush=True)


def make_scan_step(pages_per_tile: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A 30-layer decode attention step: per layer write_kv then paged_attention, pool donated."""

    def step(
        kv_pool: jax.Array,
        q: jax.Array,
        kv_new: jax.Array,
        block_tables: jax.Array,
        seq_lens: jax.Array,
        q_positions: jax.Array,
        slot_mapping: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        def layer_step(
            carry: tuple[jax.Array, jax.Array], layer: jax.Array
        ) -> tuple[tuple[jax.Array, jax.Array], None]:
            pool, x = carry  # x: [S, 1, H, D], stands in for the residual stream
            k = kv_new[0] + x[:, 0, :NUM_KV_HEADS]
            pool = write_kv(pool, layer, k, kv_new[1], slot_mapping)
            out = paged_attention(
                x + q, pool, layer, block_tables, seq_lens, q_positions,
                scale=SCALE, pages_per_tile=pages_per_tile,
            )  # fmt: skip
            return (pool, x + out), None

        layers = jnp.arange(kv_pool.shape[0], dtype=jnp.int32)
        (kv_pool, x), _ = lax.scan(layer_step, (kv_pool, jnp.zeros_like(q)), layers)
        return kv_pool, x

    return jax.jit(step, donate_argnums=0)


def bench_scan(
    dtype_name: str, rounds: int, seed: int, sizes: tuple[int, int], pages_per_tile: int
) -> None:
    """Times the donated 30-layer step at both pool sizes, calls interleaved round by round."""
    dtype = DTYPES[dtype_name]
    step = make_scan_step(pages_per_tile)
    num_seqs, max_context = 64, 112  # <= 7 pages per sequence: fits the small pool
    state, donated = {}, {}
    for num_blocks in sizes:
        rng = np.random.default_rng(seed)
        batch = decode_batch(rng, num_seqs, max_context, num_blocks, SCAN_BLOCK_SIZE, dtype)
        shape = (NUM_LAYERS, num_blocks, 2, SCAN_BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        kv_pool = jax.jit(lambda shape=shape: jnp.full(shape, 0.01, dtype))()
        kv_new = jnp.asarray(rng.standard_normal((2, num_seqs, NUM_KV_HEADS, HEAD_DIM)), dtype)
        names = ("block_tables", "seq_lens", "q_positions", "slot_mapping")
        inputs = (batch["q"], kv_new, *(jnp.asarray(batch[n]) for n in names))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kv_pool, x = step(kv_pool, *inputs)  # compile
            jax.block_until_ready(x)
        donated[num_blocks] = not any("donated" in str(w.message) for w in caught)
        state[num_blocks] = [kv_pool, inputs]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for num_blocks in sizes:
            kv_pool, inputs = state[num_blocks]
            start = time.perf_counter()
            kv_pool, x = step(kv_pool, *inputs)
            jax.block_until_ready(x)
            times[num_blocks].append(1e3 * (time.perf_counter() - start))
            state[num_blocks][0] = kv_pool
    small, large = sizes
    ratio_min = min(times[large]) / min(times[small])
    ratio_median = float(np.median(times[large]) / np.median(times[small]))
    cmd = (
        f".venv/bin/python benchmarks/attention_cpu.py --section scan --dtype {dtype_name} "
        f"--scan-pages-per-tile {pages_per_tile}"
    )
    for num_blocks in sizes:
        line = {
            "bench": "scan30_write_kv_paged_attention_donated",
            "dtype": dtype_name,
            "num_blocks": num_blocks,
            "pool_mb": round(state[num_blocks][0].nbytes / 2**20),
            "num_seqs": num_seqs,
            "context": f"U(16,{max_context})",
            "pages_per_tile": pages_per_tile,
            **summary(times[num_blocks]),
            "donated": donated[num_blocks],
            f"ratio_{large}_vs_{small}_min": round(ratio_min, 3),
            f"ratio_{large}_vs_{small}_median": round(ratio_median, 3),
            "rounds": rounds,
            "cmd": cmd,
        }
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("layer", "width", "scan", "all"), default="all")
    parser.add_argument("--dtype", choices=(*DTYPES, "all"), default="all")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--scan-rounds", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=16, help="layer section")
    parser.add_argument("--pages-per-tile", default="1,2,4,8", help="layer section, comma list")
    parser.add_argument("--scan-pages-per-tile", type=int, default=4, help="scan section")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    for dtype_name in dtypes:
        if args.section in ("layer", "all"):
            ppts = [int(x) for x in args.pages_per_tile.split(",")]
            bench_layer(dtype_name, args.rounds, args.seed, args.block_size, ppts)
        if args.section in ("width", "all"):
            bench_table_width(dtype_name, args.rounds, args.seed)
        if args.section in ("scan", "all"):
            bench_scan(
                dtype_name, args.scan_rounds, args.seed, (512, 8192), args.scan_pages_per_tile
            )


if __name__ == "__main__":
    main()
