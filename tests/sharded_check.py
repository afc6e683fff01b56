"""Run greedy generation on several meshes in a fresh process with 8 CPU devices; print JSON.

`python tests/sharded_check.py tiny|default` (tests/test_sharding.py runs it): jax must see
the devices before it starts, so this cannot run inside the pytest process.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpaged.config import EngineConfig  # noqa: E402
from jpaged.data_parallel import DataParallelEngine  # noqa: E402
from jpaged.engine import LLMEngine  # noqa: E402
from jpaged.llm import LLM  # noqa: E402
from jpaged.sampling_params import SamplingParams  # noqa: E402
from jpaged.sharded_model import bytes_per_device  # noqa: E402
from jpaged.tokenizer import Tokenizer  # noqa: E402
from jpaged.weights import resolve_model  # noqa: E402
from models.config import tiny_llama_config  # noqa: E402
from models.llama import llama_from_hf_tensors  # noqa: E402
from tests.util import random_llama_tensors  # noqa: E402

REPLICATED = ("layers/attn_norm", "layers/mlp_norm", "final_norm", "inv_freq")


def describe(engine: LLMEngine) -> dict:
    """Weight bytes (total, on one device, of replicated weights) and the pool's shard shape."""
    state = engine.runner.params
    paths = jax.tree_util.tree_flatten_with_path(state)[0]
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in paths}
    total = sum(v.nbytes for v in flat.values())
    replicated = sum(v.nbytes for k, v in flat.items() if k in REPLICATED)
    pool = engine.runner.kv_pool
    return {
        "weight_bytes_total": int(total),
        "head_screening": bool(engine.runner.head_screening),  # + a bf16 head and its norms
        "weight_bytes_per_device": int(bytes_per_device(state)),
        "weight_bytes_replicated": int(replicated),
        "pool_shape": list(pool.shape),
        "pool_shard_shape": list(pool.addressable_shards[0].data.shape),
        "pool_devices": len(pool.sharding.device_set),
        "num_kv_heads": engine.model_config.num_key_value_heads,
    }


def generate(engine: LLMEngine | DataParallelEngine, prompts: list, max_tokens: int) -> list:
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    outputs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def tiny() -> dict:
    tokenizer = Tokenizer.from_dir(resolve_model(None))
    config = tiny_llama_config(vocab_size=8192, hidden_size=128, intermediate_size=256,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                               eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 5).items(), jnp.float32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, 8000, int(rng.integers(3, 40))).tolist() for _ in range(4)]
    options = dict(num_blocks=96, max_model_len=256, enable_compile_cache=False)
    results = {}
    for tp in (1, 2, 4):  # tp=8 (each KV head twice): test_sharding checks the repeat on one device
        engine = LLMEngine(
            EngineConfig(tensor_parallel_size=tp, **options), model=model, tokenizer=tokenizer
        )
        results[f"tp={tp}"] = {"tokens": generate(engine, prompts, 12), **describe(engine)}
    dp = DataParallelEngine(
        EngineConfig(mesh="dp=2,tp=2", **options), model=model, tokenizer=tokenizer
    )
    results["dp=2,tp=2"] = {
        "tokens": generate(dp, prompts, 12),
        "replica_devices": [sorted(d.id for d in r.mesh.devices.flat) for r in dp.replicas],
        "replica_steps": [r.stats.num_steps for r in dp.replicas],
    }
    results["orbax_cache"] = orbax_cache(config)
    return results


def orbax_cache(config) -> dict:
    """First sharded load saves the orbax cache; the second restores from it into tp=2."""
    import tempfile

    from jpaged import sharded_cache
    from jpaged.mesh import build_mesh
    from jpaged.sharded_model import load_llama_from_dir
    from tests.util import save_tiny_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JPAGED_CACHE_DIR"] = tmp
        save_tiny_hf_dir(Path(tmp) / "hf", config, seed=9)
        mesh = build_mesh(1, 2)
        first = load_llama_from_dir(config, Path(tmp) / "hf", jnp.float32, mesh)
        saved = sharded_cache.checkpoint_dir(Path(tmp) / "hf", jnp.float32).is_dir()
        restores = []
        original = sharded_cache.restore
        sharded_cache.restore = lambda *a: restores.append(1) or original(*a)
        second = load_llama_from_dir(config, Path(tmp) / "hf", jnp.float32, mesh)
        sharded_cache.restore = original
        pairs = list(
            zip(jax.tree.leaves(nnx_state(first)), jax.tree.leaves(nnx_state(second)), strict=True)
        )
        return {
            "saved": saved,
            "restored": len(restores),
            "equal": all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in pairs),
            "same_shardings": all(a.sharding == b.sharding for a, b in pairs),
            "wq_shard_shape": list(second.layers["wq"][...].addressable_shards[0].data.shape),
        }


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def default() -> dict:
    os.environ["JPAGED_SHARDED_CACHE"] = "0"  # the tiny case covers the orbax cache
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "2+2="]
    results = {}
    for tp in (1, 3):
        engine = LLMEngine(
            EngineConfig(tensor_parallel_size=tp, num_blocks=64, max_model_len=256, warmup="none")
        )
        chats = [
            engine.tokenizer.encode(
                engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                add_special_tokens=False,
            )
            for p in prompts
        ]
        results[f"tp={tp}"] = {"tokens": generate(engine, chats, 24), **describe(engine)}
        del engine
    return results


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    print(json.dumps({"tiny": tiny, "default": default}[sys.argv[1]]()))
