"""The Llama-family forward pass as functions of a params dict (no Flax): one step over a
flat ragged token batch and a paged KV pool. models/llama.py holds the Flax module that owns
the weights; a start from the packed-weights cache runs these without importing Flax.

Einsum letters: t = token of the flat batch, s = sequence, q = query slot of a sequence's
chunk, d = model width, h = query head, k = KV head, e = head dim, f = MLP width,
v = vocabulary, l = layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from models.config import LlamaConfig
from models.quant import linear
from models.rope import apply_rope, rope_tables
from pallas_kernels import attention_functions
from pallas_kernels.linear_cpu import (
    linear_cpu,
    linear_swiglu,
    packed_rows,
    rope_qkv,
    rope_qkv_supported,
    silu_mul,
)


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
    # [] i32 real tokens and real rows (the rest is padding); the `cpu` linears compute only
    # these rows. None: all.
    num_tokens: jax.Array | None = None
    num_rows: jax.Array | None = None


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in f32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


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


def decoder_layer(
    c: LlamaConfig,
    w: dict[str, jax.Array],
    layer_idx: jax.Array | int,
    x: jax.Array,
    kv_pool: jax.Array,
    batch: ModelBatch,
    rope: tuple[jax.Array, jax.Array],
    attention_backend: str,
    packed: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoder layer. w: this layer's weights; x: [t, d]. Returns (x, kv_pool).

    packed: all layers' packed linears (models.packed_linears), read at `layer_idx`; None: the
    linears are in `w`.
    """
    num_tokens, live = x.shape[0], batch.num_tokens
    cos, sin = rope
    qe, ke = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
    qkv = None
    if packed is not None:
        qkv = linear_cpu(h, packed["qkv"], layer_idx, n=qe + 2 * ke, rows=live)
    if qkv is not None and not c.attention_bias and rope_qkv_supported(qkv.dtype, c.head_dim):
        # one kernel splits q | k | v and applies RoPE
        heads = {"num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads}
        q, k, v = rope_qkv(qkv, cos, sin, **heads)
    else:
        if qkv is None:
            q, k, v = linear(h, w, "wq"), linear(h, w, "wk"), linear(h, w, "wv")
        else:
            q, k, v = jnp.split(qkv, [qe, qe + ke], axis=-1)
        if c.attention_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q = apply_rope(q.reshape(num_tokens, -1, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(num_tokens, -1, c.head_dim), cos, sin)
        v = v.reshape(num_tokens, -1, c.head_dim)
    paged_attention, write_kv = attention_functions(attention_backend)
    kv_pool = write_kv(
        kv_pool, layer_idx, k.astype(kv_pool.dtype), v.astype(kv_pool.dtype), batch.slot_mapping
    )
    q_rows = q[batch.query_index]  # [s, q, h, e]
    attn = paged_attention(
        q_rows,
        kv_pool,
        layer_idx,
        batch.block_tables,
        batch.seq_lens,
        batch.q_positions,
        scale=1.0 / math.sqrt(c.head_dim),
    )
    attn = attn[batch.token_seq, batch.token_q].reshape(num_tokens, -1)  # [t, h*e]
    if packed is None:
        o = linear(attn, w, "wo")
    else:
        o = linear_cpu(attn, packed["o"], layer_idx, n=c.hidden_size, rows=live)
    if c.attention_bias:
        o = o + w["bo"]
    x = x + o
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
    if packed is None:
        gated = jax.nn.silu(linear(h, w, "w_gate")) * linear(h, w, "w_up")
        return x + linear(gated, w, "w_down"), kv_pool
    f = c.intermediate_size
    if "gate_up_swiglu" in packed:
        gated = linear_swiglu(h, packed["gate_up_swiglu"], layer_idx, f=f, rows=live)
    else:
        gated = silu_mul(linear_cpu(h, packed["gate_up"], layer_idx, n=2 * f, rows=live))
    down = linear_cpu(gated, packed["down"], layer_idx, n=c.hidden_size, rows=live)
    return x + down, kv_pool


def llama_forward(
    c: LlamaConfig,
    params: dict,
    kv_pool: jax.Array,
    batch: ModelBatch,
    attention_backend: str = "xla",
    head: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The model as a pure function. Returns (logits [R, v] f32, kv_pool), or with
    head=False the final (normed) hidden rows [R, d] instead of the logits (see `lm_head`).

    params: embed [v, d], final_norm [d], inv_freq [e/2], lm_head [d, v] (untied only), and
    layers: either a dict of stacked [L, ...] weights, run under `lax.scan` (compile time
    independent of depth), or a list of L per-layer dicts, run unrolled. On CPU the list is
    faster: XLA copies each scan iteration's weight slices out of the stacked arrays (every
    weight byte written and read once more per step), which per-layer arrays avoid.
    """
    rope = rope_tables(batch.positions, params["inv_freq"])
    packed = params.get("packed")  # closed over, not scanned: the kernel indexes the layer
    if "embed" in params:
        x = params["embed"][batch.token_ids]  # [t, d]
    else:  # tied, packed: the embedding rows are the head's columns
        x = packed_rows(packed["head"], batch.token_ids, c.hidden_size)
    layers = params["layers"]
    if isinstance(layers, dict):

        def body(carry: tuple[jax.Array, jax.Array], xs: tuple) -> tuple:
            w, layer_idx = xs
            out = decoder_layer(c, w, layer_idx, *carry, batch, rope, attention_backend, packed)
            return out, None

        layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        (x, kv_pool), _ = jax.lax.scan(body, (x, kv_pool), (layers, layer_ids))
    else:
        for i, w in enumerate(layers):
            x, kv_pool = decoder_layer(c, w, i, x, kv_pool, batch, rope, attention_backend, packed)
    x = rms_norm(x[batch.logits_index], params["final_norm"], c.rms_norm_eps)  # [r, d]
    if not head:
        return x, kv_pool
    return lm_head(c, params, x, batch.num_rows), kv_pool


def lm_head(c: LlamaConfig, params: dict, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """Logits [r, v] f32 of the final hidden rows x [r, d]; rows: the real ones (see linear_cpu)."""
    if "packed" in params:
        head = params["packed"]["head"]
        return linear_cpu(x, head, 0, n=c.vocab_size, out_dtype=jnp.float32, rows=rows)
    head = params["embed"].T if c.tie_word_embeddings else params["lm_head"]
    return jnp.dot(x, head, preferred_element_type=jnp.float32)


def unstack_layers(layers: dict, num_layers: int) -> list[dict]:
    """Stacked [L, ...] layer weights (any pytree) -> a list of L per-layer pytrees (copies)."""
    split = jax.jit(
        lambda tree: [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(num_layers)]
    )
    return split(layers)
