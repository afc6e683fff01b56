"""Pallas (Triton backend) KV write: scatter this step's new K/V rows into the paged pool.

Grid (T,): a program takes one token, reads its slot, and stores its K and V rows (one [D]
row per kv head) at `block = slot // bs`, `offset = slot % bs` of the given layer. The pool
is aliased input -> output, so only 2 * KV * D elements per token move; under a donated
`lax.scan` carry the pool is updated in place. Padding tokens write into the null block
(block 0), where concurrent writes are harmless. Why Triton and not Mosaic GPU:
see pallas_kernels/paged_attention_pallas.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention_xla import _check_layer, _check_pool
from pallas_kernels.paged_attention_xla import write_kv as write_kv_reference
from pallas_kernels.paged_tiles import default_interpret


def _write_kernel(
    layer_ref: jax.Ref,  # [1] i32
    slots_ref: jax.Ref,  # [T] i32
    k_ref: jax.Ref,  # [KV, D] this token's new K
    v_ref: jax.Ref,  # [KV, D] this token's new V
    pool_in_ref: jax.Ref,  # [L, NB, 2, bs, KV, D] (aliased to pool_ref; never read)
    pool_ref: jax.Ref,  # [L, NB, 2, bs, KV, D]
):
    del pool_in_ref
    token = pl.program_id(0)
    block_size, num_kv_heads = pool_ref.shape[3], pool_ref.shape[4]
    layer = layer_ref[0]
    slot = slots_ref[token]
    block, offset = slot // block_size, slot % block_size
    for head in range(num_kv_heads):  # KV need not be a power of two: one [D] row at a time
        pool_ref[layer, block, 0, offset, head, :] = k_ref[head, :].astype(pool_ref.dtype)
        pool_ref[layer, block, 1, offset, head, :] = v_ref[head, :].astype(pool_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv(
    kv_pool: jax.Array,
    layer: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """Store one layer's new K/V at their slots; returns the updated pool (same buffer).

    kv_pool: [L, NB, 2, bs, KV, D]; layer: scalar int (may be traced); k, v: [T, KV, D];
    slot_mapping: [T] int32, distinct for real tokens (padding tokens point into block 0).
    interpret None: interpret mode unless the target is a GPU. Raises ValueError on mismatched
    shapes, a non-int32 slot_mapping, or a non-power-of-two head_dim.
    """
    _check_pool(kv_pool)
    _check_layer(layer)
    _, _, _, _, num_kv_heads, head_dim = kv_pool.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.ndim != 3 or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k must be [T, {num_kv_heads}, {head_dim}], got {k.shape}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32 [{k.shape[0]}], got {slot_mapping.dtype}"
                         f"{slot_mapping.shape}")  # fmt: skip
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    num_tokens = k.shape[0]
    whole = lambda shape: pl.BlockSpec(shape, lambda t: (0,) * len(shape))  # noqa: E731
    token_rows = pl.BlockSpec((None, num_kv_heads, head_dim), lambda t: (t, 0, 0))
    return pl.pallas_call(
        _write_kernel,
        grid=(num_tokens,),
        in_specs=[
            whole((1,)),
            whole((num_tokens,)),
            token_rows,
            token_rows,
            whole(kv_pool.shape),
        ],  # fmt: skip
        out_specs=whole(kv_pool.shape),
        out_shape=jax.ShapeDtypeStruct(kv_pool.shape, kv_pool.dtype),
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=default_interpret(interpret),
        name="jpaged_write_kv",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), slot_mapping, k, v, kv_pool)


__all__ = ["write_kv", "write_kv_reference"]
