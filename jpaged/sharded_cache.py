"""The converted-weights cache for sharded runs: an orbax checkpoint restored into the mesh.

The first sharded load of a model reads its safetensors (each device gets its slice) and
saves the placed weights as an orbax checkpoint in `cache_dir()/orbax/<key>`; later loads
restore straight into the target shardings, each device reading only its own chunks, at
any tp. The key covers the model directory, its weight files' sizes and mtimes, and the
dtype. Used with one process only (several hosts may not share a disk, and every process
must take the same path) and when no KV head is repeated (the stored shapes are the
checkpoint's). $JPAGED_SHARDED_CACHE=0 turns it off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jpaged.paths import cache_dir
from jpaged.weights import weights_key
from models.config import LlamaConfig
from models.llama import Llama
from models.sharding import ShardingPlan, weight_sharding

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def enabled() -> bool:
    """Off when $JPAGED_SHARDED_CACHE is 0 (saves the disk a copy of the weights per dtype)."""
    return os.environ.get("JPAGED_SHARDED_CACHE", "1") != "0"


def checkpoint_dir(model_dir: Path, dtype: jnp.dtype) -> Path:
    """Where the orbax copy of `model_dir`'s weights in `dtype` lives (may not exist yet)."""
    key = weights_key(model_dir, str(jnp.dtype(dtype)), f"v{CACHE_VERSION}")
    return cache_dir() / "orbax" / f"{Path(model_dir).name}-{key}"


def _weights(model: Llama) -> dict:
    """The model's arrays as the nested dict the checkpoint holds."""
    out = {"embed": model.embed[...], "final_norm": model.final_norm[...]}
    out["layers"] = {n: p[...] for n, p in model.layers.items()}
    if not model.config.tie_word_embeddings:
        out["lm_head"] = model.lm_head[...]
    return out


def save(model: Llama, path: Path) -> None:
    """Write `model`'s (sharded) weights to `path`; each device writes its own shards."""
    import orbax.checkpoint as ocp

    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.resolve(), _weights(model))
        checkpointer.wait_until_finished()
    logger.info("saved the sharded weights cache %s", path)


def restore(
    config: LlamaConfig, dtype: jnp.dtype, path: Path, mesh: Mesh, plan: ShardingPlan
) -> Llama:
    """The model from the checkpoint at `path`, each weight restored onto its shards."""
    import orbax.checkpoint as ocp

    from models.forward import layer_weight_shapes
    from models.rope import rope_inv_freq

    c = config

    def target(name: str, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=weight_sharding(mesh, name, plan))

    abstract = {
        "embed": target("embed", (c.vocab_size, c.hidden_size)),
        "final_norm": target("final_norm", (c.hidden_size,)),
        "layers": {
            n: target(f"layers/{n}", (c.num_hidden_layers, *s))
            for n, s in layer_weight_shapes(c).items()
        },
    }
    if not c.tie_word_embeddings:
        abstract["lm_head"] = target("lm_head", (c.hidden_size, c.vocab_size))
    with ocp.StandardCheckpointer() as checkpointer:
        w = checkpointer.restore(path.resolve(), abstract)
    model = nnx.eval_shape(lambda: Llama(c, dtype=dtype, rngs=nnx.Rngs(0)))
    model.embed = nnx.Param(w["embed"])
    model.layers = nnx.Dict({n: nnx.Param(a) for n, a in w["layers"].items()})
    model.final_norm = nnx.Param(w["final_norm"])
    if not c.tie_word_embeddings:
        model.lm_head = nnx.Param(w["lm_head"])
    inv_freq = rope_inv_freq(c)
    model.inv_freq = nnx.Variable(jax.device_put(inv_freq, weight_sharding(mesh, "inv_freq", plan)))
    logger.info("restored the sharded weights cache %s", path)
    return model
