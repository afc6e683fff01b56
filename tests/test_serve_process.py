"""`python -m jpaged.serve` as a real process on a tiny random model, through the `openai` client.

One server process per module (started with --api-key, so every /v1 call carries the key):
completions, chat, streaming (streamed text == non-streamed greedy text), n, stop,
logprobs and usage; 64 concurrent streams; 16 clients that hang up mid-stream leave no KV
blocks in use; bad requests get OpenAI error bodies and the server stays healthy; every /v1
route answers 401 without the key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from models.config import tiny_llama_config
from tests.util import save_tiny_hf_dir

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
KEY = "sk-process-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A random-weight HF directory with the default model's tokenizer (vocabulary 49152)."""
    path = tmp_path_factory.mktemp("tiny-hf")
    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    save_tiny_hf_dir(path, config, seed=3)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jpaged.serve", "--model", str(model_dir),
         "--served-model-name", MODEL, "--port", str(port), "--api-key", KEY,
         "--num-blocks", "1024", "--max-model-len", str(MAX_MODEL_LEN), "--warmup", "none",
         "--shutdown-timeout", "1", "--disable-uvicorn-access-log"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    srv = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited:\n{srv.log()}"
            assert time.monotonic() < deadline, f"server not healthy in 120 s:\n{srv.log()}"
            try:
                if httpx.get(srv.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, prompt, **kw):
    kw = {"max_tokens": 12, **GREEDY, **kw}
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def num_tokens(server, **body) -> int:
    return httpx.post(server.url + "/tokenize", json=body).json()["count"]


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of `name` (whose label set contains `labels`) in a Prometheus exposition."""
    pattern = rf"^{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{{{labels}}} missing from /metrics"
    return float(match.group(1))


def wait_for_metric(server, name: str, value: float, timeout_s: float) -> str:
    """Poll /metrics until `name` equals `value`; returns the last exposition."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(server.url + "/metrics").text
        if metric(text, name) == value or time.monotonic() > deadline:
            assert metric(text, name) == value, f"{name} != {value} after {timeout_s} s"
            return text
        time.sleep(0.05)


def test_completions_stream_equals_non_streamed(client, server):
    prompt = "The quick brown fox"
    res = complete(client, prompt)
    choice = res.choices[0]
    assert (res.object, res.model, choice.index, choice.finish_reason) == (
        "text_completion", MODEL, 0, "length")  # fmt: skip
    n_prompt = num_tokens(server, prompt=prompt)
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (n_prompt, 12)
    assert res.usage.total_tokens == n_prompt + 12
    chunks = list(complete(client, prompt, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and
            c.choices[0].finish_reason] == ["length"]  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage == res.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert complete(client, [1, *range(100, 110)]).usage.prompt_tokens == 11  # token ids


def test_chat_stream_equals_non_streamed(client, server):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 9, **GREEDY}
    res = client.chat.completions.create(**kw)
    choice = res.choices[0]
    assert (res.object, choice.message.role, choice.finish_reason) == (
        "chat.completion", "assistant", "length")  # fmt: skip
    n_prompt = num_tokens(server, messages=messages)
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (n_prompt, 9)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_n_samples(client):
    kw = {"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 6}
    res = complete(client, "Three ways", **kw)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert len({c.text for c in res.choices}) == 3  # different samples
    assert res.usage.completion_tokens == 18
    streamed = ["", "", ""]
    for chunk in complete(client, "Three ways", stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in res.choices]  # the same seed gives the same samples
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          n=2, max_tokens=4, **GREEDY)  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy


