"""Llama-family decoder as a Flax nnx module, and its weights from / to HF tensors.

The forward pass itself is models/forward.py's `llama_forward` over `Llama.params()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LlamaConfig
from models.forward import ModelBatch, layer_weight_shapes, llama_forward, unstack_layers
from models.quant import LINEAR_NAMES
from models.quant_load import QuantizedTensors, QuantSpec, int8_layers
from models.rope import rope_inv_freq

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


class Llama(nnx.Module):
    """Llama decoder; per-layer weights stacked on a leading axis ([L, ...])."""

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

    def params(self, *, unstack: bool = False) -> dict:
        """The weights as `llama_forward` takes them; `unstack`: layers as a per-layer list."""
        layers = {name: p[...] for name, p in self.layers.items()}
        params = {
            "embed": self.embed[...],
            "final_norm": self.final_norm[...],
            "inv_freq": self.inv_freq[...],
            "layers": layers,
        }
        if not self.config.tie_word_embeddings:
            params["lm_head"] = self.lm_head[...]
        if unstack:
            params["layers"] = unstack_layers(layers, self.config.num_hidden_layers)
        return params

    def __call__(
        self, kv_pool: jax.Array, batch: ModelBatch, attention_backend: str = "xla"
    ) -> tuple[jax.Array, jax.Array]:
        """Run one step. kv_pool: [L, blocks, 2, block_size, k, e]. Returns (logits [R, v] f32, kv_pool).

        attention_backend (static): a name in pallas_kernels.ATTENTION_BACKENDS.
        """
        return llama_forward(self.config, self.params(), kv_pool, batch, attention_backend)


Place = Callable[[str, np.ndarray, jnp.dtype], jax.Array]  # (name, host array, dtype) -> array


def llama_from_hf_tensors(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype: jnp.dtype,
    quantization: QuantSpec | None = None,
    *,
    place: Place | None = None,
) -> Llama:
    """Build a `Llama` from HF-named tensors ([out, in] linears), cast to `dtype`.

    quantization: int8 quantizes the float linears here; awq / gptq read the checkpoint's
    packed linears (models/quant_load.py). Embedding, norms and lm_head stay float.
    `place(name, array, dtype)` puts each weight ("embed", "layers/wq", ..., "inv_freq") on
    device; the default is `jnp.asarray` (the default device). Raises ValueError naming any
    missing or mis-shaped tensor.
    """
    put = place or (lambda _name, array, dt: jnp.asarray(array, dt))
    c = config
    shapes = layer_weight_shapes(c)
    packed = None
    if quantization is not None and quantization.method != "int8":
        linears = {n: shapes[n] for n in LINEAR_NAMES}
        packed = QuantizedTensors(quantization, linears, c.num_hidden_layers)
        shapes = {n: s for n, s in shapes.items() if n not in LINEAR_NAMES}
    stacked = {n: np.zeros((c.num_hidden_layers, *s), np.float32) for n, s in shapes.items()}
    by_suffix = {hf: (n, t) for n, (hf, t) in _LAYER_WEIGHTS.items() if n in shapes}
    by_suffix.update({hf: (n, False) for n, hf in _LAYER_BIASES.items() if n in shapes})
    seen: set[str] = set()
    top: dict[str, np.ndarray] = {}
    for name, array in tensors:
        if name.startswith("model.layers."):
            idx_str, suffix = name[len("model.layers.") :].split(".", 1)
            if packed is not None and packed.take(int(idx_str), suffix, array):
                continue
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
    if quantization is not None:
        stacked = int8_layers(stacked) if packed is None else {**stacked, **packed.stacked()}
    model.layers = nnx.Dict(  # f32 arrays take `dtype`; packed ints and f16 scales stay
        {
            n: nnx.Param(put(f"layers/{n}", a, dtype if a.dtype == np.float32 else a.dtype))
            for n, a in stacked.items()
        }
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
