"""The `pallas` attention backend: Pallas GPU kernels behind the `xla` backend's signatures.

    paged_attention(q [S, Q, H, D], kv_pool, layer, block_tables, seq_lens, q_positions,
                    *, scale) -> [S, Q, H, D]
        Q == 1: paged_decode_pallas.paged_decode_attention (split-K decode)
        Q > 1:  paged_ragged_pallas.ragged_paged_attention (prefill chunks + decode mixed)
    write_kv(kv_pool, layer, k, v, slot_mapping) -> kv_pool   (kv_write_pallas)

On a GPU the kernels are compiled; on any other platform they run in Pallas interpret mode
(slow, exact: used by the tests on CPU).

GPU backend: Triton, not Mosaic GPU. What jax 0.12 says and does (checked in its docs and
source, and on this CPU-only machine):
- Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`) is documented as the "experimental GPU
  backend for Pallas targeting H100"; its quickstart targets Hopper, its fast paths (TMA,
  WGMMA, warp specialisation) are Hopper/Blackwell features. Its `pallas_call` does not
  lower without a GPU: no lowering rule is registered (`assert rule is not None` in
  `pallas_call.gpu_lowering`, checked here; FACTS.md: the same with jax-cuda12-plugin), so
  nothing written for it could be checked in this project's CPU CI.
- The Triton backend (`jax.experimental.pallas.triton`) is deprecated since jax 0.11 (the
  lowering warns "will be removed in a future JAX version") but is still the one shipped,
  working Pallas GPU backend in 0.12. It runs on every NVIDIA GPU Triton supports (Ampere
  sm_80 and newer: A100, L4, H100, H200, ...), and it lowers for CUDA on a CPU-only machine
  under an abstract GPU device (`tests/test_pallas_export.py` exports all three kernels).
  It has no scalar prefetch, so block tables are ordinary inputs read inside the kernel,
  and every in-kernel array must have power-of-two dimensions (dots >= 16 per side): the
  wrappers pad G, Q and rows accordingly; head_dim and block_size must be powers of two.
- No Hopper-only feature is used, so one code path serves Ampere and Hopper alike. When
  the Triton backend is removed from JAX, these kernels need porting (Mosaic GPU, or
  jax-triton with the official Triton bindings); the interpret-mode tests stay the spec.
- Not yet run on a GPU: lowering (checked) builds the Triton IR, but Triton's compilation
  to PTX and the numerics on hardware are unverified; `attention_backend="xla"` is the
  fallback on a GPU.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.kv_write_pallas import write_kv
from pallas_kernels.paged_decode_pallas import paged_decode_attention
from pallas_kernels.paged_ragged_pallas import ragged_paged_attention
from pallas_kernels.paged_tiles import check_pallas_args


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def paged_attention(
    q: jax.Array,
    kv_pool: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    interpret: bool | None = None,
) -> jax.Array:
    """Same arguments and result as `paged_attention_xla.paged_attention`, on the Pallas
    kernels: the decode kernel when Q == 1, the ragged kernel otherwise.

    q: [S, Q, H, D]; kv_pool: [L, NB, 2, bs, KV, D]; layer: scalar int; block_tables:
    [S, W] i32; seq_lens: [S] i32; q_positions: [S, Q] i32 (-1 = padding). Returns
    [S, Q, H, D] in q.dtype. Raises ValueError as the kernels' entries do.
    """
    check_pallas_args(q, kv_pool, layer, block_tables, seq_lens, q_positions)
    args = (q, kv_pool, layer, block_tables, seq_lens, q_positions)
    if q.shape[1] == 1:
        return paged_decode_attention(*args, scale=scale, interpret=interpret)
    return ragged_paged_attention(*args, scale=scale, interpret=interpret)


__all__ = ["paged_attention", "write_kv"]
