"""Attention kernels over the paged KV pool: Pallas kernels and their `jax.numpy` backends."""

from collections.abc import Callable

from pallas_kernels import paged_attention_cpu, paged_attention_pallas
from pallas_kernels.paged_attention_xla import (
    DEFAULT_TILE_TOKENS,
    paged_attention,
    paged_attention_reference,
    write_kv,
)

ATTENTION_BACKENDS = ("xla", "cpu", "pallas")


def attention_functions(backend: str) -> tuple[Callable, Callable]:
    """(paged_attention, write_kv) of an attention backend, both with the `xla` signatures.

    Raises ValueError for a name not in ATTENTION_BACKENDS.
    """
    if backend == "xla":
        return paged_attention, write_kv
    if backend == "cpu":  # the C++ FFI kernel; the KV write stays an XLA scatter
        return paged_attention_cpu.paged_attention_cpu, write_kv
    if backend == "pallas":
        return paged_attention_pallas.paged_attention, paged_attention_pallas.write_kv
    raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_TILE_TOKENS",
    "attention_functions",
    "paged_attention",
    "paged_attention_reference",
    "write_kv",
]
