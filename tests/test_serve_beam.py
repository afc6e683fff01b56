"""The server's use_beam_search / best_of extras on a tiny random model: same beams as
LLM.beam_search, best_of picks by cumulative logprob, OpenAI-shaped 400s."""

from __future__ import annotations

import json

import httpx
import jax.numpy as jnp
import pytest

from jpaged.beam_search import BeamSearchParams
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer
from models.config import tiny_llama_config
from models.llama import llama_from_hf_tensors
from serve.app import build_app
from serve.background import BackgroundServer
from tests.util import random_llama_tensors

PROMPT = "Paged attention shares blocks"


@pytest.fixture(scope="module")
def engine(default_model_dir):
    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                               eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.float32)
    return LLMEngine(EngineConfig(num_blocks=256, max_model_len=512, block_size=8), model=model,
                     tokenizer=Tokenizer.from_dir(default_model_dir))  # fmt: skip


@pytest.fixture(scope="module")
def expected(engine):
    """Direct engine results, computed before the server's worker owns the engine."""
    llm = LLM.from_engine(engine)
    beams3 = llm.beam_search(
        [PROMPT], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    )
    samples = llm.generate([PROMPT], SamplingParams(n=3, seed=5, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)[0].outputs  # fmt: skip
    beams2 = llm.beam_search(
        [PROMPT], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    )
    return {"beams3": [s.text for s in beams3[0].sequences],
            "beams2": [s.text for s in beams2[0].sequences],
            "best_sample": max(samples, key=lambda o: o.cumulative_logprob).text}  # fmt: skip


@pytest.fixture(scope="module")
def url(engine, expected):
    with BackgroundServer(build_app(engine, "tiny")) as srv:
        yield srv.url


def post(url, route, **body):
    return httpx.post(f"{url}/v1/{route}", json={"model": "tiny", "max_tokens": 6,
                                                  "ignore_eos": True, **body}, timeout=60)  # fmt: skip


def test_completion_beams_equal_llm_beam_search(url, expected):
    r = post(url, "completions", prompt=PROMPT, n=2, use_beam_search=True)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == expected["beams2"]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    # best_of widens the beam; the best n of the wider search come back
    r = post(url, "completions", prompt=PROMPT, n=1, best_of=3, use_beam_search=True)
    assert [c["text"] for c in r.json()["choices"]] == expected["beams3"][:1]
    assert r.json()["usage"]["completion_tokens"] == 18  # every beam returned by the engine


def test_best_of_keeps_the_highest_cumulative_logprob(url, expected):
    r = post(url, "completions", prompt=PROMPT, n=1, best_of=3, seed=5)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [expected["best_sample"]]


def test_stream_and_chat_beams(url, expected):
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": PROMPT, "n": 2, "max_tokens": 6,
                            "ignore_eos": True, "use_beam_search": True, "stream": True}) as r:  # fmt: skip
        texts = ["", ""]
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["text"]
    assert texts == expected["beams2"]
    r = post(url, "chat/completions", messages=[{"role": "user", "content": "hi"}], n=2,
             use_beam_search=True)  # fmt: skip
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.mark.parametrize(
    "route, body, param",
    [("completions", {"n": 2, "best_of": 1}, "best_of"),
     ("completions", {"best_of": 2, "stream": True}, "best_of"),
     ("completions", {"use_beam_search": True, "logprobs": 1}, "logprobs"),
     ("completions", {"use_beam_search": True, "stop": ["x"]}, "stop"),
     ("chat/completions", {"use_beam_search": True, "logprobs": True}, "logprobs")],
)  # fmt: skip
def test_refused_combinations_are_openai_400s(url, route, body, param):
    prompt = {"prompt": PROMPT} if route == "completions" else {
        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    r = post(url, route, **prompt, **body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
