"""The `cpu` attention backend: paged attention as a C++ XLA FFI custom call.

On CPU, decode is bound by reading K/V, and XLA's gathers copy pages at ~6 GB/s into a
temporary before any dot sees them. `paged_attention_cpu.cc` instead walks each sequence's
block table and reads every page once, straight from the pool, converting rows to f32 in
registers (f32, bf16, f16, fp8 e4m3fn / e5m2 pools), with an online softmax; work items
(query tile, kv head) are shared over XLA's intra-op thread pool. With bf16 queries over a
bf16 pool (head_dim a multiple of 32) on a CPU with AMX-BF16, items run on AMX tiles.

The shared library is compiled at install (`python -m pallas_kernels.prebuild`) or on first use
into `$JPAGED_CACHE_DIR/kernels/` (pallas_kernels.cpu_build: `$CXX`, else `g++`,
`-O3 -march=native`), keyed by the source, flags, jaxlib and CPU. `load()`
says whether that worked; the engine falls back to the `xla` backend when it did not.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import is_loaded, load_kernel, loaded_library
from pallas_kernels.paged_attention_xla import check_attention_args

SOURCE = Path(__file__).with_name("paged_attention_cpu.cc")
_TARGET = "jpaged_paged_attention_cpu"
_UNINITIALIZED = "jpaged_uninitialized"
_QUERY_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
KV_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2)


def load(build_dir: Path) -> bool:
    """Build the kernel into `build_dir` (once per machine) and register it with XLA.

    Returns False (and logs why) where no C++ compiler or no working build exists.
    """
    targets = {_TARGET: "JpagedPagedAttention", _UNINITIALIZED: "JpagedUninitialized"}
    return load_kernel(SOURCE, targets, build_dir)


def uninitialized(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """A new array whose memory is allocated but not written (contents undefined).

    For the KV pool on CPU: zeroing it touches every page (~1.3 s for 4 GiB); this kernel
    never reads a slot before it is written. RuntimeError if the kernel is not loaded.
    """
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu attention kernel is not loaded: call load(build_dir) first")
    call = jax.ffi.ffi_call(_UNINITIALIZED, jax.ShapeDtypeStruct(tuple(shape), dtype))
    return jax.jit(call)()


def prefault_function() -> Callable[[int, int], None] | None:
    """The kernel library's `prefault(address, nbytes)`: faults in every page of the range for
    writing, changing no byte (safe on a pool steps are writing); None if not loaded."""
    lib = loaded_library(SOURCE)
    if lib is None:
        return None
    fn = lib.jpaged_prefault
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t], None
    return fn


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_tile"))
def paged_attention_cpu(
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
    """Causal attention of padded query tiles over paged K/V (same contract as the xla one).

    q: [S, Q, H, D] f32/bf16/f16; kv_pool: [L, NB, 2, bs, KV, D] f32/bf16/f16/fp8;
    layer: scalar int; block_tables: [S, W] int32; seq_lens: [S] int32 (0 = padding);
    q_positions: [S, Q] int32 (-1 = padding). Returns [S, Q, H, D] in q.dtype, exactly 0
    for padding queries. `pages_per_tile` is accepted and ignored (the kernel walks pages).
    Raises ValueError on mismatched shapes or dtypes, RuntimeError if the kernel cannot
    be loaded (see `load`).
    """
    del pages_per_tile
    check_attention_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    if q.dtype not in _QUERY_DTYPES:
        raise ValueError(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if kv_pool.dtype not in KV_DTYPES:
        raise ValueError(f"kv_pool dtype {kv_pool.dtype} is not supported by the cpu kernel")
    if q.shape[3] > 256:
        raise ValueError(f"head_dim must be <= 256, got {q.shape[3]}")
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu attention kernel is not loaded: call load(build_dir) first")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(
        q,
        kv_pool,
        jnp.asarray(layer, jnp.int32).reshape(()),
        block_tables.astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        q_positions.astype(jnp.int32),
        scale=np.float32(scale),
    )
