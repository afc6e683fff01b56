"""The HTTP server through the official `openai` client, on a tiny random model over loopback."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import jax.numpy as jnp
import openai
import pytest

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.tokenizer import Tokenizer
from models.config import tiny_llama_config
from models.llama import llama_from_hf_tensors
from serve.app import build_app
from serve.background import BackgroundServer
from tests.util import random_llama_tensors

MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def engine(default_model_dir):
    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                               eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.float32)
    return LLMEngine(
        EngineConfig(num_blocks=256, max_model_len=512, warmup="none"),
        model=model,
        tokenizer=Tokenizer.from_dir(default_model_dir),
    )


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(build_app(engine, MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def complete(client, prompt, **kw):
    kw = {"max_tokens": 10, **GREEDY, **kw}
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def wait_idle(server, engine, timeout_s=5.0):
    """Until the engine holds no request and no block (the worker has caught up)."""
    async_engine = server.server.config.app.state.server.async_engine
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = async_engine.snapshot
        if snap.num_unfinished == 0 and snap.blocks_in_use == 0:
            return snap
        time.sleep(0.01)
    raise AssertionError(f"engine still busy: {async_engine.snapshot}")


def test_completion_prompt_forms(client, engine):
    text = complete(client, "The quick brown fox").choices[0]
    assert text.finish_reason == "length" and len(text.text) > 0
    ids = engine.tokenizer.encode("The quick brown fox")
    assert complete(client, ids).choices[0].text == text.text
    other = complete(client, "Paged attention").choices[0].text
    both = complete(client, ["The quick brown fox", "Paged attention"])
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [text.text, other]
    assert both.usage.prompt_tokens == len(ids) + len(engine.tokenizer.encode("Paged attention"))
    assert both.usage.completion_tokens == 20
    echo = complete(client, "The quick brown fox", echo=True).choices[0]
    assert echo.text == "The quick brown fox" + text.text


def test_completion_n_and_seed(client):
    kw = {"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 8}
    first = complete(client, "Sampling", **kw)
    again = complete(client, "Sampling", **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.completion_tokens == 16
    streamed = {0: "", 1: ""}
    for chunk in complete(client, "Sampling", stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in first.choices]


def test_completion_logprobs(client, engine):
    res = complete(client, "Log probabilities", logprobs=3, max_tokens=6).choices[0]
    lp = res.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == res.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob < 0 and 3 <= len(top) <= 4
        assert top[token] == logprob == max(top.values())  # greedy: the chosen is the best
    streamed = [c.choices[0] for c in complete(client, "Log probabilities", logprobs=3,
                                                max_tokens=6, stream=True)]  # fmt: skip
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
    assert tokens == lp.tokens
    assert [o for c in streamed if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset


def test_stop_strings(client):
    full = complete(client, "Stop here", max_tokens=20).choices[0].text
    stop = full[6:9]
    cut = full.index(stop)
    res = complete(client, "Stop here", max_tokens=20, stop=[stop]).choices[0]
    assert (res.text, res.finish_reason) == (full[:cut], "stop")
    assert res.model_extra["stop_reason"] == stop
    chunks = [c.choices[0] for c in complete(client, "Stop here", max_tokens=20, stop=stop,
                                             stream=True)]  # fmt: skip
    assert "".join(c.text for c in chunks) == full[:cut]
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    with_stop = complete(
        client,
        "Stop here",
        max_tokens=20,
        stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert with_stop.choices[0].text == full[: cut + len(stop)]


def test_chat_and_usage(client, engine, server):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, **GREEDY)
    prompt_ids = engine.tokenizer.apply_chat_template(messages, tokenize=True)
    assert res.object == "chat.completion" and res.model == MODEL
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason == "length"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(prompt_ids), 7)
    assert res.usage.total_tokens == len(prompt_ids) + 7
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == res.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [r for r in reasons if r] == ["length"] and reasons[-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(prompt_ids) + 7
    assert all(c.usage is None for c in chunks[:-1])
    count = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert count["count"] == len(prompt_ids)


def test_chat_logprobs_and_n(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2,
                                         logprobs=True, top_logprobs=2, **GREEDY)  # fmt: skip
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[0].message.content == res.choices[1].message.content  # greedy
    content = res.choices[0].logprobs.content
    assert "".join(t.token for t in content) == res.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob
        assert t.bytes == list(t.token.encode())
    assert res.usage.completion_tokens == 10


def test_side_routes(server, engine):
    models = httpx.get(server.url + "/v1/models").json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, 512)]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": "0.1.0"}
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == engine.tokenizer.encode("Hello world") and tok["count"] == 2
    assert tok["max_model_len"] == 512
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok == {"prompt": "Hello world"}


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_metrics_move(server, client):
    before = httpx.get(server.url + "/metrics").text
    for name in ("jpaged:num_requests_running", "jpaged:num_requests_waiting",
                 "jpaged:kv_cache_blocks_in_use", "jpaged:prefix_cache_hit_rate",
                 "jpaged:num_preemptions_total", "jpaged:time_to_first_token_seconds_count",
                 "jpaged:inter_token_latency_seconds_count",
                 "jpaged:e2e_request_latency_seconds_count",
                 "jpaged:spec_decode_num_draft_tokens_total"):  # fmt: skip
        metric(before, name)
    complete(client, "metrics please", max_tokens=5)
    after = httpx.get(server.url + "/metrics").text
    ids = len(
        httpx.post(server.url + "/tokenize", json={"prompt": "metrics please"}).json()["tokens"]
    )

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert delta("jpaged:prompt_tokens_total") == ids
    assert delta("jpaged:generation_tokens_total") == 5
    assert delta("jpaged:time_to_first_token_seconds_count") == 1
    assert delta("jpaged:inter_token_latency_seconds_count") == 4
    assert delta("jpaged:e2e_request_latency_seconds_count") == 1
    assert metric(after, "jpaged:kv_cache_blocks_in_use") == 0


def test_concurrent_equals_sequential(client, engine, server):
    prompts = [f"Request number {i} says" + " more" * i for i in range(8)]
    one_by_one = [complete(client, p, max_tokens=12).choices[0].text for p in prompts]
    batch_sizes = []
    step = engine.step

    def recording_step():
        outputs = step()
        batch_sizes.append(len(outputs))
        return outputs

    engine.step = recording_step
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: complete(client, p, max_tokens=12), prompts))
    finally:
        del engine.step
    assert [r.choices[0].text for r in together] == one_by_one
    assert max(batch_sizes) > 1  # they really shared steps
    wait_idle(server, engine)


def slowed(engine, seconds):
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step


def test_disconnect_aborts_and_frees_blocks(server, engine):
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    slowed(engine, 0.02)
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""
            assert next(lines).startswith("data: ")
            assert server.server.config.app.state.server.async_engine.snapshot.blocks_in_use > 0
        wait_idle(server, engine, timeout_s=3.0)
        # non-streaming: the client gives up (read timeout) and the request is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False},
                       timeout=httpx.Timeout(5.0, read=0.5))  # fmt: skip
        snap = wait_idle(server, engine, timeout_s=3.0)
    finally:
        del engine.step
    assert snap.blocks_in_use == 0 and engine.scheduler.stats.blocks_in_use == 0
    text = httpx.get(server.url + "/metrics").text
    abort_count = re.search(r'request_success_total{finished_reason="abort"[^}]*} (\S+)', text)
    assert abort_count and float(abort_count.group(1)) == 2
