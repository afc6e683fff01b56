"""The packed-weights cache (jpaged.packed_cache): entries round-trip bit-exactly, damaged ones
are rebuilt, keys follow the checkpoint and dtype, and an engine started from an entry builds
no model and generates what an engine packing the checkpoint does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import SamplingParams, packed_cache
from jpaged.engine import EngineConfig, LLMEngine
from jpaged.paths import kernels_cache_dir
from models.config import tiny_llama_config
from pallas_kernels import linear_cpu
from tests.util import save_tiny_hf_dir

CPU_LINEARS = linear_cpu.available(kernels_cache_dir(), "float32")


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "final_norm": jnp.asarray(rng.standard_normal(8), jnp.float32),
        "packed": {
            "head": jnp.asarray(rng.standard_normal((1, 3, 16, 32)), jnp.bfloat16),
            "empty": jnp.zeros((0, 4), jnp.float32),
        },
        "layers": {"ids": jnp.arange(6, dtype=jnp.int32).reshape(2, 3)},
    }


def test_round_trip_keeps_bits_dtypes_and_nesting(tmp_path):
    params = _params()
    path = tmp_path / "entry"
    assert packed_cache.load(path) is None
    packed_cache.save(params, path)
    got = packed_cache.load(path)
    assert sorted(got) == sorted(params) and sorted(got["packed"]) == sorted(params["packed"])
    for want, have in [
        (params["final_norm"], got["final_norm"]),
        (params["packed"]["head"], got["packed"]["head"]),
        (params["packed"]["empty"], got["packed"]["empty"]),
        (params["layers"]["ids"], got["layers"]["ids"]),
    ]:
        assert have.dtype == want.dtype and have.shape == want.shape
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want))
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary dir left behind


def test_damaged_entry_is_reported_then_removed(tmp_path):
    path = tmp_path / "entry"
    packed_cache.save(_params(), path)
    victim = next(f for f in path.iterdir() if f.suffix == ".bin" and f.stat().st_size > 8)
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(ValueError, match="missing or truncated"):
        packed_cache.load(path)
    assert packed_cache.load_or_none(path) is None
    assert not path.exists()


def test_key_follows_dtype_and_weight_files(tmp_path, monkeypatch):
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "m"
    save_tiny_hf_dir(model_dir, tiny_llama_config())
    f32 = packed_cache.entry_dir(model_dir, jnp.float32)
    assert f32 == packed_cache.entry_dir(model_dir, "float32")
    assert f32 != packed_cache.entry_dir(model_dir, jnp.bfloat16)
    assert f32.parent == tmp_path / "cache" / "packed"
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert packed_cache.entry_dir(model_dir, jnp.float32) != f32


@pytest.mark.skipif(not CPU_LINEARS, reason="the cpu linear kernels do not run here")
def test_engine_from_an_entry_matches_packing_the_checkpoint(
    tmp_path, monkeypatch, default_model_dir
):
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny"
    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    save_tiny_hf_dir(model_dir, config, seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, model_dir / name)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3,"]

    def run(cache: str) -> tuple[list[list[int]], LLMEngine]:
        monkeypatch.setenv("JPAGED_PACKED_CACHE", cache)
        engine = LLMEngine(EngineConfig(model=str(model_dir), linear_backend="cpu", num_blocks=64))
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        return [list(done[str(i)]) for i in range(len(prompts))], engine

    plain, _ = run("0")
    entry = packed_cache.entry_dir(model_dir, jnp.float32)
    assert not entry.exists()  # off: nothing written
    first, _ = run("1")  # packs the checkpoint and saves the entry (from a thread)
    packed_cache.wait_for_saves()
    assert (entry / "manifest.json").is_file()

    import models.llama

    def no_model(*_args, **_kwargs):
        raise AssertionError("a cache hit built the model from the checkpoint")

    monkeypatch.setattr(models.llama, "llama_from_hf_tensors", no_model)
    second, engine = run("1")  # from the entry
    assert first == plain and second == plain
    assert engine.runner.linear_backend == "cpu"

    # A fresh process started from the entry, chat template included, imports neither Flax
    # (no Llama module is built) nor transformers (the plain tokenizer.json): ~2 s of start-up.
    child = (
        "import sys, jpaged\n"
        f"llm = jpaged.LLM(model={str(model_dir)!r}, linear_backend='cpu', num_blocks=64)\n"
        "out = llm.chat([{'role': 'user', 'content': 'Hi'}],\n"
        "               jpaged.SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)\n"
        "assert len(out[0].outputs[0].token_ids) == 2\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'transformers'}))\n"
    )
    env = {**os.environ, "JPAGED_PACKED_CACHE": "1"}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
