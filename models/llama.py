"""Llama-family decoder (Flax nnx) over a flat ragged token batch and a paged KV pool.

Einsum letters: t = token of the flat batch, s = sequence, q = query slot of a sequence's
chunk, d = model width, h = query head, k = KV head, e = head dim, f = MLP width,
v = vocabulary, l = layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LlamaConfig
from pallas_kernels.paged_attention_xla import paged_attention, write_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelBatch:
    """One step's device inputs, padded to bucketed shapes (T tokens, S seqs, Q queries, R rows).

    Padding tokens have slot 0..block_size-1 of the null block and position 0; padding
    queries have position -1 and attend to nothing.
    """

    token_ids: jax.Array  # [T] i32
    positions: jax.Array  # [T] i32 absolute position in its sequence
    slot_mapping: jax.Array  # [T] i32 where the token's K/V is written
    query_index: jax.Array  # [S, Q] i32 flat token index of seq s's q-th query (0 for padding)
    q_positions: jax.Array  # [S, Q] i32 position of that query, -1 for padding
    token_seq: jax.Array  # [T] i32 which sequence row token t belongs to
    token_q: jax.Array  # [T] i32 its query slot in that row
    block_tables: jax.Array  # [S, W] i32
    seq_lens: jax.Array  # [S] i32 context length including this step's tokens, 0 for padding
    logits_index: jax.Array  # [R] i32 flat token index whose logits each sampling row reads


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (f32) with the config's RoPE scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        np.float32(config.rope_theta)
        ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    )
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, 1, e] (f32) for positions [T]; computed once per step, shared by all layers."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, e/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, e]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE as in HF Llama. x: [T, heads, e]; cos, sin: [T, 1, e]."""
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in f32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


# Stacked per-layer weights: name -> (HF suffix, transpose to [in, out]).
_LAYER_WEIGHTS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
_LAYER_BIASES = {
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias",
}


def layer_weight_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer weight shapes (without the leading layer axis), [in, out] for linears."""
    d, e, f = c.hidden_size, c.head_dim, c.intermediate_size
    h, k = c.num_attention_heads, c.num_key_value_heads
    shapes = {
        "attn_norm": (d,),
        "wq": (d, h * e),
        "wk": (d, k * e),
        "wv": (d, k * e),
        "wo": (h * e, d),
        "mlp_norm": (d,),
        "w_gate": (d, f),
        "w_up": (d, f),
        "w_down": (f, d),
    }
    if c.attention_bias:
        shapes.update(bq=(h * e,), bk=(k * e,), bv=(k * e,), bo=(d,))
    return shapes


class Llama(nnx.Module):
    """Llama decoder; layers stacked on a leading axis and run under `lax.scan`."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        c = config
        self.config = c
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size), dtype))
        self.layers = nnx.Dict(
            {
                name: nnx.Param(
                    jnp.ones((c.num_hidden_layers, *shape), dtype)
                    if name.endswith("norm")
                    else init(rngs.params(), (c.num_hidden_layers, *shape), dtype)
                )
                for name, shape in layer_weight_shapes(c).items()
            }
        )
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), dtype))
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (c.hidden_size, c.vocab_size), dtype))
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(c)))

    def __call__(self, kv_pool: jax.Array, batch: ModelBatch) -> tuple[jax.Array, jax.Array]:
        """Run one step. kv_pool: [L, blocks, 2, block_size, k, e]. Returns (logits [R, v] f32, kv_pool)."""
        c = self.config
        num_tokens = batch.token_ids.shape[0]
        scale = 1.0 / math.sqrt(c.head_dim)
        cos, sin = rope_tables(batch.positions, self.inv_freq[...])
        x = self.embed[...][batch.token_ids]  # [t, d]

        def layer(carry: tuple[jax.Array, jax.Array], xs: tuple) -> tuple:
            x, pool = carry
            w, layer_idx = xs
            h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            q = h @ w["wq"]
            k = h @ w["wk"]
            v = h @ w["wv"]
            if c.attention_bias:
                q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
            q = apply_rope(q.reshape(num_tokens, -1, c.head_dim), cos, sin)
            k = apply_rope(k.reshape(num_tokens, -1, c.head_dim), cos, sin)
            v = v.reshape(num_tokens, -1, c.head_dim)
            pool = write_kv(
                pool, layer_idx, k.astype(pool.dtype), v.astype(pool.dtype), batch.slot_mapping
            )
            q_rows = q[batch.query_index]  # [s, q, h, e]
            attn = paged_attention(
                q_rows,
                pool,
                layer_idx,
                batch.block_tables,
                batch.seq_lens,
                batch.q_positions,
                scale=scale,
            )
            attn = attn[batch.token_seq, batch.token_q].reshape(num_tokens, -1)  # [t, h*e]
            o = attn @ w["wo"]
            if c.attention_bias:
                o = o + w["bo"]
            x = x + o
            h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            x = x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
            return (x, pool), None

        weights = {name: p[...] for name, p in self.layers.items()}
        layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        (x, kv_pool), _ = jax.lax.scan(layer, (x, kv_pool), (weights, layer_ids))
        x = rms_norm(x[batch.logits_index], self.final_norm[...], c.rms_norm_eps)  # [r, d]
        head = self.embed[...].T if c.tie_word_embeddings else self.lm_head[...]
        logits = jnp.dot(x.astype(jnp.float32), head.astype(jnp.float32))  # [r, v]
        return logits, kv_pool


