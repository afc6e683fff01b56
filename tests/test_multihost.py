"""Two processes over loopback (one CPU device each, jax.distributed + gloo), tp=2 across
them: process 0 schedules and streams steps to process 1; tokens equal a one-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jpaged import multihost
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams
from jpaged.sampling_tensors import build_sampling_tensors
from jpaged.tokenizer import Tokenizer
from tests.multihost_check import tiny_setup
from tests.util import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_options_from_env_and_errors(monkeypatch):
    monkeypatch.setenv("JPAGED_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JPAGED_NUM_PROCESSES", "4")
    monkeypatch.setenv("JPAGED_PROCESS_ID", "3")
    assert multihost.distributed_options(None, None, None) == ("10.0.0.1:1234", 4, 3)
    assert multihost.distributed_options(None, 2, 1) == ("10.0.0.1:1234", 2, 1)
    assert multihost.step_address("10.0.0.1:1234") == ("10.0.0.1", 1235)
    with pytest.raises(ValueError, match="process_id"):
        multihost.distributed_options(None, 2, 2)
    monkeypatch.delenv("JPAGED_COORDINATOR_ADDRESS")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="coordinator_address"):
        multihost.distributed_options(None, 2, 0)
    monkeypatch.delenv("JPAGED_NUM_PROCESSES")
    monkeypatch.delenv("JPAGED_PROCESS_ID")
    assert multihost.distributed_options(None, None, None) == (None, 1, 0)


def test_step_stream_round_trip():
    """What the follower decodes is exactly what process 0 sent (every leaf, dtype, shape)."""
    from jpaged.model_runner import ModelRunner, StepSeq
    from jpaged.sampling_tensors import SamplingRow
    from jpaged.step_shapes import step_shape

    seqs = [StepSeq([5, 6, 7], 0, [1]), StepSeq([9], 4, [2, 3])]
    shape = step_shape(seqs, 2)
    batch = ModelRunner.build_batch(
        type("R", (), {"block_size": 4, "max_blocks_per_seq": 4})(), seqs, [0, 1], shape
    )
    rows = [SamplingRow(SamplingParams(temperature=0.5, seed=3), 3, 0, (), ())] * 2
    sent = (batch, np.zeros((2, 2), np.int32), build_sampling_tensors(rows, 2),
            (np.arange(2, dtype=np.int32), np.ones(2, np.int32)), 20)  # fmt: skip
    server = socket.create_server(("127.0.0.1", 0))
    address = server.getsockname()
    server.close()
    import threading

    got = []
    follower = threading.Thread(target=lambda: got.extend(multihost.receive_steps(address, 20)))
    follower.start()
    broadcaster = multihost.StepBroadcaster(address, num_followers=1, timeout=20)
    broadcaster(sent)
    broadcaster(sent)
    broadcaster.close()
    follower.join(20)
    assert len(got) == 2
    import jax

    for a, b in zip(jax.tree.leaves(sent[:4]), jax.tree.leaves(got[0][:4]), strict=True):
        assert np.asarray(a).dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)
    assert got[0][4] == 20
    assert jax.tree.structure(sent[:4]) == jax.tree.structure(got[1][:4])


def test_two_processes_tp2_over_loopback(tmp_path, default_model_dir):
    model, prompts, params = tiny_setup()
    engine = LLMEngine(
        EngineConfig(num_blocks=32, max_model_len=128, warmup="none", enable_compile_cache=False),
        model=model, tokenizer=Tokenizer.from_dir(default_model_dir),
    )  # fmt: skip
    expected = [
        o.outputs[0].token_ids
        for o in LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    ]

    port, out = free_port(), tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX", "XLA"))}
    script = str(ROOT / "tests" / "multihost_check.py")
    procs = [
        subprocess.Popen([sys.executable, script, str(i), str(port), str(out)], env=env,
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]  # fmt: skip
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(x[-3000:] for x in logs)
    result = json.loads(out.read_text())
    assert result["global_devices"] == 2
    assert result["pool_shape"] == [2, 32, 2, 16, 2, 16]
    assert result["pool_local_shard_shape"] == [2, 32, 2, 16, 1, 16]  # one KV head per host
    assert result["tokens"] == expected
    assert f"follower ran {result['steps']} steps" in logs[1]
