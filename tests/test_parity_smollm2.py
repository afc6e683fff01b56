"""The default model (SmolLM2-135M-Instruct from its GGUF) against transformers, token for token."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.gguf_import import default_gguf_path
from jpaged.weights import iter_safetensors, load_model
from models.llama import llama_from_hf_tensors
from tests.test_llama import paged_greedy
from tests.util import run_ref_model

pytestmark = pytest.mark.slow

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
]
CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
NUM_NEW = 32


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model(None)
    model = llama_from_hf_tensors(loaded.config, iter_safetensors(loaded.model_dir), jnp.float32)
    return loaded, model


def test_smollm2_greedy_parity(smollm2, tmp_path):
    loaded, model = smollm2
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in RAW_PROMPTS]
    for question in CHAT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": question}])
        prompts.append(tok.encode(text, add_special_tokens=False))
    gguf = default_gguf_path()
    ref = run_ref_model(
        tmp_path,
        {
            "model_dir": str(gguf.parent),
            "gguf_file": gguf.name,
            "prompts": prompts,
            "max_new_tokens": NUM_NEW,
        },
    )
    worst = 0.0
    for i, prompt in enumerate(prompts):
        logits, tokens = paged_greedy(model, prompt, NUM_NEW, block_size=16, seed=i)
        diff = float(np.max(np.abs(logits - ref[f"last_logits_{i}"])))
        worst = max(worst, diff)
        assert diff < 1e-3, f"prompt {i}: last-token logits differ by {diff}"
        assert tokens == ref[f"tokens_{i}"].tolist(), f"prompt {i}: {tok.decode(tokens)!r}"
    print(f"max |logits - reference| over {len(prompts)} prompts: {worst:.2e}")
    # the known answer (FACTS.md)
    _, answer = paged_greedy(model, prompts[3], 8)
    assert tok.decode(answer).startswith("The capital of France is Paris.")
