"""One process of a two-process tp=2 run over loopback (tests/test_multihost.py starts two).

`python tests/multihost_check.py PROCESS_ID COORDINATOR_PORT OUT_JSON`: each process has one
CPU device; process 0 schedules and sends each step to process 1 (jpaged.multihost), which
follows. Process 0 writes the greedy tokens and the pool's sharding to OUT_JSON.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpaged import multihost  # noqa: E402
from jpaged.config import EngineConfig  # noqa: E402
from jpaged.engine import LLMEngine  # noqa: E402
from jpaged.llm import LLM  # noqa: E402
from jpaged.sampling_params import SamplingParams  # noqa: E402
from jpaged.tokenizer import Tokenizer  # noqa: E402
from jpaged.weights import resolve_model  # noqa: E402
from models.config import tiny_llama_config  # noqa: E402
from models.llama import llama_from_hf_tensors  # noqa: E402
from tests.util import random_llama_tensors  # noqa: E402


def tiny_setup() -> tuple:
    """The model, prompts and params both this script and the test's tp=1 run use."""
    config = tiny_llama_config(vocab_size=4096, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 7).items(), jnp.float32)
    # one-token prompts: prefill and decode steps share one shape, so one compilation each
    prompts = [[int(t)] for t in np.random.default_rng(2).integers(10, 4000, 3)]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)
    return model, prompts, params


def main(process_id: int, port: int, out_path: str) -> None:
    address = f"127.0.0.1:{port}"
    multihost.initialize_distributed(address, 2, process_id)
    model, prompts, params = tiny_setup()
    options = dict(num_blocks=32, max_model_len=128, warmup="none", enable_compile_cache=False)
    tokenizer = Tokenizer.from_dir(resolve_model(None))
    engine = LLMEngine(
        EngineConfig(tensor_parallel_size=2, **options), model=model, tokenizer=tokenizer
    )
    if process_id != 0:
        steps = multihost.follow(
            engine.runner, multihost.receive_steps(multihost.step_address(address))
        )
        print(f"follower ran {steps} steps", flush=True)
        return
    broadcaster = multihost.StepBroadcaster(multihost.step_address(address), num_followers=1)
    engine.runner.step_listener = broadcaster
    outputs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    broadcaster.close()
    pool = engine.runner.kv_pool
    result = {
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "global_devices": jax.device_count(),
        "pool_shape": list(pool.shape),
        "pool_local_shard_shape": list(pool.addressable_shards[0].data.shape),
        "steps": engine.runner.num_steps,
    }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
