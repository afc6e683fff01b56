"""`python -m jpaged.serve` as a process: --help, flag errors, the default model, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from jpaged.serve import parse_size

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--tensor-parallel-size", "--mesh", "--coordinator-address", "--dtype", "--max-model-len", "--block-size", "--max-num-seqs",
         "--max-num-batched-tokens", "--gpu-memory-utilization", "--kv-cache-memory",
         "--num-blocks", "--enable-prefix-caching", "--no-enable-prefix-caching",
         "--quantization", "--attention-backend", "--seed", "--chat-template",
         "--max-queued-requests", "--served-model-name", "--host", "--port", "--api-key",
         "--model", "--speculative-config"]  # fmt: skip


def serve(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jpaged.serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)  # fmt: skip


def test_help_lists_every_flag():
    result = serve("--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout, flag
    assert "(default: 127.0.0.1)" in result.stdout and "(default: 8000)" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--quantization", "fp8"], "invalid choice"),
        (["--mesh", "dp=2,tp=1"], "the server runs dp=1"),
        (["--num-processes", "2"], "needs coordinator_address"),
        (["--max-model-len", "lots"], "not a size"),
        (["--attention-backend", "cuda"], "invalid choice"),
        (["--speculative-config", "{ngram"], "not JSON"),
        (["--speculative-config", '{"method": "ngram"}'], "num_speculative_tokens"),
    ],
)
def test_bad_flags_exit_2(args, words):
    result = serve(*args)
    assert result.returncode == 2 and words in result.stderr


def test_parse_size():
    assert [parse_size(s) for s in ("4096", "1k", "1K", "1KiB", "2G", "512MiB", "1.5k")] == [
        4096, 1000, 1024, 1024, 2 << 30, 512 << 20, 1500
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_model_chat_then_sigterm(default_model_dir, tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jpaged.serve", "--port", str(port), "--num-blocks", "512",
         "--max-model-len", "1024", "--max-num-seqs", "4", "--shutdown-timeout", "1",
         "--disable-uvicorn-access-log"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not become healthy"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        # SIGTERM with a long request in flight: it runs --shutdown-timeout (1 s), is aborted,
        # and the process exits cleanly.
        body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # cut off, not finished
                for line in lines:
                    assert line != "data: [DONE]"
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    for line in ("KV pool: 512 blocks of 16 tokens (8192 tokens", "compiled", "engine ready",
                 "timeout graceful shutdown exceeded", "engine worker stopped"):  # fmt: skip
        assert line in text, text