Place = Callable[[str, np.ndarray, jnp.dtype], jax.Array]  # (name, host array, dtype) -> array


def llama_from_hf_tensors(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype: jnp.dtype,
    place: Place | None = None,
) -> Llama:
    """Build a `Llama` from HF-named tensors ([out, in] linears), cast to `dtype`.

    `place(name, array, dtype)` puts each weight ("embed", "layers/wq", ..., "inv_freq") on
    device; the default is `jnp.asarray` (the default device). Raises ValueError naming any
    missing or mis-shaped tensor.
    """
    put = place or (lambda _name, array, dt: jnp.asarray(array, dt))
    c = config
    shapes = layer_weight_shapes(c)
    stacked = {n: np.zeros((c.num_hidden_layers, *s), np.float32) for n, s in shapes.items()}
    by_suffix = {hf: (n, t) for n, (hf, t) in _LAYER_WEIGHTS.items() if n in shapes}
    by_suffix.update({hf: (n, False) for n, hf in _LAYER_BIASES.items() if n in shapes})
    seen: set[str] = set()
    top: dict[str, np.ndarray] = {}
    for name, array in tensors:
        if name.startswith("model.layers."):
            idx_str, suffix = name[len("model.layers.") :].split(".", 1)
            if suffix not in by_suffix:
                continue  # e.g. rotary_emb.inv_freq in old checkpoints
            key, transpose = by_suffix[suffix]
            value = np.asarray(array, np.float32)
            value = value.T if transpose else value
            if value.shape != shapes[key]:
                raise ValueError(f"{name} has shape {value.shape}, expected {shapes[key]}")
            stacked[key][int(idx_str)] = value
            seen.add(name)
        elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            top[name] = np.asarray(array, np.float32)
    inverse = {n: hf for hf, (n, _) in by_suffix.items()}
    missing = [
        f"model.layers.{i}.{inverse[n]}"
        for n in shapes
        for i in range(c.num_hidden_layers)
        if f"model.layers.{i}.{inverse[n]}" not in seen
    ]
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c.tie_word_embeddings:
        needed.append("lm_head.weight")
    missing += [n for n in needed if n not in top]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    model = nnx.eval_shape(lambda: Llama(c, dtype=dtype, rngs=nnx.Rngs(0)))
    model.embed = nnx.Param(put("embed", top["model.embed_tokens.weight"], dtype))
    model.layers = nnx.Dict(
        {n: nnx.Param(put(f"layers/{n}", a, dtype)) for n, a in stacked.items()}
    )
    model.final_norm = nnx.Param(put("final_norm", top["model.norm.weight"], dtype))
    if not c.tie_word_embeddings:
        model.lm_head = nnx.Param(put("lm_head", top["lm_head.weight"].T, dtype))
    model.inv_freq = nnx.Variable(put("inv_freq", rope_inv_freq(c), jnp.dtype(jnp.float32)))
    return model


def llama_to_hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """Inverse of `llama_from_hf_tensors` (f32 numpy, HF names and layouts); used by tests."""
    c = model.config
    out = {"model.embed_tokens.weight": np.asarray(model.embed[...], np.float32)}
    for name, p in model.layers.items():
        hf = _LAYER_WEIGHTS[name][0] if name in _LAYER_WEIGHTS else _LAYER_BIASES[name]
        transpose = _LAYER_WEIGHTS.get(name, ("", False))[1]
        arr = np.asarray(p[...], np.float32)
        for i in range(c.num_hidden_layers):
            out[f"model.layers.{i}.{hf}"] = arr[i].T.copy() if transpose else arr[i].copy()
    out["model.norm.weight"] = np.asarray(model.final_norm[...], np.float32)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(model.lm_head[...], np.float32).T.copy()
    return out
