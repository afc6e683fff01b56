"""Pallas (Triton backend) paged decode attention: one query token per sequence, split-K.

Grid (S, KV, splits): a program takes one sequence, one kv head with its G query heads (GQA:
the group shares each K/V tile it loads) and one split of the context; it walks its split
tile by tile (`pages_per_tile` pages through the block table, an online softmax), stopping
at the sequence's length, and writes an unnormalised partial (acc, max, denominator). The
wrapper merges the splits. Splits let a few long sequences fill the GPU; a split past the
end of its sequence runs no iteration. Why Triton and not Mosaic GPU:
see pallas_kernels/paged_attention_pallas.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention_xla import paged_attention_reference
from pallas_kernels.paged_tiles import (
    MIN_DOT_DIM,
    check_pallas_args,
    default_interpret,
    dot_dtype,
    init_softmax_state,
    load_kv_tile,
    next_pow2,
    online_softmax_step,
    pages_per_tile_for,
)

# Programs the split heuristic aims for: 2 per SM of an H100 (132 SMs).
TARGET_PROGRAMS = 264
# A split covers at least this many tiles, so its partial result is worth writing.
MIN_TILES_PER_SPLIT = 4


def _decode_kernel(
    layer_ref: jax.Ref,  # [1] i32
    kv_lens_ref: jax.Ref,  # [S] i32 keys each sequence's query sees
    block_tables_ref: jax.Ref,  # [S, W'] i32, W' = splits * tiles_per_split * P
    q_ref: jax.Ref,  # [R, D] rows >= G are padding (garbage)
    pool_ref: jax.Ref,  # [L, NB, 2, bs, KV, D]
    acc_ref: jax.Ref,  # [R, D] f32 unnormalised output of this split
    max_ref: jax.Ref,  # [R] f32 running max of this split
    denom_ref: jax.Ref,  # [R] f32 softmax denominator of this split
    *,
    group: int,
    pages_per_tile: int,
    tiles_per_split: int,
    scale: float,
    compute_dtype: jnp.dtype,
):
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, head_dim = q_ref.shape
    tile_tokens = pages_per_tile * pool_ref.shape[3]
    layer = layer_ref[0]
    kv_len = kv_lens_ref[seq]
    q = q_ref[...].astype(compute_dtype)
    q = jnp.where(lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0) < group, q, 0)
    first = split * tiles_per_split
    last = jnp.minimum(first + tiles_per_split, pl.cdiv(kv_len, tile_tokens))

    def tile_step(tile: jax.Array, carry: tuple) -> tuple:
        pages = block_tables_ref[seq, pl.ds(tile * pages_per_tile, pages_per_tile)]  # [P]
        k, v = load_kv_tile(pool_ref, layer, pages, kv_head, compute_dtype)  # [t, D] each
        k_pos = tile * tile_tokens + lax.broadcasted_iota(jnp.int32, (tile_tokens,), 0)
        in_context = k_pos < kv_len  # [t]
        v = jnp.where(in_context[:, None], v, 0)
        visible = jnp.broadcast_to(in_context[None, :], (rows, tile_tokens))
        return online_softmax_step(q, k, v, visible, carry, scale=scale)

    m, denom, acc = lax.fori_loop(first, last, tile_step, init_softmax_state(rows, head_dim))
    acc_ref[...] = acc
    max_ref[...] = m
    denom_ref[...] = denom


def default_num_splits(num_seqs: int, num_kv_heads: int, num_tiles: int) -> int:
    """Splits so the grid has ~TARGET_PROGRAMS programs, each split >= MIN_TILES_PER_SPLIT."""
    wanted = -(-TARGET_PROGRAMS // (num_seqs * num_kv_heads))
    return max(1, min(wanted, num_tiles // MIN_TILES_PER_SPLIT))


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_tile", "num_splits", "interpret"))
def paged_decode_attention(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    pages_per_tile: int | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Decode attention through block tables: one query per sequence, split-K.

    q: [S, 1, H, D] (H = KV * G; query head h reads kv head h // G), f32/bf16/f16;
    kv_pool: [L, NB, 2, bs, KV, D]; layer: scalar int; block_tables: [S, W] i32;
    seq_lens: [S] i32 (0 = padding sequence); q_positions: [S, 1] i32 (-1 = padding). The
    query sees keys 0..min(seq_len - 1, q_position). Returns [S, 1, H, D] in q.dtype;
    padding gives exactly 0. pages_per_tile None: ~64 keys per tile; num_splits None:
    `default_num_splits`; interpret None: interpret mode unless the target is a GPU.
    Raises ValueError on mismatched shapes or dtypes, a non-power-of-two head_dim or
    block_size, q_len != 1, or bad pages_per_tile / num_splits.
    """
    check_pallas_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    if q.shape[1] != 1:
        raise ValueError(f"q must be [S, 1, H, D] for decode, got {q.shape}")
    _, _, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    num_seqs, _, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    pages = pages_per_tile_for(block_size, pages_per_tile)
    num_tiles = -(-block_tables.shape[1] // pages)
    splits = (
        default_num_splits(num_seqs, num_kv_heads, num_tiles) if num_splits is None else num_splits
    )
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    tiles_per_split = -(-num_tiles // splits)
    width = splits * tiles_per_split * pages
    # Extra columns point at the null block; kv_len masks them.
    tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))
    q_pos = q_positions[:, 0]
    kv_lens = jnp.where(q_pos >= 0, jnp.minimum(seq_lens, q_pos + 1), 0).astype(jnp.int32)
    rows = max(MIN_DOT_DIM, next_pow2(group))
    q_groups = q.reshape(num_seqs, num_kv_heads, group, head_dim)  # free reshape
    kernel = functools.partial(
        _decode_kernel,
        group=group,
        pages_per_tile=pages,
        tiles_per_split=tiles_per_split,
        scale=scale,
        compute_dtype=dot_dtype(q.dtype, kv_pool.dtype),
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda s, k, j: (0,) * len(shape))  # noqa: E731
    partial_shape = (num_seqs, num_kv_heads, splits, group)
    acc, row_max, denom = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, splits),
        in_specs=[
            whole((1,)),
            whole((num_seqs,)),
            whole(tables.shape),
            # Rows past G read past the group (masked on GPU, NaN-padded in interpret mode).
            pl.BlockSpec((None, None, rows, head_dim), lambda s, k, j: (s, k, 0, 0)),
            whole(kv_pool.shape),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda s, k, j: (s, k, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, k, j: (s, k, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, k, j: (s, k, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=default_interpret(interpret),
        name="jpaged_paged_decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), kv_lens, tables, q_groups, kv_pool)
    out = merge_splits(acc, row_max, denom)  # [S, KV, G, D]
    return out.reshape(q.shape).astype(q.dtype)


def merge_splits(acc: jax.Array, row_max: jax.Array, denom: jax.Array) -> jax.Array:
    """Combine split partials: acc [..., splits, G, D], row_max / denom [..., splits, G] ->
    normalised [..., G, D] f32; rows that saw no key (denominator 0) give exactly 0."""
    total_max = jnp.max(row_max, axis=-2, keepdims=True)  # [..., 1, G]
    weight = jnp.exp(row_max - total_max)  # [..., splits, G]
    total_denom = jnp.sum(weight * denom, axis=-2)  # [..., G]
    total_acc = jnp.sum(weight[..., None] * acc, axis=-3)  # [..., G, D]
    safe = jnp.where(total_denom > 0, total_denom, 1.0)[..., None]
    return jnp.where(total_denom[..., None] > 0, total_acc / safe, 0.0)


def paged_decode_attention_reference(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """The jnp oracle for `paged_decode_attention` (same arguments and result): each
    sequence's pages gathered into a contiguous context, then a masked softmax."""
    return paged_attention_reference(
        q, kv_pool, layer, block_tables, seq_lens, q_positions, scale=scale
    )
