"""The sampler's row reductions over [S, V] f32 logits as C++ XLA FFI custom calls (CPU).

XLA:CPU runs `argmax`, `logsumexp` and the rank count as separate passes at ~2 GB/s: a
greedy decode step at S = 64 over a 49152-token vocabulary spent ~7 ms in them.
`sampling_cpu.cc` does each row in one or two AVX-512 (or AVX2 + FMA) passes, rows shared
over XLA's intra-op thread pool. Built on first use like the other kernels (pallas_kernels.cpu_build);
`load` says whether that worked, and jpaged.sampler keeps its XLA path where it did not.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_build import has_fma_simd, is_loaded, load_kernel

SOURCE = Path(__file__).with_name("sampling_cpu.cc")
_TARGETS = {"jpaged_row_argmax": "JpagedRowArgmax", "jpaged_row_logprob": "JpagedRowLogprob"}


def load(build_dir: Path) -> bool:
    """Build (once per machine) and register the kernels; False where they cannot run here."""
    return has_fma_simd() and load_kernel(SOURCE, _TARGETS, build_dir)


def _check(x: jax.Array) -> None:
    if x.ndim != 2 or x.shape[1] == 0 or x.dtype != jnp.float32:
        raise ValueError(f"logits must be [S, V > 0] float32, got {x.shape} {x.dtype}")
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu sampling kernels are not loaded: call load(build_dir) first")


def row_argmax(x: jax.Array) -> jax.Array:
    """[S, V] f32 -> [S] i32: the first index of each row's max (V for a row with a NaN)."""
    _check(x)
    call = jax.ffi.ffi_call("jpaged_row_argmax", jax.ShapeDtypeStruct(x.shape[:1], jnp.int32))
    return call(x)


def row_logprob(x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[S, V] f32 logits and [S] chosen ids -> (logsumexp [S] f32, rank [S] i32), rank = how
    many of the row's values are >= the chosen one (ids clipped to [0, V))."""
    _check(x)
    if ids.shape != x.shape[:1]:
        raise ValueError(f"ids must be [{x.shape[0]}], got {ids.shape}")
    out = (
        jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),
        jax.ShapeDtypeStruct(x.shape[:1], jnp.int32),
    )
    return jax.ffi.ffi_call("jpaged_row_logprob", out)(x, ids.astype(jnp.int32))
