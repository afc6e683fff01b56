"""Pieces shared by the Pallas paged-attention kernels: tile loads, online softmax, checks.

Everything here runs inside a Triton-backend kernel body (or its interpret-mode emulation),
so every array it builds has power-of-two dimensions (a Triton requirement) and every dot
is 2-D with dimensions >= 16.

Pool layout (see paged_attention_xla): kv_pool [L, NB, 2, bs, KV, D]; block 0 is the null
block (garbage, NaN in tests); slots past a sequence's context may hold anything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention_xla import check_attention_args

# Running-max start and masked-score value: finite, so exp(m_old - m_new) never sees
# inf - inf; masked probabilities are zeroed explicitly, never through exp(-inf).
MASK_VALUE = -1e30
# Keys per K/V tile: pages_per_tile = max(1, TILE_TOKENS // block_size).
TILE_TOKENS = 64
# Triton's tl.dot needs M, N, K >= 16.
MIN_DOT_DIM = 16
_KV_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def default_interpret(interpret: bool | None) -> bool:
    """None: interpret mode unless the target is a GPU (Triton kernels compile nowhere else).

    The target is the abstract device of the current abstract mesh when one is set (as when
    lowering for CUDA on a machine without a GPU), else the default backend.
    """
    if interpret is not None:
        return interpret
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return platform != "gpu"


def pages_per_tile_for(block_size: int, pages_per_tile: int | None) -> int:
    """Pages per K/V tile (None: ~TILE_TOKENS keys); raises ValueError if not a power of two."""
    pages = max(1, TILE_TOKENS // block_size) if pages_per_tile is None else pages_per_tile
    if pages < 1 or pages & (pages - 1) or pages * block_size < MIN_DOT_DIM:
        raise ValueError(
            f"pages_per_tile must be a power of two with pages_per_tile * block_size >= "
            f"{MIN_DOT_DIM}, got {pages} pages of {block_size} tokens"
        )
    return pages


def check_pallas_args(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
) -> None:
    """The xla backend's shape checks plus what the Triton kernels need. Raises ValueError."""
    check_attention_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    block_size, head_dim = kv_pool.shape[3], kv_pool.shape[5]
    if head_dim & (head_dim - 1) or head_dim < MIN_DOT_DIM:
        raise ValueError(f"head_dim must be a power of two >= {MIN_DOT_DIM}, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    for name, x in (("q", q), ("kv_pool", kv_pool)):
        if jnp.dtype(x.dtype) not in _KV_DTYPES:
            raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {x.dtype}")
    for name, x in (
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("q_positions", q_positions),
    ):
        if jnp.dtype(x.dtype) != jnp.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")


def dot_dtype(q_dtype: jnp.dtype, kv_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype both dot operands are cast to: the pool's when q matches it, else f32."""
    return jnp.dtype(kv_dtype) if jnp.dtype(q_dtype) == jnp.dtype(kv_dtype) else jnp.float32


def dot_precision(dtype: jnp.dtype) -> lax.Precision | None:
    """f32 dots in full f32 (Triton would use TF32 by default); 16-bit dots as they are."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def load_kv_tile(
    pool_ref: jax.Ref, layer: jax.Array, pages: jax.Array, kv_head: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """K and V of `pages` ([P] block ids) for one kv head: two [P * bs, D] arrays in `dtype`.

    pool_ref: [L, NB, 2, bs, KV, D]. Each page row is D contiguous elements (a coalesced
    load); pages come from the block table, never a gathered copy of the context.
    """
    _, _, _, block_size, _, head_dim = pool_ref.shape
    num_keys = pages.shape[0] * block_size
    k = pool_ref[layer, pages, 0, :, kv_head, :]  # [P, bs, D]
    v = pool_ref[layer, pages, 1, :, kv_head, :]  # [P, bs, D]
    return (
        k.reshape(num_keys, head_dim).astype(dtype),
        v.reshape(num_keys, head_dim).astype(dtype),
    )


def online_softmax_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    visible: jax.Array,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    *,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one K/V tile into the running (max, denominator, unnormalised output).

    q: [R, D]; k, v: [t, D] (V rows outside the context must already be zero: 0 * NaN would
    leak through the dot); visible: [R, t] bool; carry: m [R], l [R], acc [R, D] f32.
    Scores and statistics are f32; P is cast to V's dtype for the PV dot (as FlashAttention
    does), so with 16-bit K/V both dots run on tensor cores with f32 accumulation.
    """
    m_prev, l_prev, acc_prev = carry
    precision = dot_precision(k.dtype)
    scores = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [R, t] f32
    scores = jnp.where(visible, scores, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1))  # [R]
    probs = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)  # [R, t]
    rescale = jnp.exp(m_prev - m_new)  # <= 1; exactly 1 while nothing is visible
    l_new = rescale * l_prev + jnp.sum(probs, axis=1)
    acc = rescale[:, None] * acc_prev + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
    return m_new, l_new, acc


def init_softmax_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """m = MASK_VALUE, l = 0, acc = 0 for `rows` query rows (f32)."""
    return (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
