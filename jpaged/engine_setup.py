"""What an LLMEngine is built from: the compile cache, the mesh, the model, the pool, the
backends and the model runner."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jpaged import packed_cache
from jpaged.config import EngineConfig
from jpaged.kv_pool import (
    allocate_kv_pool,
    device_kv_budget,
    kv_bytes_per_block,
    num_blocks_for_budget,
)
from jpaged.malloc_tuning import tune_malloc
from jpaged.model_runner import ModelRunner
from jpaged.pool_prefault import PoolPrefaulter, lead_bytes_from_env
from jpaged.sharded_model import (
    bytes_per_device,
    kv_pool_sharding,
    kv_pool_shards,
    load_llama,
    load_llama_from_dir,
    shard_llama,
)
from jpaged.tokenizer import Tokenizer
from jpaged.weights import iter_safetensors, load_model
from models.config import LlamaConfig
from models.packed_linears import pack_linear_params
from models.quant import LINEAR_NAMES
from models.quant_load import resolve_quantization

if TYPE_CHECKING:  # models.llama imports Flax; a packed-cache start builds no Llama
    from models.llama import Llama

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 4 << 30  # like vLLM's CPU default KV space (4 GiB)


def enable_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache in jpaged's cache dir (small programs too)."""
    from jpaged.paths import xla_cache_dir

    jax.config.update("jax_compilation_cache_dir", str(xla_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def prebuild_cpu_kernels(config: EngineConfig) -> None:
    """On CPU, start compiling the C++ kernels the config may use, so that a cold start
    builds them while the model loads (the backends are resolved, and wait, later)."""
    if jax.default_backend() != "cpu":
        return
    from jpaged.paths import kernels_cache_dir
    from pallas_kernels import cpu_build, linear_cpu, paged_attention_cpu, sampling_cpu

    sources = []
    if config.attention_backend in ("auto", "cpu"):
        sources += [paged_attention_cpu.SOURCE, sampling_cpu.SOURCE]
    if config.linear_backend in ("auto", "cpu") and config.quantization is None:
        sources.append(linear_cpu.SOURCE)
    cpu_build.build_in_background(sources, kernels_cache_dir())


def tp_mesh(config: EngineConfig) -> jax.sharding.Mesh | None:
    """The (1, tp) mesh `config` asks for, None for a single device."""
    from jpaged.mesh import build_mesh

    dp, tp = config.mesh_shape()
    if dp != 1:
        raise ValueError(f"mesh dp={dp}: LLMEngine is one replica; use jpaged.data_parallel")
    if jax.process_count() == 1:
        return build_mesh(1, tp) if tp > 1 else None
    mesh = build_mesh(1, tp)
    if {d.process_index for d in mesh.devices.flat} != set(range(jax.process_count())):
        raise ValueError(
            f"tensor_parallel_size {tp} does not reach every one of the {jax.process_count()} "
            f"processes' devices ({jax.device_count()} in all)"
        )
    return mesh


@dataclasses.dataclass
class EngineWeights:
    """What the runner is built from: the model, or (cpu linears, from jpaged.packed_cache or
    just packed) its params in the packed layout, or both."""

    config: LlamaConfig
    model: Llama | None
    packed: dict | None = None

    @property
    def weights_dtype(self) -> str:
        if self.model is not None:
            return str(self.model.embed[...].dtype)
        return str(self.packed["packed"]["head"].dtype)

    @property
    def float_linears(self) -> bool:
        """No linear is quantized (packed params hold only float linears)."""
        return self.model is None or all(n in self.model.layers for n in LINEAR_NAMES)


def load_engine_model(
    config: EngineConfig,
    mesh: jax.sharding.Mesh | None,
    model: Llama | None = None,
    tokenizer: Tokenizer | None = None,
) -> tuple[EngineWeights, Tokenizer]:
    """`config.model` loaded (quantized / sharded as asked), or a prebuilt model re-placed
    onto `mesh`. A checkpoint for the cpu linears on one device goes through the packed-weights
    cache (jpaged.packed_cache): a hit builds no model. ValueError when a prebuilt model comes
    without a tokenizer, or for quantization with tensor parallelism (not built)."""
    dtype = jnp.dtype(config.jax_dtype())
    if model is None:
        loaded = load_model(config.model)
        quant = resolve_quantization(config.quantization, loaded.model_dir)
        if quant is None and mesh is None and packed_cache.enabled():
            if config.resolved_linear_backend(str(dtype)) == "cpu":
                weights = _packed_weights(loaded.config, loaded.model_dir, dtype)
                return weights, loaded.tokenizer
        if quant is None:
            model = load_llama_from_dir(loaded.config, loaded.model_dir, dtype, mesh)
        elif mesh is None:
            from models.llama import llama_from_hf_tensors

            tensors = iter_safetensors(loaded.model_dir)
            model = llama_from_hf_tensors(loaded.config, tensors, dtype, quantization=quant)
        else:
            raise ValueError("quantization together with tensor_parallel_size > 1 is not built")
        tokenizer = loaded.tokenizer
    elif mesh is not None:
        model = shard_llama(model, mesh)
    if tokenizer is None:
        raise ValueError("tokenizer is required when a prebuilt model is given")
    return EngineWeights(model.config, model), tokenizer


def _packed_weights(c: LlamaConfig, model_dir: Path, dtype: jnp.dtype) -> EngineWeights:
    """The packed params from the cache, else packed from the checkpoint and saved there."""
    path = packed_cache.entry_dir(model_dir, dtype)
    packed = packed_cache.load_or_none(path)
    if packed is not None:
        return EngineWeights(c, None, packed)
    model = load_llama(c, iter_safetensors(model_dir), dtype)
    packed = pack_linear_params(model.config, model.params())
    packed_cache.save_in_background(packed, path)
    return EngineWeights(model.config, None, packed)


def pool_num_blocks(
    config: EngineConfig,
    weights: EngineWeights,
    mesh: jax.sharding.Mesh | None,
    kv_dtype: jnp.dtype,
    max_model_len: int,
) -> int:
    """KV blocks: `num_blocks`, else `kv_cache_memory`, else the device budget (CPU: 4 GiB),
    capped at what max_num_seqs full-length sequences need."""
    c, mc = config, weights.config
    if c.num_blocks is not None:
        return c.num_blocks
    budget = c.kv_cache_memory
    if budget is None:
        budget = device_kv_budget(
            bytes_per_device(weights.packed if weights.model is None else weights.model),
            0,
            c.gpu_memory_utilization,
        )
        if budget is None:
            budget = CPU_DEFAULT_KV_BYTES
        elif mesh is not None:  # per-device room x devices the pool is split over
            budget *= kv_pool_shards(mesh, mc)
        per_block = kv_bytes_per_block(mc, c.block_size, kv_dtype)
        cap = (c.max_num_seqs * -(-max_model_len // c.block_size) + 1) * per_block
        budget = min(budget, cap)
    return num_blocks_for_budget(mc, c.block_size, kv_dtype, budget)


def build_runner(
    config: EngineConfig, weights: EngineWeights, mesh: jax.sharding.Mesh | None, max_model_len: int
) -> tuple[ModelRunner, int]:
    """Resolve the backends, size and allocate the KV pool, and build the model runner.

    Returns (runner, number of KV blocks). ValueError when an asked-for backend cannot run.
    """
    attention_backend = config.resolved_backend()
    linear_backend = config.resolved_linear_backend(weights.weights_dtype, weights.float_linears)
    kv_dtype = jnp.dtype(config.jax_kv_dtype())
    num_blocks = pool_num_blocks(config, weights, mesh, kv_dtype, max_model_len)
    mc = weights.config
    sharding = kv_pool_sharding(mesh, mc) if mesh is not None else None
    zeroed = attention_backend != "cpu" or mesh is not None  # see allocate_kv_pool
    kv_pool = allocate_kv_pool(mc, num_blocks, config.block_size, kv_dtype, sharding, zeroed=zeroed)
    runner = ModelRunner(
        weights.model,
        kv_pool,
        block_size=config.block_size,
        max_model_len=max_model_len,
        attention_backend=attention_backend,
        unroll_layers=config.unroll_layers,
        mesh=mesh,
        linear_backend=linear_backend,
        fast_greedy_head=config.fast_greedy_head,
        packed_params=weights.packed,
        config=mc,
    )
    return runner, num_blocks


def start_pool_prefault(runner: ModelRunner) -> PoolPrefaulter | None:
    """The pool's prefault thread (jpaged/pool_prefault.py), stopped before the runner goes.

    Only for the uninitialized pool (the `cpu` backend on one device) and where freed memory
    stays mapped (malloc tuning applied: the thread holds a raw pointer into the pool);
    None elsewhere and with JPAGED_POOL_PREFAULT_MIB=0.
    """
    lead = lead_bytes_from_env()
    if lead == 0 or runner.attention_backend != "cpu" or runner.mesh is not None:
        return None
    from pallas_kernels import paged_attention_cpu

    prefault = paged_attention_cpu.prefault_function()
    if prefault is None or not tune_malloc():
        return None
    prefaulter = PoolPrefaulter(runner.kv_pool, lead, prefault)
    weakref.finalize(runner, prefaulter.close)
    return prefaulter
