"""The server against its own OpenAPI schema: schemathesis finds no 5xx; /v1 routes need the key.

schemathesis generates valid (positive) and invalid (negative) requests for every operation
of the app's /openapi.json and sends them to the app (a tiny random model, served by
uvicorn in a thread); every answer must be below 500, and every 4xx an OpenAI error body.
The examples are a fixed (derandomized) set; `JPAGED_SCHEMA_EXAMPLES=500` runs a longer
random exploration instead.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import httpx
import jax.numpy as jnp
import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, given, settings

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.tokenizer import Tokenizer
from models.config import tiny_llama_config
from models.llama import llama_from_hf_tensors
from serve.app import build_app
from serve.background import BackgroundServer
from tests.util import random_llama_tensors

try:
    import requests  # schemathesis sends its cases with it
    import schemathesis
except ImportError:  # in the `test` extra; only the fuzzing test needs it
    schemathesis = None

KEY = "sk-schema-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
# examples per operation and generation mode
EXPLORE = os.environ.get("JPAGED_SCHEMA_EXAMPLES")
MAX_EXAMPLES = int(EXPLORE or 50)


@pytest.fixture(scope="module")
def app(default_model_dir):
    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.float32)
    # a short context and few sequences bound the work any generated request can ask for
    engine = LLMEngine(
        EngineConfig(num_blocks=128, max_model_len=64, max_num_seqs=4, warmup="none"),
        model=model,
        tokenizer=Tokenizer.from_dir(default_model_dir),
    )
    return build_app(engine, "tiny", api_key=KEY, max_queued_requests=64)


@pytest.fixture(scope="module")
def server(app):
    with BackgroundServer(app) as srv:
        yield srv


def test_schema_lists_every_route(app):
    labels = {f"{m.upper()} {path}" for path, item in app.openapi()["paths"].items() for m in item}
    routes = {f"{m} {r.path}" for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
    assert labels == routes
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
            "POST /tokenize", "POST /detokenize", "GET /health", "GET /metrics"} <= labels  # fmt: skip


def fuzz(operation, mode: str, url: str, seen: Counter[int]) -> None:
    """Send up to MAX_EXAMPLES generated requests to one operation; none may get a 5xx."""
    session = requests.Session()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              derandomize=not EXPLORE, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink])  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def check(case) -> None:
        response = case.call(base_url=url, session=session, headers=AUTH, timeout=30)
        seen[response.status_code] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text
            assert error["type"] == "invalid_request_error", response.text

    check()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(app, server, mode):
    if schemathesis is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    schema = schemathesis.openapi.from_dict(app.openapi())
    statuses: dict[str, Counter[int]] = {}
    for operation in (result.ok() for result in schema.get_all_operations()):
        if mode == "negative" and not (operation.body or list(operation.iter_parameters())):
            continue  # nothing to make invalid
        fuzz(operation, mode, server.url, statuses.setdefault(operation.label, Counter()))
    assert httpx.get(server.url + "/health").status_code == 200
    if mode == "positive":  # the fuzzer got past validation into the engine
        generated = statuses["POST /v1/completions"] + statuses["POST /v1/chat/completions"]
        assert generated[200] > 0, statuses
    async_engine = app.state.server.async_engine
    deadline = time.monotonic() + 5
    while async_engine.snapshot.blocks_in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert async_engine.snapshot.blocks_in_use == 0


C, CHAT = "/v1/completions", "/v1/chat/completions"
# bodies (raw JSON: lone surrogates, huge ints) that got a 500, a dropped connection or a
# dead engine before serve/ checked them, and a few neighbours
HOSTILE = [
    # (path, raw JSON body, status, param)
    (C, '{"prompt": "x", "n": 100000000000000000000}', 400, "n"),  # stalled the engine worker
    (C, '{"prompt": "x", "stop_token_ids": [1000000000000], "min_tokens": 2}', 400,
     "stop_token_ids"),  # int32 overflow in the sampler: engine failed
    (C, '{"prompt": "x", "temperature": 1, "repetition_penalty": 1e-45}', 400,
     "repetition_penalty"),  # NaN probabilities, an out-of-vocabulary id: engine failed
    (C, '{"prompt": "\\ud800"}', 400, "prompt"),  # lone surrogate: tokenizer TypeError, 500
    (C, '{"prompt": ["ok", "\\udfff"]}', 400, "prompt"),
    (C, '{"prompt": "x", "stop": ["\\ud800"]}', 400, "stop"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', 400, "prompt"),
    (C, '{"prompt": "x", "model": "\\ud800"}', 404, "model"),  # the message quotes it
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', 400, "messages"),
]  # fmt: skip


def test_hostile_values_get_4xx_and_the_engine_survives(app, server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
        for path, body, status, param in HOSTILE:
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["param"] == param, (body, response.text)
        assert http.get("/health").status_code == 200
        # top_k beyond the vocabulary (and int32) means "off", as in vLLM
        huge_top_k = {"prompt": "x", "top_k": 10**10, "max_tokens": 3, "ignore_eos": True}
        response = http.post(C, json=huge_top_k)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").status_code == 200


def test_every_v1_route_answers_401_without_the_key(app, server):
    routes = [(method, route.path) for route in app.routes if isinstance(route, APIRoute)
              and route.path.startswith("/v1") for method in sorted(route.methods)]  # fmt: skip
    assert len(routes) >= 3
    with httpx.Client(base_url=server.url) as http:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}):  # fmt: skip
                response = http.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                error = response.json()["error"]
                assert (error["code"], error["type"]) == ("invalid_api_key",
                                                          "invalid_request_error")  # fmt: skip
            assert http.request(method, path, headers=AUTH, json={}).status_code != 401
        open_routes = [r.path for r in app.routes if isinstance(r, APIRoute)
                       and not r.path.startswith("/v1") and "GET" in r.methods]  # fmt: skip
        for path in open_routes:
            assert http.get(path).status_code == 200, path
