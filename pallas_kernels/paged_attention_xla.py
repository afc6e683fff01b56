"""The `xla` paged-attention backend: KV-pool writes and block-table attention in `jax.numpy`.

It is the fast path on CPU and the oracle for the Pallas kernels. Layout (fixed):

    kv_pool: [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]   (2: 0 = K, 1 = V)

A token at absolute position p of a sequence with block table `bt` lives in block
`bt[p // block_size]` at offset `p % block_size`; its slot is `block * block_size + offset`.
NOTE: block 0 is a null block that padding points to; its contents are garbage.

Einsum letters: s sequence, q query token of a chunk, k kv head, g query head within its kv
group (query head h = k * G + g), d head dim, t key token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Running-max start and masked-score value: finite so that exp(m_old - m_new) never sees
# inf - inf; masked probabilities are zeroed explicitly, never through exp(-inf).
_MASK_VALUE = -1e30
# Keys per tile when pages_per_tile is None: pages_per_tile = max(1, 64 // block_size).
# Measured (benchmarks/attention_cpu.py, SmolLM2 heads): decode B=64 is flat from 32 to 64
# tokens and slower at 16 or 128; prefill chunks (Q=64) are fastest at 64.
DEFAULT_TILE_TOKENS = 64
# f32 dots stay f32 on every backend (GPUs would otherwise use TF32); no cost on CPU.
_HIGHEST = lax.Precision.HIGHEST


def _check_pool(kv_pool: jax.Array) -> None:
    if kv_pool.ndim != 6 or kv_pool.shape[2] != 2:
        raise ValueError(
            "kv_pool must be [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim], "
            f"got shape {kv_pool.shape}"
        )


def _check_layer(layer: jax.Array | int) -> None:
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(
            f"layer must be a scalar integer, got {jnp.result_type(layer)}{jnp.shape(layer)}"
        )


@jax.jit
def write_kv(
    kv_pool: jax.Array, layer: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> jax.Array:
    """Scatter one layer's new K/V into the pool at their slots; returns the updated pool.

    kv_pool: [L, NB, 2, bs, KV, D]; layer: scalar int (may be traced); k, v: [T, KV, D];
    slot_mapping: [T] int32 (padding tokens point into block 0). One scatter on the whole
    pool, so a donated pool (e.g. the carry of a `lax.scan` over layers) is updated in place.
    Raises ValueError on mismatched shapes.
    """
    _check_pool(kv_pool)
    _check_layer(layer)
    _, _, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.ndim != 3 or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k must be [T, {num_kv_heads}, {head_dim}], got {k.shape}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {slot_mapping.shape}")
    blocks = slot_mapping // block_size  # [T]
    offsets = slot_mapping % block_size  # [T]
    kv = jnp.stack([k, v], axis=1).astype(kv_pool.dtype)  # [T, 2, KV, D]
    # Advanced indices split by a slice: the indexed view is [T, 2, KV, D].
    return kv_pool.at[layer, blocks, :, offsets].set(kv, mode="drop")


def check_attention_args(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
) -> None:
    _check_pool(kv_pool)
    _check_layer(layer)
    num_kv_heads, head_dim = kv_pool.shape[4:]
    if q.ndim != 4 or q.shape[3] != head_dim:
        raise ValueError(f"q must be [S, Q, H, {head_dim}], got {q.shape}")
    num_seqs, q_len, num_heads, _ = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, W], got {block_tables.shape}")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [{num_seqs}], got {seq_lens.shape}")
    if q_positions.shape != (num_seqs, q_len):
        raise ValueError(f"q_positions must be [{num_seqs}, {q_len}], got {q_positions.shape}")


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_tile"))
def paged_attention(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    pages_per_tile: int | None = None,
) -> jax.Array:
    """Causal attention of padded query chunks over paged K/V, one tile of pages at a time.

    q: [S, Q, H, D] (H = KV * G; query head h reads kv head h // G); kv_pool: [L, NB, 2, bs,
    KV, D]; layer: scalar int; block_tables: [S, W] int32; seq_lens: [S] int32, the context
    length including this step's tokens (0 for padding sequences); q_positions: [S, Q] int32,
    absolute positions, -1 for padding queries. A query at position p attends to keys 0..p of
    its own sequence. Returns [S, Q, H, D] in q.dtype; padding queries give exactly 0.

    Loops over ceil(max(seq_lens) / (bs * pages_per_tile)) tiles (a dynamic trip count); each
    iteration gathers the K and V of [S, pages_per_tile] pages from the full pool and updates
    an f32 online softmax. pages_per_tile None: ~DEFAULT_TILE_TOKENS keys per tile.
    Raises ValueError on mismatched shapes or pages_per_tile < 1.
    """
    check_attention_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    num_layers, num_blocks, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    if pages_per_tile is None:
        pages_per_tile = max(1, DEFAULT_TILE_TOKENS // block_size)
    if pages_per_tile < 1:
        raise ValueError(f"pages_per_tile must be >= 1, got {pages_per_tile}")
    num_seqs, q_len, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    tile_tokens = pages_per_tile * block_size

    # Pad the table width to whole tiles (entries 0 = null block, masked by seq_lens).
    width = block_tables.shape[1]
    num_tiles_max = -(-width // pages_per_tile)
    block_tables = jnp.pad(block_tables, ((0, 0), (0, num_tiles_max * pages_per_tile - width)))
    # Row ids of the pool seen as [L * NB, 2, bs, KV, D] (a free reshape), so each gather
    # indexes the whole pool: no per-layer slice is ever materialised.
    page_rows = layer * num_blocks + block_tables.reshape(num_seqs, num_tiles_max, pages_per_tile)
    pool_rows = kv_pool.reshape(num_layers * num_blocks, 2, block_size, num_kv_heads, head_dim)
    kv_heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    gather_dims = lax.GatherDimensionNumbers(
        offset_dims=(3, 4), collapsed_slice_dims=(0, 1, 3), start_index_map=(0, 1, 3)
    )

    def gather_tile(rows: jax.Array, k_or_v: int) -> jax.Array:
        """rows: [S, P] pool rows -> K (0) or V (1) of those pages, [S, KV, t, D] f32.

        Gathering straight into the layout the dots want (head dim minor, kv head a batch dim)
        replaces a gather + transposing copy; measured ~20% faster in f32 and ~2x in bf16
        than one [S, P, 2, bs, KV, D] gather of K and V together (the convert fuses in).
        """
        starts = jnp.broadcast_arrays(rows[:, None, :], jnp.int32(k_or_v), kv_heads[:, None])
        indices = jnp.stack(starts, axis=-1)  # [S, KV, P, 3]: (row, k_or_v, kv head)
        pages = lax.gather(
            pool_rows, indices, gather_dims, slice_sizes=(1, 1, block_size, 1, head_dim),
            mode=lax.GatherScatterMode.CLIP,
        )  # fmt: skip
        # [S, KV, P, bs, D] -> [S, KV, t, D]
        return pages.reshape(num_seqs, num_kv_heads, tile_tokens, head_dim).astype(jnp.float32)

    # All math in f32: on CPU upcasting a bf16 tile before the dots measured faster than bf16
    # dots with f32 accumulation, and it keeps the probabilities unrounded.
    qg = q.reshape(num_seqs, q_len, num_kv_heads, group, head_dim).astype(jnp.float32) * scale
    qg = qg.transpose(0, 2, 3, 1, 4)  # [S, KV, G, Q, D]
    q_pos = q_positions[:, None, None, :, None]  # [S, 1, 1, Q, 1]
    seq_len = seq_lens[:, None, None, None, None]  # [S, 1, 1, 1, 1]
    num_tiles = jnp.minimum(-(-jnp.max(seq_lens) // tile_tokens), num_tiles_max)

    def tile_step(
        tile: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        # row_max, denom: [S, KV, G, Q, 1] f32; acc: [S, KV, G, Q, D] f32 (unnormalised output)
        row_max, denom, acc = carry
        rows = lax.dynamic_index_in_dim(page_rows, tile, axis=1, keepdims=False)  # [S, P]
        k_pos = tile * tile_tokens + jnp.arange(tile_tokens, dtype=jnp.int32)  # [t]
        k = gather_tile(rows, 0)  # [S, KV, t, D]
        # Slots past seq_len (block 0, stale tails) may hold anything, NaN included: 0 * NaN
        # would leak through the PV dot, so their V rows are zeroed.
        in_context = k_pos < seq_lens[:, None]  # [S, t]
        v = jnp.where(in_context[:, None, :, None], gather_tile(rows, 1), 0.0)  # [S, KV, t, D]
        scores = jnp.einsum("skgqd,sktd->skgqt", qg, k, precision=_HIGHEST)  # [S, KV, G, Q, t]
        visible = (k_pos <= q_pos) & (k_pos < seq_len)  # [S, 1, 1, Q, t]
        scores = jnp.where(visible, scores, _MASK_VALUE)
        new_max = jnp.maximum(row_max, scores.max(axis=-1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(scores - new_max), 0.0)  # [S, KV, G, Q, t]
        rescale = jnp.exp(row_max - new_max)  # <= 1; exactly 1 while nothing is visible
        denom = rescale * denom + probs.sum(axis=-1, keepdims=True)
        acc = rescale * acc + jnp.einsum("skgqt,sktd->skgqd", probs, v, precision=_HIGHEST)
        return new_max, denom, acc

    stats_shape = (num_seqs, num_kv_heads, group, q_len, 1)
    init = (
        jnp.full(stats_shape, _MASK_VALUE, jnp.float32),
        jnp.zeros(stats_shape, jnp.float32),
        jnp.zeros((num_seqs, num_kv_heads, group, q_len, head_dim), jnp.float32),
    )
    _, denom, acc = lax.fori_loop(0, num_tiles, tile_step, init)
    # denom == 0 exactly for padding queries and sequences: their output is exactly 0.
    out = jnp.where(denom > 0, acc / jnp.where(denom > 0, denom, 1.0), 0.0)  # [S, KV, G, Q, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_tile"))
def paged_attention_reference(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    pages_per_tile: int | None = None,
) -> jax.Array:
    """The oracle: gather each sequence's pages into a contiguous context, masked softmax.

    Same arguments and result as `paged_attention` (`pages_per_tile` is accepted and ignored).
    Memory is O(S * W * block_size); use it for tests, not for serving.
    """
    del pages_per_tile
    check_attention_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    _, _, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    num_seqs, q_len, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]

    pages = kv_pool[layer, block_tables]  # [S, W, 2, bs, KV, D]
    k = pages[:, :, 0].reshape(num_seqs, width * block_size, num_kv_heads, head_dim)
    v = pages[:, :, 1].reshape(num_seqs, width * block_size, num_kv_heads, head_dim)
    k_pos = jnp.arange(width * block_size, dtype=jnp.int32)  # [W * bs]
    v = jnp.where((k_pos < seq_lens[:, None])[:, :, None, None], v.astype(jnp.float32), 0.0)
    qg = q.reshape(num_seqs, q_len, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = scale * jnp.einsum("sqkgd,stkd->skgqt", qg, k.astype(jnp.float32), precision=_HIGHEST)
    visible = (k_pos <= q_positions[:, None, None, :, None]) & (
        k_pos < seq_lens[:, None, None, None, None]
    )  # [S, 1, 1, Q, W * bs]
    scores = jnp.where(visible, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)  # -inf for a query that sees nothing
    probs = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = probs.sum(axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("skgqt,stkd->skgqd", probs, v, precision=_HIGHEST)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
