"""How the Llama weights and the paged KV pool split over a mesh's `tp` axis (Megatron layout).

Column-parallel: wq / wk / wv / w_gate / w_up split by output features, so every device owns
whole heads and a slice of the MLP width. Row-parallel: wo / w_down split by input features,
so XLA closes each block with one all-reduce. Embedding and lm head split by vocabulary.
The KV pool splits along KV heads, like wk / wv.

When tp exceeds the number of KV heads (tp % KV == 0), each KV head is repeated tp // KV
times (`kv_head_repeats`) so that every device holds the one KV head its query heads read;
query head h still reads original KV head h // (H // KV). A dimension that tp does not
divide stays replicated (SmolLM2's 9 heads at tp=2: attention replicated, MLP and
vocabulary split); `plan_sharding` says which.

Mesh axis names are defined here, once, and imported by `jpaged.mesh`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models.config import LlamaConfig

DP_AXIS = "dp"  # data-parallel replicas (jpaged.data_parallel)
TP_AXIS = "tp"  # tensor parallelism inside one replica
MESH_AXES = (DP_AXIS, TP_AXIS)

_REPLICATED = PartitionSpec()


@dataclasses.dataclass(frozen=True, slots=True)
class ShardingPlan:
    """Which parts of the model split over `tp` devices."""

    tp: int
    kv_repeats: int  # each KV head stored this many times (1: as in the checkpoint)
    attention: bool  # heads split (wq/wk/wv/wo and the KV pool)
    mlp: bool  # intermediate features split (w_gate/w_up/w_down)
    vocab: bool  # embedding rows and lm head columns split


def kv_head_repeats(config: LlamaConfig, tp: int) -> int:
    """How many copies of each KV head tp devices need (1 unless tp > KV and KV divides tp)."""
    kv, heads = config.num_key_value_heads, config.num_attention_heads
    if tp > kv and tp % kv == 0 and heads % tp == 0:
        return tp // kv
    return 1


def plan_sharding(config: LlamaConfig, tp: int) -> ShardingPlan:
    """The split for `config` (as in the checkpoint, before any KV-head repeat) over tp devices.

    Raises ValueError when tp < 1.
    """
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    repeats = kv_head_repeats(config, tp)
    kv = config.num_key_value_heads * repeats
    return ShardingPlan(
        tp=tp,
        kv_repeats=repeats,
        attention=config.num_attention_heads % tp == 0 and kv % tp == 0,
        mlp=config.intermediate_size % tp == 0,
        vocab=config.vocab_size % tp == 0,
    )


def expanded_config(config: LlamaConfig, plan: ShardingPlan) -> LlamaConfig:
    """The config the sharded model runs with (KV heads repeated per `plan`)."""
    if plan.kv_repeats == 1:
        return config
    return dataclasses.replace(
        config, num_key_value_heads=config.num_key_value_heads * plan.kv_repeats
    )


def repeat_kv_heads(array: np.ndarray, head_dim: int, repeats: int, axis: int) -> np.ndarray:
    """Repeat each KV head's `head_dim` features `repeats` times along `axis` (k*e -> k*r*e)."""
    if repeats == 1:
        return array
    shape = array.shape
    heads = shape[axis] // head_dim
    split = (*shape[:axis], heads, head_dim, *shape[axis + 1 :])
    out = np.repeat(array.reshape(split), repeats, axis=axis)
    return out.reshape(*shape[:axis], heads * repeats * head_dim, *shape[axis + 1 :])


def weight_spec(name: str, plan: ShardingPlan) -> PartitionSpec:
    """PartitionSpec of one model weight by its `Llama` name ("embed", "layers/wq", ...).

    Layer weights carry the leading layer axis: [L, in, out] for linears, [L, out] for biases.
    """
    tp = TP_AXIS
    layer_specs = {
        "wq": (plan.attention, PartitionSpec(None, None, tp)),
        "wk": (plan.attention, PartitionSpec(None, None, tp)),
        "wv": (plan.attention, PartitionSpec(None, None, tp)),
        "bq": (plan.attention, PartitionSpec(None, tp)),
        "bk": (plan.attention, PartitionSpec(None, tp)),
        "bv": (plan.attention, PartitionSpec(None, tp)),
        "wo": (plan.attention, PartitionSpec(None, tp, None)),
        "w_gate": (plan.mlp, PartitionSpec(None, None, tp)),
        "w_up": (plan.mlp, PartitionSpec(None, None, tp)),
        "w_down": (plan.mlp, PartitionSpec(None, tp, None)),
    }
    top_specs = {
        "embed": (plan.vocab, PartitionSpec(tp, None)),  # [v, d]
        "lm_head": (plan.vocab, PartitionSpec(None, tp)),  # [d, v]
    }
    if name.startswith("layers/"):
        split, spec = layer_specs.get(name[len("layers/") :], (False, _REPLICATED))
    else:
        split, spec = top_specs.get(name, (False, _REPLICATED))
    return spec if split and plan.tp > 1 else _REPLICATED


def kv_pool_spec(plan: ShardingPlan) -> PartitionSpec:
    """PartitionSpec of the pool [L, NB, 2, bs, KV, D]: split along KV heads with attention."""
    if plan.attention and plan.tp > 1:
        return PartitionSpec(None, None, None, None, TP_AXIS, None)
    return _REPLICATED


def weight_sharding(mesh: jax.sharding.Mesh, name: str, plan: ShardingPlan) -> NamedSharding:
    return NamedSharding(mesh, weight_spec(name, plan))