def test_stop_string(client):
    full = complete(client, "Stop here", max_tokens=20).choices[0].text
    stop = full[8:11]
    cut = full.index(stop)
    res = complete(client, "Stop here", max_tokens=20, stop=[stop, "never-appears"])
    assert (res.choices[0].text, res.choices[0].finish_reason) == (full[:cut], "stop")
    chunks = list(complete(client, "Stop here", max_tokens=20, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    res = complete(client, "Log probabilities", logprobs=2, max_tokens=5).choices[0]
    lp = res.logprobs
    assert "".join(lp.tokens) == res.text and len(lp.token_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and top[token] == logprob == max(top.values())
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        logprobs=True, top_logprobs=3, **GREEDY,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob


async def stream_text(http: httpx.AsyncClient, body: dict) -> tuple[str, list[str], dict]:
    """One streamed completion: its text, its finish reasons and its usage chunk."""
    text, reasons, usage = "", [], {}
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                text += choice["text"]
                if choice["finish_reason"]:
                    reasons.append(choice["finish_reason"])
            usage = chunk.get("usage") or usage
    return text, reasons, usage


def test_64_concurrent_streams(client, server):
    bodies = [{"model": MODEL, "prompt": f"Client {i} asks" + " why" * (i % 7), "max_tokens": 16,
               "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
              for i in range(64)]  # fmt: skip

    async def run_all() -> list[tuple[str, list[str], dict]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60,
                                     limits=limits) as http:  # fmt: skip
            return await asyncio.gather(*(stream_text(http, b) for b in bodies))

    streamed = asyncio.run(run_all())
    for body, (text, reasons, usage) in zip(bodies, streamed, strict=True):
        alone = complete(client, body["prompt"], max_tokens=16)  # non-streamed, one at a time
        assert text == alone.choices[0].text, body["prompt"]
        assert reasons == ["length"] and usage == alone.usage.model_dump(exclude_none=True)
    wait_for_metric(server, "jpaged:kv_cache_blocks_in_use", 0, timeout_s=5)


def test_16_disconnects_free_their_blocks(client, server):
    before = httpx.get(server.url + "/metrics").text
    body = {"model": MODEL, "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip

    async def hang_up_mid_stream() -> str:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
            requests = [
                http.build_request("POST", "/v1/completions",
                                   json={**body, "prompt": f"Story {i} begins"})
                for i in range(16)
            ]  # fmt: skip
            responses = await asyncio.gather(*(http.send(r, stream=True) for r in requests))
            readers = [response.aiter_lines() for response in responses]  # keep them: a
            # dropped reader is garbage-collected, which closes its connection
            for response, lines in zip(responses, readers, strict=True):
                assert response.status_code == 200
                while not (await anext(lines)).startswith('data: {"id"'):
                    pass  # until each has streamed its first token
            text = (await http.get("/metrics")).text  # counters as of the tokens seen
            for response in responses:
                await response.aclose()  # closes the connection mid-stream
            return text

    streaming = asyncio.run(hang_up_mid_stream())
    assert metric(streaming, "jpaged:num_requests_running") == 16
    assert metric(streaming, "jpaged:kv_cache_blocks_in_use") >= 16  # one block each at least
    after = wait_for_metric(server, "jpaged:kv_cache_blocks_in_use", 0, timeout_s=5)
    assert metric(after, "jpaged:num_requests_running") == 0
    aborted = 'finished_reason="abort"'
    assert metric(after, "jpaged:request_success_total", aborted) - (
        metric(before, "jpaged:request_success_total", aborted) if aborted in before else 0
    ) == 16  # fmt: skip
    assert complete(client, "Still serving", max_tokens=3).usage.completion_tokens == 3


BAD_REQUESTS = [
    # (method, path, json body or raw bytes, status, param)
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400,
     "temperature"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": "two"}, 400, "n"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x " * 600}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("POST", "/v1/completions", b'{"prompt": ', 400, None),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}],
                                      "max_completion_tokens": 10_000}, 400,
     "max_completion_tokens"),
    ("GET", "/v1/completions", None, 405, None),
    ("GET", "/v1/no-such-route", None, 404, None),
    ("POST", "/detokenize", {"tokens": [49152]}, 400, "tokens"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_and_the_server_stays_up(client, server):
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        for method, path, body, status, param in BAD_REQUESTS:
            raw = {"content": body, "headers": {"Content-Type": "application/json"}}
            kw = raw if isinstance(body, bytes) else {"json": body}
            response = http.request(method, path, **kw)
            assert response.status_code == status, (path, body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, (path, body, error)
            assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, "x", top_p=0)
    assert info.value.status_code == 400 and info.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert httpx.get(server.url + "/health").status_code == 200
    assert complete(client, "Fine again", max_tokens=4).choices[0].finish_reason == "length"


def test_every_v1_route_needs_the_key(server):
    spec = httpx.get(server.url + "/openapi.json").json()  # the app's own list of routes
    routes = [(method.upper(), path) for path, item in spec["paths"].items()
              if path.startswith("/v1") for method in item]  # fmt: skip
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models")} <= set(routes)  # fmt: skip
    with httpx.Client(base_url=server.url) as http:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                response = http.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
            assert http.request(method, path, headers=AUTH, json={}).status_code != 401
        assert http.get("/health").status_code == 200  # only /v1 needs the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
