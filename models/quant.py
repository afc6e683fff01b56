"""Quantized linear layers: the device layouts, packing, dequantization and the matmul.

A layer's linear `name` (wq, wk, ..., w_down; [in, out] = [K, N]) is either a float array
`name`, or a group of arrays with keys `name.<part>` beside it in the layer's weight dict
(all stackable on the leading layer axis, so the layers still run under `lax.scan`):

- int8 weight-only, per output channel: `name.q8` [K, N] int8 and `name.scale` [N]
  (the model dtype); w = q8 * scale.
- 4-bit with groups (AWQ and GPTQ load into this one layout): `name.qweight` [K/8, N]
  int32, eight 4-bit values packed along input rows (nibble i of packed row r is row
  8r + i, GPTQ's order); `name.scales` [G, N] f16; `name.zeros` [G, N] uint8; and for
  GPTQ act-order checkpoints `name.perm` [K] int32. Rows are stored sorted by group, so
  group g is rows g*gs .. (g+1)*gs - 1 and the input is gathered `x[..., perm]` first;
  w_sorted = (q - zeros[g]) * scales[g].

Under tensor parallelism these split like the float weight: column-split layers by N
(every array's last axis), row-split layers by K in whole groups (qweight rows K/8,
scales/zeros rows G, perm by K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
PACK = 8  # 4-bit values per int32
_SHIFTS = np.arange(PACK, dtype=np.uint32) * 4  # [8] bit offset of nibble i


# ---- packing (numpy, at load / quantize time) -----------------------------------------------


def pack_int4_rows(q: np.ndarray) -> np.ndarray:
    """[K, N] ints in 0..15 -> [K/8, N] int32, nibble i of row r = q[8r + i] (GPTQ order)."""
    k, n = q.shape
    if k % PACK:
        raise ValueError(f"rows ({k}) must be a multiple of {PACK} to pack 4-bit values")
    u = q.astype(np.uint32).reshape(k // PACK, PACK, n) << _SHIFTS[None, :, None]
    return np.bitwise_or.reduce(u, axis=1).view(np.int32)


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_int4_rows`: [K/8, N] int32 -> [K, N] uint8."""
    u = packed.view(np.uint32)
    q = (u[:, None, :] >> _SHIFTS[None, :, None]) & 0xF  # [K/8, 8, N]
    return q.reshape(-1, packed.shape[1]).astype(np.uint8)


