"""The weights laid out for the `cpu` linear kernels (pallas_kernels.linear_cpu): each group
of linears fused along N and packed once, for all layers, at load."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.config import LlamaConfig
from pallas_kernels.linear_cpu import f32_on_amx, pack, pack_split, pack_swiglu, packed_rows

# The cpu linear backend's packed linears: name -> the layer weights it concatenates along N.
PACKED_GROUPS = {
    "qkv": ("wq", "wk", "wv"),
    "o": ("wo",),
    "gate_up": ("w_gate", "w_up"),
    "down": ("w_down",),
}


def pack_linear_params(c: LlamaConfig, params: dict) -> dict:
    """Stacked f32 / bf16 params -> the same with every linear (and the head) packed for the
    `cpu` linear kernels (pallas_kernels.linear_cpu.pack).

    The packed arrays go under params["packed"] (see PACKED_GROUPS; "head" has L = 1; bf16
    gate|up goes as "gate_up_swiglu", `pack_swiglu`'s layout, where F % 16 == 0); the
    layers keep only their norms and biases. A tied embedding is then looked up in the packed
    head, so params drop "embed" (no second copy of it). f32 layers are split into bf16
    planes (`pack_split`) where `f32_on_amx`; the head stays f32 (`head_argmax` takes it).
    """
    split = params["layers"]["wq"].dtype == jnp.float32 and f32_on_amx()
    return _pack_linear_params(c, params, split)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _pack_linear_params(c: LlamaConfig, params: dict, split: bool) -> dict:
    layers = dict(params["layers"])
    groups = dict(PACKED_GROUPS)
    packed = {}
    if layers["w_gate"].dtype == jnp.bfloat16 and c.intermediate_size % 16 == 0:
        # SwiGLU in the gate|up kernel's epilogue (linear_swiglu): no [M, 2F] product
        del groups["gate_up"]
        packed["gate_up_swiglu"] = pack_swiglu(layers.pop("w_gate"), layers.pop("w_up"))
    for group, names in groups.items():
        w = jnp.concatenate([layers.pop(n) for n in names], axis=-1)
        packed[group] = pack_split(w) if split else pack(w)
    head = params["embed"].T if c.tie_word_embeddings else params["lm_head"]
    packed["head"] = pack(head[None])
    params = {**params, "layers": layers, "packed": packed}
    if c.tie_word_embeddings:
        del params["embed"]
    params.pop("lm_head", None)
    return params


def unpacked_head(c: LlamaConfig, params: dict) -> jax.Array:
    """The [hidden, vocab] head that `pack_linear_params` packed into params["packed"]["head"]."""
    return packed_rows(params["packed"]["head"], jnp.arange(c.vocab_size), c.hidden_size).T
