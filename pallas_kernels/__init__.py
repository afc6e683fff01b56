"""Attention kernels over the paged KV pool: Pallas kernels and their `jax.numpy` backends."""

from pallas_kernels.paged_attention_xla import (
    DEFAULT_TILE_TOKENS,
    paged_attention,
    paged_attention_reference,
    write_kv,
)

__all__ = [
    "DEFAULT_TILE_TOKENS",
    "paged_attention",
    "paged_attention_reference",
    "write_kv",
]
