"""bf16 linear layers on Intel AMX, as a C++ XLA FFI custom call (`linear_amx.cc`).

XLA's CPU dots upcast bf16 operands and run them through f32 kernels, and under `lax.scan`
they first copy each layer's weight slices out of the stacked arrays. This kernel reads a
weight pre-packed once into AMX tile order (`pack`), straight from the stacked [L, ...]
array at a layer index, and multiplies with TDPBF16PS (bf16 products, f32 accumulation).

`available(build_dir)` says whether this CPU has AMX-BF16 and the kernel built and passed a
self-check; callers keep the plain `x @ w` path otherwise.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import cpu_flags, is_loaded, load_kernel

_SOURCE = Path(__file__).with_name("linear_amx.cc")
_TARGET = "jpaged_linear_amx"
_TILE_K, _TILE_N, _PANEL_N = 32, 16, 32
_checked: dict[str, bool] = {}


def cpu_has_amx() -> bool:
    """Whether the CPU reports AMX tiles with bf16 (Sapphire Rapids and later)."""
    flags = cpu_flags().split()
    return "amx_tile" in flags and "amx_bf16" in flags


def pack(w: jax.Array) -> jax.Array:
    """[..., K, N] weights -> [..., NB, KB, 16, 32] bf16 AMX B tiles (K, N zero padded).

    Tile (nb, kb), row r, entry 2 j + i holds w[32 kb + 2 r + i, 16 nb + j].
    """
    *lead, k, n = w.shape
    kp = -(-k // _TILE_K) * _TILE_K
    np_ = -(-n // _PANEL_N) * _PANEL_N
    w = jnp.pad(w.astype(jnp.bfloat16), [(0, 0)] * len(lead) + [(0, kp - k), (0, np_ - n)])
    w = w.reshape(*lead, kp // _TILE_K, _TILE_K // 2, 2, np_ // _TILE_N, _TILE_N)
    nd = len(lead)
    perm = [*range(nd), nd + 3, nd, nd + 1, nd + 4, nd + 2]
    return w.transpose(perm).reshape(*lead, np_ // _TILE_N, kp // _TILE_K, 16, 32)


@functools.partial(jax.jit, static_argnames=("n", "out_dtype"))
def linear_amx(
    x: jax.Array,
    packed: jax.Array,
    layer: jax.Array | int,
    *,
    n: int,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """x [..., K] bf16 @ layer `layer` of `packed` [L, NB, KB, 16, 32] -> [..., n] out_dtype.

    Raises ValueError on mismatched shapes or dtypes, RuntimeError if the kernel is not
    loaded (see `available`).
    """
    if x.dtype != jnp.bfloat16 or packed.dtype != jnp.bfloat16:
        raise ValueError(f"x and packed must be bfloat16, got {x.dtype} and {packed.dtype}")
    if packed.ndim != 5 or packed.shape[3:] != (16, 32):
        raise ValueError(f"packed must be [L, NB, KB, 16, 32], got {packed.shape}")
    k = x.shape[-1]
    nb, kb = packed.shape[1], packed.shape[2]
    if -(-k // _TILE_K) != kb or not (nb - 2) * _TILE_N < n <= nb * _TILE_N:
        raise ValueError(f"x [..., {k}] -> n={n} does not match packed {packed.shape}")
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if not is_loaded(_SOURCE):
        raise RuntimeError("the AMX linear kernel is not loaded: call available(build_dir)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), out_dtype))
    y = call(x2, packed, jnp.asarray(layer, jnp.int32).reshape(()))
    return y.reshape(*lead, n)


def available(build_dir: Path) -> bool:
    """AMX-BF16 present, the kernel built and registered, and a small product checked."""
    key = str(build_dir)
    if key not in _checked:
        ok = cpu_has_amx() and load_kernel(_SOURCE, {_TARGET: "JpagedLinearAmx"}, build_dir)
        if ok:
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((20, 70)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((2, 70, 40)), jnp.bfloat16)
            got = np.asarray(linear_amx(x, pack(w), 1, n=40, out_dtype=jnp.float32))
            want = np.asarray(x, np.float32) @ np.asarray(w[1], np.float32)
            ok = bool(np.allclose(got, want, rtol=1e-3, atol=1e-3))
        _checked[key] = ok
    return _checked[key]
