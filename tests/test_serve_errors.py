"""Error bodies of the server: every client mistake is a 4xx in OpenAI's shape, never a 500."""

from __future__ import annotations

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

KEY = "sk-test-key"


def tiny_engine(tokenizer_dir, **options) -> LLMEngine:
    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                               eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.float32)
    options = {"num_blocks": 64, "max_model_len": 128, "warmup": "none", **options}
    return LLMEngine(
        EngineConfig(**options), model=model, tokenizer=Tokenizer.from_dir(tokenizer_dir)
    )


@pytest.fixture(scope="module")
def server(default_model_dir):
    engine = tiny_engine(default_model_dir, max_num_seqs=1)
    app = build_app(engine, ["tiny", "tiny-alias"], api_key=KEY, max_queued_requests=1)
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, **kw)


def error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


CHAT = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (path, body, param, words in the message)
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", ["temperature", "-1"]),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", ["number"]),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", ["top_p"]),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", ["n must be"]),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n", ["max_num_seqs is 1"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ["max_tokens"]),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", ["logprobs"]),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop", ["stop"]),
    ("/v1/completions", {"prompt": []}, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt", ["prompt: Input should be"]),
    ("/v1/completions", {"prompt": [1, 49152]}, "prompt", ["49152"]),
    ("/v1/completions", {"max_tokens": 5}, "prompt", ["prompt", "Field required"]),
    (
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
        ["stream"],
    ),  # fmt: skip
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo", ["echo"]),
    ("/v1/completions", {"prompt": [100] * 200}, "prompt", ["200 tokens", "128"]),
    (
        "/v1/completions",
        {"prompt": "x", "max_tokens": 200},
        "max_tokens",
        ["128", "201", "1 in the prompt", "200 in max_tokens"],
    ),  # fmt: skip
    ("/v1/chat/completions", {"messages": []}, "messages", ["messages"]),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "top_logprobs": 2},
        "top_logprobs",
        ["logprobs"],
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"messages": CHAT, "logprobs": True, "top_logprobs": 30},
        "top_logprobs",
        ["top_logprobs"],
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"messages": CHAT, "max_completion_tokens": 500},
        "max_completion_tokens",
        ["128"],
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x " * 200}]},
        "messages",
        ["tokens", "128"],
    ),  # fmt: skip
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages", ["role"]),
    ("/tokenize", {}, "prompt", ["prompt or messages"]),
    ("/detokenize", {"tokens": [-1]}, "tokens", ["-1"]),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), BAD_REQUESTS)
def test_400_names_the_field(server, path, body, param, words):
    err = error(post(server, path, body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for word in words:
        assert word in err["message"], err["message"]


def test_400_for_bad_json(server):
    response = httpx.post(server.url + "/v1/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}",
                                   "Content-Type": "application/json"})  # fmt: skip
    assert "JSON" in error(response, 400)["message"]


def test_404_401(server):
    err = error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found") and "gpt-4" in err["message"]
    ok = post(server, "/v1/completions", {"model": "tiny-alias", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["model"] == "tiny-alias"
    for key in (None, "wrong"):
        err = error(post(server, "/v1/completions", {"prompt": "x"}, key=key), 401)
        assert err["code"] == "invalid_api_key"
    assert error(httpx.get(server.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # only /v1 needs the key
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    error(httpx.get(server.url + "/no/such/route"), 404)


def test_429_when_the_queue_is_full(server):
    engine = server.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.05), step())[1]  # the running request lasts >= 6 s
    body = {"prompt": "long", "max_tokens": 120, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as http:
            with http.stream("POST", server.url + "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # keep it: a dropped iterator closes the stream
                assert next(lines).startswith("data: ")  # running (max_num_seqs 1)
                with http.stream("POST", server.url + "/v1/completions", json=body) as waiting:
                    assert waiting.status_code == 200  # accepted, waits for the batch slot
                    err = error(post(server, "/v1/completions", {"prompt": "x"}), 429)
                    assert err["type"] == "rate_limit_error" and "1 requests" in err["message"]
                    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY,
                                           max_retries=0)  # fmt: skip
                    with pytest.raises(openai.RateLimitError):
                        client.completions.create(model="tiny", prompt="x")
    finally:
        del engine.step
    deadline = time.monotonic() + 3
    async_engine = server.server.config.app.state.server.async_engine
    while async_engine.snapshot.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert async_engine.snapshot.num_unfinished == 0 and async_engine.snapshot.blocks_in_use == 0
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_server_stays_up(server):
    for path, body, *_ in BAD_REQUESTS:
        assert post(server, path, body).status_code < 500
    assert httpx.get(server.url + "/health").status_code == 200
    res = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3})
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] <= 3


def test_engine_failure_is_500_then_503(default_model_dir):
    engine = tiny_engine(default_model_dir)

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step
    with BackgroundServer(build_app(engine, "tiny")) as srv:
        err = error(httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}), 500)
        assert err["type"] == "server_error" and "device lost" in err["message"]
        assert error(httpx.get(srv.url + "/health"), 503)["message"] == "the engine has failed"
        err = error(httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}), 503)
        assert err["message"] == "the engine has failed"
