"""The paged KV pool: the one place that knows its shape, layout and size in bytes.

Layout: `[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]`, index 0 of
the third axis is K, 1 is V. Block 0 is the null block: never allocated, padding writes
into it. The pool is allocated once and donated to every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import LlamaConfig


def kv_pool_shape(config: LlamaConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """Shape of the pool for `num_blocks` blocks of `block_size` tokens."""
    return (
        config.num_hidden_layers,
        num_blocks,
        2,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
    )


def kv_bytes_per_block(config: LlamaConfig, block_size: int, dtype: jnp.dtype) -> int:
    """Bytes one block occupies across all layers (K and V)."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * block_size * jnp.dtype(dtype).itemsize


def num_blocks_for_budget(
    config: LlamaConfig, block_size: int, dtype: jnp.dtype, budget_bytes: int
) -> int:
    """How many blocks fit in `budget_bytes` (including the null block).

    Raises ValueError when the budget cannot hold two blocks (the null block and one more).
    """
    per_block = kv_bytes_per_block(config, block_size, dtype)
    num_blocks = int(budget_bytes // per_block)
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_memory of {budget_bytes} bytes holds {num_blocks} blocks of "
            f"{per_block} bytes; at least 2 are needed"
        )
    return num_blocks


def device_kv_budget(
    weight_bytes: int, activation_bytes: int, gpu_memory_utilization: float
) -> int | None:
    """KV budget in bytes on an accelerator: utilization × memory − weights − activations.

    Returns None where the device reports no memory limit (CPU).
    """
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return None
    return int(limit * gpu_memory_utilization) - weight_bytes - activation_bytes


def allocate_kv_pool(
    config: LlamaConfig,
    num_blocks: int,
    block_size: int,
    dtype: jnp.dtype,
    sharding: jax.sharding.Sharding | None = None,
    *,
    zeroed: bool = True,
) -> jax.Array:
    """A pool created directly on its device(s): zeroed, or with zeroed=False (one CPU device,
    the `cpu` attention kernel loaded) allocated but not written, which skips touching every
    page at start-up; that kernel never reads a slot before the engine writes it."""
    shape = kv_pool_shape(config, num_blocks, block_size)
    if not zeroed:
        from pallas_kernels import paged_attention_cpu

        return paged_attention_cpu.uninitialized(shape, jnp.dtype(dtype))
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
