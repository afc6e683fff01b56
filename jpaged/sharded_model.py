"""Put a Llama's weights straight onto their shards of a mesh.

Each weight is read from the checkpoint into host memory (one stacked array per layer
weight), then `jax.make_array_from_callback` copies every device only its own slice: the
whole model never sits on one device. Under `jax.distributed` every process does the same
for its own devices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jpaged.weights import iter_safetensors
from models.config import LlamaConfig
from models.sharding import (
    TP_AXIS,
    ShardingPlan,
    expanded_config,
    kv_pool_spec,
    plan_sharding,
    repeat_kv_heads,
    weight_sharding,
)

if TYPE_CHECKING:  # models.llama imports Flax, which a packed-cache start never needs
    from models.llama import Llama, Place

logger = logging.getLogger(__name__)

_KV_SUFFIXES = (
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
)


def mesh_tp(mesh: Mesh) -> int:
    return mesh.shape[TP_AXIS]


def _repeat_kv(
    tensors: Iterable[tuple[str, np.ndarray]], head_dim: int, repeats: int
) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors with each KV head of k_proj / v_proj ([k*e, d] and [k*e]) repeated."""
    for name, array in tensors:
        if repeats > 1 and name.endswith(_KV_SUFFIXES):
            array = repeat_kv_heads(np.asarray(array), head_dim, repeats, axis=0)
        yield name, array


def sharded_place(mesh: Mesh, plan: ShardingPlan) -> Place:
    """A `place` for `llama_from_hf_tensors`: each device gets its slice, cast on the host."""

    def place(name: str, array: np.ndarray, dtype: jnp.dtype) -> jax.Array:
        sharding = weight_sharding(mesh, name, plan)
        return jax.make_array_from_callback(
            array.shape, sharding, lambda idx: np.asarray(array[idx], dtype)
        )

    return place


def load_llama(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype: jnp.dtype,
    mesh: Mesh | None = None,
) -> Llama:
    """`llama_from_hf_tensors`, sharded over `mesh`'s tp axis when a mesh is given.

    The returned model's config has the KV heads it stores (repeated when tp > KV heads).
    """
    from models.llama import llama_from_hf_tensors

    if mesh is None:
        return llama_from_hf_tensors(config, tensors, dtype)
    plan = plan_sharding(config, mesh_tp(mesh))
    if plan.tp > 1 and not plan.attention:
        logger.warning(
            "tp=%d does not divide %d heads / %d KV heads: attention weights and the KV pool "
            "are replicated, only the MLP%s is split",
            plan.tp, config.num_attention_heads, config.num_key_value_heads,
            " and vocabulary" if plan.vocab else "",
        )  # fmt: skip
    tensors = _repeat_kv(tensors, config.head_dim, plan.kv_repeats)
    return llama_from_hf_tensors(
        expanded_config(config, plan), tensors, dtype, place=sharded_place(mesh, plan)
    )


def load_llama_from_dir(
    config: LlamaConfig, model_dir: Path, dtype: jnp.dtype, mesh: Mesh | None = None
) -> Llama:
    """A model directory's weights, through the orbax cache when sharded (jpaged.sharded_cache)."""
    if mesh is None:
        return load_llama(config, iter_safetensors(model_dir), dtype)
    from jpaged import sharded_cache

    plan = plan_sharding(config, mesh_tp(mesh))
    use_cache = plan.kv_repeats == 1 and jax.process_count() == 1 and sharded_cache.enabled()
    path = sharded_cache.checkpoint_dir(model_dir, dtype) if use_cache else None
    if path is not None and path.is_dir():
        try:
            return sharded_cache.restore(config, dtype, path, mesh, plan)
        except Exception as exc:  # a damaged cache: fall back to the checkpoint itself
            logger.warning(
                "sharded weights cache %s unreadable (%s); reading safetensors", path, exc
            )
    model = load_llama(config, iter_safetensors(model_dir), dtype, mesh)
    if path is not None:
        try:
            sharded_cache.save(model, path)
        except Exception as exc:  # a read-only or full disk costs the next start, not this one
            logger.warning("could not save the sharded weights cache %s: %s", path, exc)
    return model


def shard_llama(model: Llama, mesh: Mesh) -> Llama:
    """A prebuilt (unsharded) model re-placed onto `mesh` (goes through host memory)."""
    from models.llama import llama_to_hf_tensors

    dtype = model.embed[...].dtype
    return load_llama(model.config, llama_to_hf_tensors(model).items(), dtype, mesh)


def kv_pool_sharding(mesh: Mesh, config: LlamaConfig) -> NamedSharding:
    """Where the pool of a model with `config` (as stored, i.e. after any KV repeat) lives."""
    return NamedSharding(mesh, kv_pool_spec(plan_sharding(config, mesh_tp(mesh))))


def kv_pool_shards(mesh: Mesh, config: LlamaConfig) -> int:
    """Into how many pieces the pool is split (tp with attention split, else 1)."""
    plan = plan_sharding(config, mesh_tp(mesh))
    return plan.tp if plan.attention else 1


def bytes_per_device(tree: object) -> int:
    """Bytes of the arrays in `tree` held by the first device of their sharding."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += leaf.addressable_shards[0].data.nbytes
    return total