def pack_int4_cols(q: np.ndarray, order: tuple[int, ...] = tuple(range(PACK))) -> np.ndarray:
    """[R, N] ints in 0..15 -> [R, N/8] int32; nibble i of packed column c = q[:, 8c + order[i]]."""
    r, n = q.shape
    if n % PACK:
        raise ValueError(f"columns ({n}) must be a multiple of {PACK} to pack 4-bit values")
    u = q.astype(np.uint32).reshape(r, n // PACK, PACK)[:, :, list(order)]
    return np.bitwise_or.reduce(u << _SHIFTS[None, None, :], axis=2).view(np.int32)


def unpack_int4_cols(packed: np.ndarray, order: tuple[int, ...] = tuple(range(PACK))) -> np.ndarray:
    """Inverse of `pack_int4_cols`: [R, N/8] int32 -> [R, N] uint8."""
    u = packed.view(np.uint32)
    nibbles = (u[:, :, None] >> _SHIFTS[None, None, :]) & 0xF  # [R, N/8, 8] by nibble
    q = np.empty_like(nibbles)
    q[:, :, list(order)] = nibbles  # column 8c + order[i] is nibble i
    return q.reshape(packed.shape[0], -1).astype(np.uint8)


# ---- building the device layouts (numpy) ----------------------------------------------------


def int8_from_float(w: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric per-output-channel int8 of w [..., K, N]: {"q8": int8, "scale": [..., N] f32}."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=-2)  # [..., N]
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q8 = np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8)
    return {"q8": q8, "scale": scale}


def int4_from_unpacked(
    q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray
) -> dict[str, np.ndarray]:
    """The 4-bit device layout from unpacked values in checkpoint row order.

    q: [K, N] 0..15; zeros: [G, N] 0..15; scales: [G, N]; g_idx: [K] group of each row.
    Rows are sorted by group (stable); `perm` is kept only when that is not the identity.
    Raises ValueError when groups are not all of one size.
    """
    k = q.shape[0]
    g_idx = np.asarray(g_idx, np.int64)
    num_groups = zeros.shape[0]
    counts = np.bincount(g_idx, minlength=num_groups)
    if g_idx.min() < 0 or g_idx.max() >= num_groups or np.any(counts != k // num_groups):
        raise ValueError(f"g_idx must put {k // num_groups} rows in each of {num_groups} groups")
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    out = {
        "qweight": pack_int4_rows(q[perm]),
        "scales": np.asarray(scales, np.float16),
        "zeros": np.asarray(zeros, np.uint8),
    }
    if not np.array_equal(perm, np.arange(k)):
        out["perm"] = perm
    return out


# ---- dequantize and matmul (jax) ------------------------------------------------------------


def parts_of(w: dict[str, jax.Array], name: str) -> dict[str, jax.Array] | None:
    """The quantized group of linear `name` in a layer's weight dict, or None if it is float."""
    prefix = name + "."
    parts = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
    return parts or None


def unpack_int4(qweight: jax.Array) -> jax.Array:
    """[K/8, N] int32 -> [K, N] int32 in 0..15 (row 8r + i is nibble i of packed row r)."""
    shifts = jnp.arange(PACK, dtype=jnp.int32) * 4
    q = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    return q.reshape(-1, qweight.shape[-1])


def dequantize(parts: dict[str, jax.Array], *, sorted_rows: bool = False) -> jax.Array:
    """The f32 weight [K, N] of one quantized linear (checkpoint row order unless sorted_rows)."""
    if "q8" in parts:
        return parts["q8"].astype(jnp.float32) * parts["scale"].astype(jnp.float32)
    q = unpack_int4(parts["qweight"])  # [K, N]
    k, n = q.shape
    g = parts["scales"].shape[0]
    zeros = parts["zeros"].astype(jnp.int32)[:, None, :]  # [G, 1, N]
    scales = parts["scales"].astype(jnp.float32)[:, None, :]
    w = ((q.reshape(g, k // g, n) - zeros).astype(jnp.float32) * scales).reshape(k, n)
    if "perm" in parts and not sorted_rows:
        w = jnp.zeros_like(w).at[parts["perm"]].set(w)  # row perm[j] of the checkpoint is row j
    return w


def quant_matmul_xla(x: jax.Array, parts: dict[str, jax.Array]) -> jax.Array:
    """x [..., K] @ the quantized weight -> [..., N] in x's dtype (dequantize, then one dot)."""
    if "q8" in parts:  # per-channel scale commutes with the dot: scale after it
        y = jnp.dot(x, parts["q8"].astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * parts["scale"].astype(jnp.float32)).astype(x.dtype)
    if "perm" in parts:
        x = jnp.take(x, parts["perm"], axis=-1)
    w = dequantize(parts, sorted_rows=True).astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def linear(x: jax.Array, w: dict[str, jax.Array], name: str) -> jax.Array:
    """x [..., K] @ layer weight `name` [K, N], float or quantized (Pallas kernel on GPU)."""
    if name in w:
        return x @ w[name]
    parts = parts_of(w, name)
    if parts is None:
        raise KeyError(f"layer weights have neither {name!r} nor a quantized {name}.*")
    if jax.default_backend() == "gpu":
        from pallas_kernels.quant_matmul import quant_matmul

        lead = x.shape[:-1]
        y = quant_matmul(x.reshape(-1, x.shape[-1]), parts)
        return y.reshape(*lead, -1)
    return quant_matmul_xla(x, parts)


def linear_weight_bytes(
    layers: dict[str, jax.Array] | list[dict[str, jax.Array]],
) -> tuple[int, int]:
    """(bytes the linears take as stored, bytes they would take in f32).

    layers: stacked [L, ...] layer weights, a list of per-layer dicts (unrolled layers), or
    a runner's whole params (its layers plus any linears packed for the cpu kernels).
    """
    if "layers" in layers:  # whole params
        packed = [v for k, v in layers.get("packed", {}).items() if k != "head"]
        stored, as_f32 = linear_weight_bytes(layers["layers"])
        return stored + sum(v.nbytes for v in packed), as_f32 + sum(v.size * 4 for v in packed)
    if isinstance(layers, list):
        sizes = [linear_weight_bytes(w) for w in layers]
        return sum(a for a, _ in sizes), sum(b for _, b in sizes)
    stored, as_f32 = 0, 0
    for name in LINEAR_NAMES:
        if name in layers:
            stored += layers[name].nbytes
            as_f32 += layers[name].size * 4
            continue
        parts = parts_of(layers, name) or {}
        stored += sum(int(v.nbytes) for v in parts.values())
        if "q8" in parts:
            as_f32 += parts["q8"].size * 4
        elif "qweight" in parts:
            as_f32 += parts["qweight"].size * PACK * 4
    return stored, as_f32


COLUMN_SPLIT = ("wq", "wk", "wv", "w_gate", "w_up")  # split by output features (N)
ROW_SPLIT = ("wo", "w_down")  # split by input features (K), i.e. by whole groups


def partition_spec(name: str, part: str, axis: str = "tp") -> tuple[str | None, ...]:
    """Partition spec (as a tuple for `PartitionSpec(*spec)`) of a stacked [L, ...] part.

    Column-split linears shard every part's output axis; row-split ones shard qweight / q8
    rows and scales / zeros groups (so a shard holds whole groups), with the per-channel
    int8 scale replicated. `perm` stays replicated: the gather it drives spans all of K.
    """
    if part == "perm" or (name in ROW_SPLIT and part == "scale"):
        return (None, None)
    if name in COLUMN_SPLIT:
        return (None, axis) if part == "scale" else (None, None, axis)
    if name in ROW_SPLIT:
        return (None, axis, None)
    raise ValueError(f"{name!r} is not a linear layer name {LINEAR_NAMES}")
