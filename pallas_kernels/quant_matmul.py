"""Dequantizing matmuls in Pallas: 4-bit grouped (AWQ / GPTQ layout) and int8 per channel.

Each output tile [bm, bn] loops over K inside the kernel, unpacks one slice of the packed
weight into registers, dequantizes it and accumulates `x_tile @ w_tile` in f32; the
weight stays packed in memory. Layouts are those of `models/quant.py`: qweight [K/8, N]
int32 with nibble i of packed row r holding row 8r + i; scales [G, N]; zeros [G, N] uint8;
rows already sorted by group (the caller gathers x by `perm` first).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

PACK = 8  # 4-bit values per int32


def _int4_kernel(x_ref, q_ref, s_ref, z_ref, o_ref, *, group_size: int):  # noqa: ANN001
    # x_ref: [bm, K]; q_ref: [K/8, bn] i32; s_ref: [G, bn]; z_ref: [G, bn] u8; o_ref: [bm, bn]
    num_groups = s_ref.shape[0]
    rows = group_size // PACK
    bm, bn = o_ref.shape
    shifts = jax.lax.broadcasted_iota(jnp.int32, (1, PACK, 1), 1) * 4  # [1, 8, 1]

    def body(g: jax.Array, acc: jax.Array) -> jax.Array:
        xg = x_ref[:, pl.ds(g * group_size, group_size)]  # [bm, gs]
        packed = q_ref[pl.ds(g * rows, rows), :]  # [gs/8, bn]
        q = ((packed[:, None, :] >> shifts) & 0xF).reshape(group_size, bn)  # [gs, bn]
        zero = z_ref[pl.ds(g, 1), :].astype(jnp.int32)  # [1, bn]
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
        w = ((q - zero).astype(jnp.float32) * scale).astype(xg.dtype)  # [gs, bn]
        return acc + jnp.dot(xg, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_groups, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _int8_kernel(x_ref, q_ref, s_ref, o_ref, *, block_k: int):  # noqa: ANN001
    # x_ref: [bm, K]; q_ref: [K, bn] i8; s_ref: [1, bn]; o_ref: [bm, bn]
    bm, bn = o_ref.shape
    num_k = x_ref.shape[1] // block_k

    def body(kb: jax.Array, acc: jax.Array) -> jax.Array:
        xk = x_ref[:, pl.ds(kb * block_k, block_k)]  # [bm, bk]
        w = q_ref[pl.ds(kb * block_k, block_k), :].astype(xk.dtype)  # [bk, bn]
        return acc + jnp.dot(xk, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _pick_block(n: int, choices: tuple[int, ...]) -> int:
    for b in choices:
        if n % b == 0:
            return b
    return n


def _pad_rows(x: jax.Array, block_m: int) -> jax.Array:
    pad = -x.shape[0] % block_m
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _int4_call(x, qweight, scales, zeros, block_m, block_n, interpret):  # noqa: ANN001, ANN202
    m, k = x.shape
    n = qweight.shape[1]
    g = scales.shape[0]
    xp = _pad_rows(x, block_m)
    return pl.pallas_call(
        functools.partial(_int4_kernel, group_size=k // g),
        grid=(xp.shape[0] // block_m, n // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k // PACK, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((g, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((g, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n), x.dtype),
        interpret=interpret,
    )(xp, qweight, scales, zeros)[:m]


def _int8_call(x, q8, scale, block_m, block_n, block_k, interpret):  # noqa: ANN001, ANN202
    m, k = x.shape
    n = q8.shape[1]
    xp = _pad_rows(x, block_m)
    return pl.pallas_call(
        functools.partial(_int8_kernel, block_k=block_k),
        grid=(xp.shape[0] // block_m, n // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n), x.dtype),
        interpret=interpret,
    )(xp, q8, scale.reshape(1, n))[:m]


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def int4_matmul(
    x: jax.Array,
    qweight: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    *,
    block_m: int = 16,
    block_n: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ dequantized 4-bit weight -> [M, N] in x's dtype.

    qweight: [K/8, N] int32; scales: [G, N] float; zeros: [G, N] integer, G groups of K/G
    rows (rows sorted by group). block_n defaults to the largest of 128/64/32/16/8 dividing N.
    Raises ValueError on mismatched shapes or dtypes, or blocks that do not divide.
    """
    if x.ndim != 2 or qweight.ndim != 2:
        raise ValueError(f"x and qweight must be 2-D, got {x.shape} and {qweight.shape}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.dtype != jnp.int32 or qweight.shape[0] * PACK != k:
        raise ValueError(
            f"qweight must be int32 [K/8={k // PACK}, N], got {qweight.dtype} {qweight.shape}"
        )
    if scales.ndim != 2 or scales.shape[1] != n or k % scales.shape[0]:
        raise ValueError(f"scales must be [G, {n}] with G dividing K={k}, got {scales.shape}")
    if zeros.shape != scales.shape or not jnp.issubdtype(zeros.dtype, jnp.integer):
        raise ValueError(f"zeros must be integer {scales.shape}, got {zeros.dtype} {zeros.shape}")
    group_size = k // scales.shape[0]
    if group_size % PACK:
        raise ValueError(f"group size {group_size} must be a multiple of {PACK}")
    block_n = block_n or _pick_block(n, (128, 64, 32, 16, 8))
    if n % block_n or block_m < 1:
        raise ValueError(f"block_n {block_n} must divide N={n}; block_m {block_m} must be >= 1")
    return _int4_call(x, qweight, scales, zeros, block_m, block_n, interpret)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def int8_matmul(
    x: jax.Array,
    q8: jax.Array,
    scale: jax.Array,
    *,
    block_m: int = 16,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ (q8 [K, N] int8 * scale [N]) -> [M, N] in x's dtype.

    block_n / block_k default to the largest of 128/64/32/16 dividing N / K (else all of it).
    Raises ValueError on mismatched shapes or dtypes, or blocks that do not divide.
    """
    if x.ndim != 2 or q8.ndim != 2 or q8.shape[0] != x.shape[1]:
        raise ValueError(f"x [M, K] and q8 [K, N] do not match: {x.shape} and {q8.shape}")
    if q8.dtype != jnp.int8:
        raise ValueError(f"q8 must be int8, got {q8.dtype}")
    k, n = q8.shape
    if scale.shape != (n,):
        raise ValueError(f"scale must be [{n}], got {scale.shape}")
    block_n = block_n or _pick_block(n, (128, 64, 32, 16))
    block_k = block_k or _pick_block(k, (128, 64, 32, 16))
    if n % block_n or k % block_k or block_m < 1:
        raise ValueError(f"block_n {block_n} / block_k {block_k} must divide N={n} / K={k}")
    return _int8_call(x, q8, scale, block_m, block_n, block_k, interpret)


def quant_matmul(
    x: jax.Array, parts: dict[str, jax.Array], *, interpret: bool = False
) -> jax.Array:
    """x [M, K] @ one quantized linear given as its parts (see models/quant.py) -> [M, N]."""
    if "q8" in parts:
        return int8_matmul(x, parts["q8"], parts["scale"], interpret=interpret)
    if "perm" in parts:
        x = jnp.take(x, parts["perm"], axis=-1)
    return int4_matmul(x, parts["qweight"], parts["scales"], parts["zeros"], interpret=interpret)


def int4_matmul_reference(
    x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array
) -> jax.Array:
    """Plain jnp: unpack, dequantize the whole weight in f32, one f32 dot -> [M, N] x.dtype."""
    k = x.shape[1]
    g, n = scales.shape
    shifts = jnp.arange(PACK, dtype=jnp.int32) * 4
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(g, k // g, n)
    w = (q - zeros.astype(jnp.int32)[:, None, :]).astype(jnp.float32)
    w = (w * scales.astype(jnp.float32)[:, None, :]).reshape(k, n)
    return jnp.dot(x.astype(jnp.float32), w).astype(x.dtype)


def int8_matmul_reference(x: jax.Array, q8: jax.Array, scale: jax.Array) -> jax.Array:
    """Plain jnp: (x @ q8) * scale in f32 -> [M, N] x.dtype."""
    y = jnp.dot(x.astype(jnp.float32), q8.astype(jnp.float32))
    return (y * scale.astype(jnp.float32)).astype(x.dtype)
