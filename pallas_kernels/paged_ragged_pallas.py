"""Pallas (Triton backend) ragged paged attention: query chunks of mixed lengths, causal.

Each row of the batch is a chunk of up to Q consecutive query tokens of one sequence (a
prefill chunk, a decode token, or padding), attending causally inside the chunk and to the
sequence's earlier context through its block table. The rows of a program are the chunk's
queries times the G query heads of one kv head, flattened ([Q * G', D], G' = G rounded up
to a power of two), so each K/V tile loaded serves the whole group. Grid (S, KV, row
blocks): a program walks tiles of `pages_per_tile` pages from position 0 up to its last
query's position (causal: later keys are never loaded), with an online softmax, and
writes its normalised output. Why Triton and not Mosaic GPU:
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

# Query rows per program (queries x heads of a group): a [64, D] f32 accumulator per program.
MAX_ROWS_PER_PROGRAM = 64


def _ragged_kernel(
    layer_ref: jax.Ref,  # [1] i32
    seq_lens_ref: jax.Ref,  # [S] i32 context length of each row's sequence, this step included
    row_pos_ref: jax.Ref,  # [RB] i32 absolute position of each query row, -1 = padding
    block_tables_ref: jax.Ref,  # [S, W'] i32, W' a multiple of P
    q_ref: jax.Ref,  # [RB, D]
    pool_ref: jax.Ref,  # [L, NB, 2, bs, KV, D]
    o_ref: jax.Ref,  # [RB, D]
    *,
    pages_per_tile: int,
    scale: float,
    compute_dtype: jnp.dtype,
):
    seq, kv_head = pl.program_id(0), pl.program_id(1)
    rows, head_dim = q_ref.shape
    tile_tokens = pages_per_tile * pool_ref.shape[3]
    layer = layer_ref[0]
    seq_len = seq_lens_ref[seq]
    row_pos = row_pos_ref[...]  # [RB]
    q = q_ref[...].astype(compute_dtype)
    kv_end = jnp.minimum(jnp.max(row_pos) + 1, seq_len)  # keys past the last query: never
    num_tiles = pl.cdiv(jnp.maximum(kv_end, 0), tile_tokens)

    def tile_step(tile: jax.Array, carry: tuple) -> tuple:
        pages = block_tables_ref[seq, pl.ds(tile * pages_per_tile, pages_per_tile)]  # [P]
        k, v = load_kv_tile(pool_ref, layer, pages, kv_head, compute_dtype)  # [t, D] each
        k_pos = tile * tile_tokens + lax.broadcasted_iota(jnp.int32, (tile_tokens,), 0)
        in_context = k_pos < seq_len  # [t]
        v = jnp.where(in_context[:, None], v, 0)
        visible = (k_pos[None, :] <= row_pos[:, None]) & in_context[None, :]  # [RB, t]
        return online_softmax_step(q, k, v, visible, carry, scale=scale)

    _, denom, acc = lax.fori_loop(0, num_tiles, tile_step, init_softmax_state(rows, head_dim))
    # denom == 0 exactly for padding rows: their output is exactly 0.
    safe = jnp.where(denom > 0, denom, 1.0)[:, None]
    out = jnp.where(denom[:, None] > 0, acc / safe, 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_tile", "interpret"))
def ragged_paged_attention(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    pages_per_tile: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal attention of query chunks over paged K/V (prefill chunks and decode tokens mixed).

    q: [S, Q, H, D] (H = KV * G; query head h reads kv head h // G), f32/bf16/f16;
    kv_pool: [L, NB, 2, bs, KV, D]; layer: scalar int; block_tables: [S, W] i32;
    seq_lens: [S] i32, the context length including this step's tokens (0 = padding);
    q_positions: [S, Q] i32 absolute positions, -1 for padding queries. A query at p sees
    keys 0..p of its own sequence. Returns [S, Q, H, D] in q.dtype; padding queries give
    exactly 0. pages_per_tile None: ~64 keys per tile; interpret None: interpret mode
    unless the target is a GPU. Raises ValueError on mismatched shapes or dtypes, a
    non-power-of-two head_dim or block_size, or a bad pages_per_tile.
    """
    check_pallas_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    _, _, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    num_seqs, q_len, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    pages = pages_per_tile_for(block_size, pages_per_tile)
    width = -(-block_tables.shape[1] // pages) * pages
    tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))

    # Rows: query slot major, group head minor; Q and G padded to powers of two, the row
    # count to at least MIN_DOT_DIM. Padding rows get position -1 and zero queries.
    q_pad, g_pad = next_pow2(q_len), next_pow2(group)
    num_rows = max(MIN_DOT_DIM, q_pad * g_pad)
    rows_per_block = min(num_rows, MAX_ROWS_PER_PROGRAM)
    q_rows = q.reshape(num_seqs, q_len, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, q_pad - q_len), (0, g_pad - group), (0, 0)))
    q_rows = q_rows.reshape(num_seqs, num_kv_heads, q_pad * g_pad, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, num_rows - q_pad * g_pad), (0, 0)))
    row_pos = jnp.pad(q_positions, ((0, 0), (0, q_pad - q_len)), constant_values=-1)
    row_pos = jnp.broadcast_to(row_pos[:, :, None], (num_seqs, q_pad, g_pad))
    row_pos = jnp.where(jnp.arange(g_pad) < group, row_pos, -1).reshape(num_seqs, -1)
    row_pos = jnp.pad(row_pos, ((0, 0), (0, num_rows - q_pad * g_pad)), constant_values=-1)

    kernel = functools.partial(
        _ragged_kernel,
        pages_per_tile=pages,
        scale=scale,
        compute_dtype=dot_dtype(q.dtype, kv_pool.dtype),
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda s, k, r: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_rows // rows_per_block),
        in_specs=[
            whole((1,)),
            whole((num_seqs,)),
            pl.BlockSpec((None, rows_per_block), lambda s, k, r: (s, r)),
            whole(tables.shape),
            pl.BlockSpec((None, None, rows_per_block, head_dim), lambda s, k, r: (s, k, r, 0)),
            whole(kv_pool.shape),
        ],
        out_specs=pl.BlockSpec(
            (None, None, rows_per_block, head_dim), lambda s, k, r: (s, k, r, 0)
        ),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=default_interpret(interpret),
        name="jpaged_ragged_paged_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), seq_lens, row_pos, tables, q_rows, kv_pool)
    out = out[:, :, : q_pad * g_pad].reshape(num_seqs, num_kv_heads, q_pad, g_pad, head_dim)
    out = out[:, :, :q_len, :group].transpose(0, 2, 1, 3, 4)  # [S, Q, KV, G, D]
    return out.reshape(q.shape)


def ragged_paged_attention_reference(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """The jnp oracle for `ragged_paged_attention` (same arguments and result): each
    sequence's pages gathered into a contiguous context, then a masked causal softmax."""
    return paged_attention_reference(
        q, kv_pool, layer, block_tables, seq_lens, q_positions, scale=scale
    )
