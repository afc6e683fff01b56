"""The `cpu` linear backend: matmuls against pre-packed weights as C++ XLA FFI custom calls.

Under `lax.scan`, XLA's CPU dots first copy each layer's weight slices out of the stacked
arrays, and its dot library repacks (transposes) the weights on every call. These kernels read
a weight packed once at load (`pack`), straight from the stacked [L, ...] array at a layer
index (`linear_cpu.cc`):

- float32: FMA, panels of 32 columns ([L, N/32, K, 32]); 14 x 32 register blocks on
  AVX-512, 6 x 16 on AVX2.
- float32 on AMX (`f32_on_amx`, the default where the CPU has AMX-BF16): each f32 value
  split into three bf16 terms and six of the nine products summed in f32 (XLA's
  BF16_BF16_F32_X6 algorithm, TPUs' f32 matmul), [L, NB, KB, 3, 16, 32] (`pack_split`).
- bfloat16: Intel AMX tiles ([L, NB, KB, 16, 32], TDPBF16PS: bf16 products, f32 sums); on
  CPUs without AMX the same tiles on AVX512-BF16's VDPBF16PS (AMD Zen 4 / 5), else widened
  to f32 on AVX2 FMA (Zen 2 / 3, older Intel; linear_avx2.h): f32 sums of the same exact
  products, in another order.

`head_argmax` gives a greedy step's ids from an f32 head in a fraction of its flops: bf16
scores (AMX, or VDPBF16PS) bound each logit, and only the panels that may hold the first
argmax are recomputed exactly (the same ids as the f32 logits, bit for bit). AVX-512 with
AMX-BF16 or AVX512-BF16 only (`has_bf16_dot`).

`silu_mul` is SwiGLU's silu(gate) * up between the gate|up and the down linear, one AVX-512
or AVX2 pass (XLA:CPU's bf16 silu runs at ~5 ns an element); `rope_qkv` splits the fused
q|k|v projection and applies RoPE to q and k in one bf16 pass (AVX-512 only).

`available(build_dir, dtype)` says whether this CPU has the instructions, the kernel built and
a small product checked out; callers keep plain `x @ w` otherwise.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import cpu_flags, has_fma_simd, is_loaded, load_kernel

SOURCE = Path(__file__).with_name("linear_cpu.cc")
_TARGETS = {
    "jpaged_linear_amx": "JpagedLinearAmx",
    "jpaged_linear_amx_swiglu": "JpagedLinearAmxSwiglu",
    "jpaged_linear_amx_argmax": "JpagedLinearAmxArgmax",
    "jpaged_linear_f32": "JpagedLinearF32",
    "jpaged_linear_f32_amx": "JpagedLinearF32Amx",
    "jpaged_silu_mul": "JpagedSiluMul",
    "jpaged_rope_qkv": "JpagedRopeQkv",
    "jpaged_head_argmax": "JpagedHeadArgmax",
}
_TILE_K, _TILE_N, _PANEL_N = 32, 16, 32
DTYPES = ("float32", "bfloat16")
_checked: dict[tuple[str, str], bool] = {}


def cpu_supports(dtype: str) -> bool:
    """Whether the CPU has the instructions the `dtype` kernel needs: AVX-512F or AVX2 + FMA
    (bf16 runs on AMX-BF16 where the CPU has it, else on AVX2 + FMA)."""
    return dtype in DTYPES and has_fma_simd()


def has_amx() -> bool:
    """Whether the bf16 kernels run on AMX tiles here (and `head_argmax` can run at all)."""
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(cpu_flags().split())


def has_bf16_dot() -> bool:
    """Whether bf16 products run far faster than f32 FMA here: AMX-BF16, or AVX512-BF16's
    VDPBF16PS (AMD Zen 4 / 5) with AVX-512F (what `head_argmax` screens with)."""
    return has_amx() or {"avx512f", "avx512_bf16"} <= set(cpu_flags().split())


def f32_on_amx() -> bool:
    """Whether f32 linears run as bf16 x 6 on AMX (`pack_split`) rather than on FMA: where the
    CPU has AMX-BF16, unless $JPAGED_F32_LINEAR is "fma" (any other value but "amx" raises)."""
    mode = os.environ.get("JPAGED_F32_LINEAR", "amx")
    if mode not in ("amx", "fma"):
        raise ValueError(f"JPAGED_F32_LINEAR must be amx or fma, got {mode!r}")
    return mode == "amx" and has_amx()


def split_bf16(w: jax.Array) -> jax.Array:
    """f32 [...] -> bf16 [3, ...]: w0 = bf16(w), w1 = bf16(w - w0), w2 = bf16(w - w0 - w1), so
    w0 + w1 + w2 == w for every finite w whose terms stay normal (3 x 8 significand bits)."""
    planes = []
    rest = w.astype(jnp.float32)
    for _ in range(3):
        planes.append(rest.astype(jnp.bfloat16))
        rest = rest - planes[-1].astype(jnp.float32)
    return jnp.stack(planes)


def pack_split(w: jax.Array) -> jax.Array:
    """[..., K, N] f32 weights -> [..., NB, KB, 3, 16, 32] bf16 for the f32-on-AMX kernel: the
    three `split_bf16` planes of each AMX B tile (`pack`'s bf16 layout) side by side."""
    if w.dtype != jnp.float32:
        raise ValueError(f"pack_split takes float32 weights, got {w.dtype}")
    planes = [pack(plane) for plane in split_bf16(w)]
    return jnp.stack(planes, axis=-3)


def pack(w: jax.Array) -> jax.Array:
    """[..., K, N] f32 or bf16 weights -> the kernel's layout for that dtype (zero padded).

    f32: [..., N/32, K, 32], panel j holding columns 32 j .. 32 j + 31.
    bf16: [..., NB, KB, 16, 32] AMX B tiles; tile (nb, kb), row r, entry 2 j + i holds
    w[32 kb + 2 r + i, 16 nb + j].
    """
    *lead, k, n = w.shape
    nd = len(lead)
    np_ = -(-n // _PANEL_N) * _PANEL_N
    if w.dtype == jnp.float32:
        w = jnp.pad(w, [(0, 0)] * nd + [(0, 0), (0, np_ - n)])
        w = w.reshape(*lead, k, np_ // _PANEL_N, _PANEL_N)
        return jnp.moveaxis(w, nd + 1, nd)
    if w.dtype != jnp.bfloat16:
        raise ValueError(f"pack takes float32 or bfloat16 weights, got {w.dtype}")
    kp = -(-k // _TILE_K) * _TILE_K
    w = jnp.pad(w, [(0, 0)] * nd + [(0, kp - k), (0, np_ - n)])
    w = w.reshape(*lead, kp // _TILE_K, _TILE_K // 2, 2, np_ // _TILE_N, _TILE_N)
    perm = [*range(nd), nd + 3, nd, nd + 1, nd + 4, nd + 2]
    return w.transpose(perm).reshape(*lead, np_ // _TILE_N, kp // _TILE_K, 16, 32)


def packed_rows(packed: jax.Array, rows: jax.Array, k: int) -> jax.Array:
    """Columns `rows` of the unpacked [K, N] weight, as rows [..., k]: w.T[rows] (packed: the
    one-layer [1, ...] array of `pack`). Lets a tied embedding be looked up in its packed head."""
    if packed.ndim == 4:  # f32 panels [1, NP, K, 32]
        return packed[0][rows // _PANEL_N, :, rows % _PANEL_N]
    nb, kb = packed.shape[1:3]
    tiles = packed[0].reshape(nb, kb, 16, _TILE_N, 2)
    cols = tiles[rows // _TILE_N, :, :, rows % _TILE_N, :]  # [..., KB, 16, 2]
    return cols.reshape(*rows.shape, kb * _TILE_K)[..., :k]


@functools.partial(jax.jit, static_argnames=("n", "out_dtype"))
def linear_cpu(
    x: jax.Array,
    packed: jax.Array,
    layer: jax.Array | int,
    *,
    n: int,
    out_dtype: jnp.dtype | None = None,
    rows: jax.Array | int | None = None,
) -> jax.Array:
    """x [..., K] @ layer `layer` of `packed` (see `pack`; an f32 x also takes `pack_split`'s
    bf16 planes) -> [..., n].

    out_dtype: x's dtype by default; a bf16 x may also give float32. rows: compute only the
    first `rows` rows of x (flattened to [M, K]; a traced count, so a padded step skips its
    padding), the others give 0; default all. Raises ValueError on mismatched shapes or
    dtypes, RuntimeError if the kernel is not loaded (see `available`).
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    k = x.shape[-1]
    if x.dtype == jnp.float32 and packed.dtype == jnp.bfloat16 and packed.ndim == 6:
        nb = packed.shape[1]
        ok = packed.shape[3:] == (3, 16, 32) and -(-k // _TILE_K) == packed.shape[2]
        if not (ok and (nb - 2) * _TILE_N < n <= nb * _TILE_N and out_dtype == jnp.float32):
            raise ValueError(f"x [..., {k}] f32 -> n={n} {out_dtype} does not match split "
                             f"packed {packed.shape}")  # fmt: skip
        return _call_packed("jpaged_linear_f32_amx", x, packed, layer, n, out_dtype, rows)
    if x.dtype != packed.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x and packed must both be float32 or bfloat16, got {x.dtype}, "
                         f"{packed.dtype}")  # fmt: skip
    if x.dtype == jnp.float32:
        target = "jpaged_linear_f32"
        ok = packed.ndim == 4 and packed.shape[2:] == (k, _PANEL_N)
        ok = ok and (packed.shape[1] - 1) * _PANEL_N < n <= packed.shape[1] * _PANEL_N
        if out_dtype != jnp.float32:
            raise ValueError(f"out_dtype of a float32 x must be float32, got {out_dtype}")
    else:
        target = "jpaged_linear_amx"
        nb = packed.shape[1] if packed.ndim == 5 else 0
        ok = packed.ndim == 5 and packed.shape[3:] == (16, 32)
        ok = ok and -(-k // _TILE_K) == packed.shape[2] and (nb - 2) * _TILE_N < n <= nb * _TILE_N
        if out_dtype not in (jnp.bfloat16, jnp.float32):
            raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if not ok:
        raise ValueError(f"x [..., {k}] -> n={n} does not match packed {packed.shape}")
    return _call_packed(target, x, packed, layer, n, out_dtype, rows)


def _call_packed(target: str, x: jax.Array, packed: jax.Array, layer: jax.Array | int, n: int,
                 out_dtype: jnp.dtype, rows: jax.Array | int | None) -> jax.Array:  # fmt: skip
    """The linear kernels' common call: x [..., K] flattened to rows, out [..., n]."""
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu linear kernels are not loaded: call available(build_dir)")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], n), out_dtype))
    rows = jnp.asarray(x2.shape[0] if rows is None else rows, jnp.int32).reshape(())
    return call(x2, packed, jnp.asarray(layer, jnp.int32).reshape(()), rows).reshape(*lead, n)


def pack_swiglu(w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """[..., K, F] bf16 gate and up weights -> one packed array for `linear_swiglu`: the
    columns alternate 16 of gate and the same 16 of up, so each 32-column block of the AMX
    kernel holds both halves of 16 outputs. Raises ValueError unless F % 16 == 0 and bf16."""
    *lead, k, f = w_gate.shape
    if w_gate.dtype != jnp.bfloat16 or w_up.shape != w_gate.shape or f % _TILE_N:
        raise ValueError(f"pack_swiglu takes bf16 [..., K, F] weights, F % 16 == 0, got "
                         f"{w_gate.shape} {w_gate.dtype} and {w_up.shape}")  # fmt: skip
    split = [w.reshape(*lead, k, f // _TILE_N, 1, _TILE_N) for w in (w_gate, w_up)]
    return pack(jnp.concatenate(split, axis=-2).reshape(*lead, k, 2 * f))


@functools.partial(jax.jit, static_argnames=("f",))
def linear_swiglu(
    x: jax.Array, packed: jax.Array, layer: jax.Array | int, *, f: int,
    rows: jax.Array | int | None = None,
) -> jax.Array:  # fmt: skip
    """silu(x @ W_gate) * (x @ W_up), [..., F] bf16, in one AMX pass (`pack_swiglu` weights):
    the same values as `silu_mul` of `linear_cpu`'s gate|up product (the same roundings).
    rows: as `linear_cpu`. Raises ValueError on mismatched shapes, RuntimeError if the
    kernel is not loaded."""
    k = x.shape[-1]
    nb = packed.shape[1] if packed.ndim == 5 else 0
    ok = x.dtype == jnp.bfloat16 and packed.ndim == 5 and packed.shape[3:] == (16, 32)
    ok = ok and -(-k // _TILE_K) == packed.shape[2] and nb * _TILE_N == 2 * f and f % _TILE_N == 0
    if not ok:
        raise ValueError(f"x [..., {k}] {x.dtype} -> f={f} does not match packed {packed.shape}")
    return _call_packed("jpaged_linear_amx_swiglu", x, packed, layer, f, x.dtype, rows)


@functools.partial(jax.jit, static_argnames=("n",))
def linear_argmax(
    x: jax.Array, packed: jax.Array, *, n: int, rows: jax.Array | int | None = None
) -> jax.Array:
    """First argmax of each row of `linear_cpu(x, packed, 0, n=n, out_dtype=float32)` (V = n
    for a row with NaN), [M] i32, without writing the [M, n] logits: bf16 x and a one-layer
    packed head. rows: as `linear_cpu` (the others give 0). Raises ValueError on mismatched
    shapes, RuntimeError if the kernel is not loaded."""
    k = x.shape[-1]
    nb = packed.shape[1] if packed.ndim == 5 else 0
    ok = x.dtype == jnp.bfloat16 and x.ndim == 2 and packed.ndim == 5 and packed.shape[0] == 1
    ok = ok and packed.shape[3:] == (16, 32) and -(-k // _TILE_K) == packed.shape[2]
    if not (ok and (nb - 2) * _TILE_N < n <= nb * _TILE_N):
        raise ValueError(f"x {x.shape} {x.dtype} -> n={n} does not match packed {packed.shape}")
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu linear kernels are not loaded: call available(build_dir)")
    call = jax.ffi.ffi_call(
        "jpaged_linear_amx_argmax", jax.ShapeDtypeStruct((x.shape[0],), jnp.int32)
    )
    rows = jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32).reshape(())
    return call(x, packed, rows, n=np.int64(n))


def head_norms(head: jax.Array) -> jax.Array:
    """|w_v| for each column v of an unpacked [K, V] head, f32 (for `head_argmax`)."""
    return jnp.sqrt(jnp.sum(jnp.square(head.astype(jnp.float32)), axis=0))


@jax.jit
def head_argmax(
    x: jax.Array,
    packed_f32: jax.Array,
    packed_bf16: jax.Array,
    norms: jax.Array,
    rows: jax.Array | int | None = None,
) -> jax.Array:
    """First argmax of each row of x [R, K] f32 @ the head, without the f32 product: [R] i32.

    packed_f32 / packed_bf16: the [K, V] head packed (`pack`, L = 1) as f32 and as bf16;
    norms: `head_norms`. The ids equal those of `linear_cpu(x, packed_f32, 0, n=V)`'s logits
    (first maximum; V for a row with NaN). rows: only the first `rows` rows (the others give
    0). Needs `has_bf16_dot` and `available(build_dir, "bfloat16")`.
    """
    v = norms.shape[0]
    scores = linear_cpu(x.astype(jnp.bfloat16), packed_bf16, 0, n=v, out_dtype=jnp.float32,
                        rows=rows)  # fmt: skip
    rows = jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32).reshape(())
    call = jax.ffi.ffi_call("jpaged_head_argmax", jax.ShapeDtypeStruct((x.shape[0],), jnp.int32))
    return call(scores, x, packed_f32, norms, rows)


@jax.jit
def silu_mul(gate_up: jax.Array) -> jax.Array:
    """[..., 2F] (gate, then up) -> silu(gate) * up [..., F], float32 or bfloat16.

    bf16 rounds as torch's bf16 SwiGLU does (silu to bf16, then the product); f32 matches
    `jax.nn.silu(gate) * up` to ~1e-6 relative. Raises ValueError on an odd last axis or
    another dtype, RuntimeError if the kernel is not loaded (see `available`).
    """
    if gate_up.dtype not in (jnp.float32, jnp.bfloat16) or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2F] float32 or bfloat16, got {gate_up.shape} "
                         f"{gate_up.dtype}")  # fmt: skip
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu linear kernels are not loaded: call available(build_dir)")
    *lead, two_f = gate_up.shape
    x2 = gate_up.reshape(-1, two_f)
    out = jax.ShapeDtypeStruct((x2.shape[0], two_f // 2), gate_up.dtype)
    return jax.ffi.ffi_call("jpaged_silu_mul", out)(x2).reshape(*lead, two_f // 2)


def rope_qkv_supported(dtype: jnp.dtype, head_dim: int) -> bool:
    """Whether `rope_qkv` takes this dtype and head size (bf16, head_dim a multiple of 32)
    on this CPU (AVX-512F)."""
    ok = jnp.dtype(dtype) == jnp.bfloat16 and head_dim % 32 == 0
    return ok and "avx512f" in cpu_flags().split()


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads"))
def rope_qkv(
    qkv: jax.Array, cos: jax.Array, sin: jax.Array, *, num_heads: int, num_kv_heads: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv [T, (H + 2 KV) E] bf16 -> (q [T, H, E], k [T, KV, E]) rotated, and v [T, KV, E].

    cos, sin: [T, 1, E] or [T, E] f32 (models.rope.rope_tables). Equals models.rope's
    `apply_rope` with torch's bf16 rounding (cos / sin, both products and the sum each rounded
    to bf16). Raises ValueError where `rope_qkv_supported` is false or shapes do not match.
    """
    t, width = qkv.shape
    e = cos.shape[-1]
    if not rope_qkv_supported(qkv.dtype, e) or width != (num_heads + 2 * num_kv_heads) * e:
        raise ValueError(f"qkv must be [T, {num_heads + 2 * num_kv_heads} * E] bf16 with E % 32 "
                         f"== 0, got {qkv.shape} {qkv.dtype}, E = {e}")  # fmt: skip
    if not is_loaded(SOURCE):
        raise RuntimeError("the cpu linear kernels are not loaded: call available(build_dir)")
    cos, sin = (a.reshape(t, e).astype(jnp.float32) for a in (cos, sin))
    out = (
        jax.ShapeDtypeStruct((t, num_heads, e), qkv.dtype),
        jax.ShapeDtypeStruct((t, num_kv_heads, e), qkv.dtype),
        jax.ShapeDtypeStruct((t, num_kv_heads, e), qkv.dtype),
    )
    return jax.ffi.ffi_call("jpaged_rope_qkv", out)(qkv, cos, sin)


def available(build_dir: Path, dtype: str) -> bool:
    """The `dtype` kernel can run here: instructions present, built, and a product checked."""
    key = (str(build_dir), dtype)
    if key not in _checked:
        ok = cpu_supports(dtype) and load_kernel(SOURCE, _TARGETS, build_dir)
        if ok:
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((20, 70)), dtype)
            w = jnp.asarray(rng.standard_normal((2, 70, 40)), dtype)
            got = linear_cpu(x, pack(w), 1, n=40, out_dtype=jnp.float32)
            want = np.asarray(x, np.float32) @ np.asarray(w[1], np.float32)
            ok = bool(np.allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3))
        _checked[key] = ok
    return _checked[key]
