"""Tensor / data parallelism: partition plans, mesh config, and sharded greedy runs that must
equal tp=1 token for token (in a subprocess with 8 CPU devices, tests/sharded_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jpaged.config import EngineConfig
from jpaged.mesh import build_mesh, mesh_shape, parse_mesh
from models.config import LlamaConfig, tiny_llama_config
from models.sharding import kv_pool_spec, plan_sharding, repeat_kv_heads, weight_spec
from tests.util import ROOT

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)  # fmt: skip


def test_plan_for_smollm2():
    at3 = plan_sharding(SMOLLM2, 3)
    assert (at3.attention, at3.mlp, at3.vocab, at3.kv_repeats) == (True, True, True, 1)
    at2 = plan_sharding(SMOLLM2, 2)  # 9 heads: attention stays whole, MLP + vocab split
    assert (at2.attention, at2.mlp, at2.vocab, at2.kv_repeats) == (False, True, True, 1)
    at9 = plan_sharding(SMOLLM2, 9)  # 3 KV heads each stored 3 times, one per device
    assert (at9.attention, at9.kv_repeats) == (True, 3)
    assert weight_spec("layers/wq", at3) == P(None, None, "tp")
    assert weight_spec("layers/wo", at3) == P(None, "tp", None)
    assert weight_spec("layers/w_down", at3) == P(None, "tp", None)
    assert weight_spec("embed", at3) == P("tp", None)
    assert weight_spec("lm_head", at3) == P(None, "tp")
    assert weight_spec("layers/attn_norm", at3) == P()
    assert weight_spec("layers/wq", at2) == P()
    assert weight_spec("layers/w_up", at2) == P(None, None, "tp")
    assert kv_pool_spec(at3) == P(None, None, None, None, "tp", None)
    assert kv_pool_spec(at2) == P()
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        plan_sharding(SMOLLM2, 0)


def test_repeat_kv_heads_keeps_each_head_contiguous():
    w = np.arange(2 * 3 * 4).reshape(5 - 3, 3 * 4)  # [d=2, k*e] with k=3 heads of e=4
    out = repeat_kv_heads(w, head_dim=4, repeats=2, axis=1)
    heads = out.reshape(2, 6, 4)
    for k in range(3):
        np.testing.assert_array_equal(heads[:, 2 * k], w.reshape(2, 3, 4)[:, k])
        np.testing.assert_array_equal(heads[:, 2 * k + 1], w.reshape(2, 3, 4)[:, k])
    # the plan's query-to-KV map is unchanged: head h of 8 read kv h // 2 of 4, now h // 1 of 8
    assert (
        plan_sharding(tiny_llama_config(num_attention_heads=8, num_key_value_heads=4), 8).kv_repeats
        == 2
    )


def test_repeated_kv_heads_give_the_same_tokens(default_model_dir):
    """The model tp=8 stores (each of 4 KV heads twice, config KV = 8) generates what the
    checkpoint's model does; tested on one device, where only the repeat differs."""
    import jax.numpy as jnp

    from jpaged.engine import LLMEngine
    from jpaged.llm import LLM
    from jpaged.sampling_params import SamplingParams
    from jpaged.sharded_model import _repeat_kv
    from jpaged.tokenizer import Tokenizer
    from models.llama import llama_from_hf_tensors
    from models.sharding import expanded_config
    from tests.util import random_llama_tensors

    config = tiny_llama_config(vocab_size=4096, hidden_size=64, intermediate_size=128,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=8)  # fmt: skip
    plan = plan_sharding(config, 8)
    tensors = random_llama_tensors(config, 11)
    models = [
        llama_from_hf_tensors(config, tensors.items(), jnp.float32),
        llama_from_hf_tensors(
            expanded_config(config, plan), _repeat_kv(tensors.items(), 8, 2), jnp.float32
        ),
    ]
    assert models[1].config.num_key_value_heads == 8
    tokenizer = Tokenizer.from_dir(default_model_dir)
    prompts = [[int(t)] for t in np.random.default_rng(4).integers(10, 4000, 3)]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=20)
    tokens = []
    for model in models:
        engine = LLMEngine(EngineConfig(num_blocks=16, max_model_len=64, enable_compile_cache=False),
                           model=model, tokenizer=tokenizer)  # fmt: skip
        tokens.append(
            [
                o.outputs[0].token_ids
                for o in LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
            ]
        )
    assert tokens[0] == tokens[1]


def test_mesh_config_parsing_and_errors():
    assert parse_mesh("dp=2,tp=4") == {"dp": 2, "tp": 4}
    assert parse_mesh({"tp": 2}) == {"dp": 1, "tp": 2}
    assert mesh_shape(4, None) == (1, 4)
    assert mesh_shape(2, "dp=3,tp=2") == (3, 2)
    for bad, match in [("dp=2,pp=2", "axis 'pp'"), ("tp=0", "tp must be"), ("tp", "dp=2,tp=4"),
                       ("tp=2,tp=2", "twice"), ({"tp": "2"}, "tp must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="disagrees with mesh"):
        EngineConfig(tensor_parallel_size=2, mesh="tp=4")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="needs 64 devices"):
        build_mesh(8, 8)


def run_check(case: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_check.py"), case],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_bytes_split(info: dict, tp: int) -> None:
    """Per-device weight bytes = split part / tp + the replicated norms, exactly."""
    total, replicated = info["weight_bytes_total"], info["weight_bytes_replicated"]
    assert info["weight_bytes_per_device"] == (total - replicated) // tp + replicated
    assert replicated < total / 1000


def test_tiny_meshes_equal_tp1():
    """8 heads / 4 KV heads: tp=2 and tp=4 split heads; dp=2,tp=2 (two replicas of 2)."""
    r = run_check("tiny")
    base = r["tp=1"]["tokens"]
    assert len(base) == 4 and all(len(t) == 12 for t in base)
    for name in ("tp=2", "tp=4", "dp=2,tp=2"):
        assert r[name]["tokens"] == base, name
    for tp in (2, 4):
        assert_bytes_split(r[f"tp={tp}"], tp)
        assert r[f"tp={tp}"]["pool_devices"] == tp
    assert r["tp=2"]["pool_shard_shape"] == [2, 96, 2, 16, 2, 16]
    assert r["tp=4"]["pool_shard_shape"] == [2, 96, 2, 16, 1, 16]
    assert r["dp=2,tp=2"]["replica_devices"] == [[0, 1], [2, 3]]
    assert all(steps > 0 for steps in r["dp=2,tp=2"]["replica_steps"])  # both replicas worked
    cache = r["orbax_cache"]  # the second sharded load restored the orbax copy, identically
    assert (cache["saved"], cache["restored"], cache["equal"], cache["same_shardings"]) == (
        True,
        1,
        True,
        True,
    )
    assert cache["wq_shard_shape"] == [2, 128, 64]  # [L, d, h*e / tp]


@pytest.mark.slow
def test_default_model_tp3_equals_tp1():
    """SmolLM2 (9 heads, 3 KV heads, 1536 MLP, 49152 vocab) splits evenly 3 ways."""
    r = run_check("default")
    assert r["tp=3"]["tokens"] == r["tp=1"]["tokens"]
    assert_bytes_split(r["tp=3"], 3)
    screen = 49152 * 576 * 2 + 49152 * 4 if r["tp=1"]["head_screening"] else 0  # fast_greedy_head
    assert r["tp=1"]["weight_bytes_total"] == 134_515_008 * 4 + 32 * 4 + screen  # + inv_freq
    assert r["tp=3"]["pool_shard_shape"] == [30, 64, 2, 16, 1, 64]
