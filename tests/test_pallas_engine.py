"""attention_backend="pallas" (interpret mode on CPU) gives the same greedy tokens as "xla".

Mixed steps (prefill chunks + decode tokens) go through the ragged kernel, pure decode steps
through the split-K decode kernel, every KV write through the Pallas write kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.paths import kernels_cache_dir
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer
from jpaged.weights import iter_safetensors, load_model
from models.config import tiny_llama_config
from models.llama import llama_from_hf_tensors
from pallas_kernels import paged_attention_cpu
from tests.util import random_llama_tensors


def greedy_tokens(model, tokenizer, backend: str, prompts, max_tokens: int, **options):
    config = EngineConfig(attention_backend=backend, warmup="none", **options)
    llm = LLM.from_engine(LLMEngine(config, model=model, tokenizer=tokenizer))
    assert llm.engine.runner.attention_backend == backend
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_config_resolves_backends():
    # auto on CPU: the C++ kernel where a compiler builds it
    cpu_ok = paged_attention_cpu.load(kernels_cache_dir())
    assert EngineConfig().resolved_backend() == ("cpu" if cpu_ok else "xla")
    assert EngineConfig(attention_backend="xla").resolved_backend() == "xla"
    # the cpu kernel is not partitionable: sharded steps take xla, explicit cpu is refused
    assert EngineConfig(tensor_parallel_size=2).resolved_backend() == "xla"
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(attention_backend="cpu", tensor_parallel_size=2).resolved_backend()
    assert EngineConfig(attention_backend="pallas").resolved_backend() == "pallas"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="triton")


def staggered_greedy(model, tokenizer, backend: str, prompts, max_tokens: int) -> list:
    """prompts[0] prefills alone; the rest join at step 2 next to its first decode token
    (a mixed step); then decode steps: three step shapes (compiles are the cost)."""
    config = EngineConfig(attention_backend=backend, warmup="none", num_blocks=64, block_size=8,
                          max_model_len=128)  # fmt: skip
    engine = LLMEngine(config, model=model, tokenizer=tokenizer)
    first = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens + 1)
    engine.add_request("0", prompts[0], first)  # one more token: all finish at one step
    engine.step()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    for i, prompt in enumerate(prompts[1:], 1):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert engine.runner.attention_backend == backend
    return [done[str(i)] for i in range(len(prompts))]


def test_tiny_model_pallas_equals_xla(default_model_dir):
    config = tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=2, eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 5).items(), jnp.float32)
    tokenizer = Tokenizer.from_dir(default_model_dir)
    rng = np.random.default_rng(1)
    # GQA 4:1; 8-token blocks, so contexts end in partial pages.
    prompts = [rng.integers(100, 500, n).tolist() for n in (19, 5, 11)]  # SmolLM2's ids
    want = staggered_greedy(model, tokenizer, "xla", prompts, 6)
    got = staggered_greedy(model, tokenizer, "pallas", prompts, 6)
    assert got == want
    assert staggered_greedy(model, tokenizer, "cpu", prompts, 6) == want


@pytest.mark.slow
def test_default_model_pallas_equals_xla():
    loaded = load_model(None)
    model = llama_from_hf_tensors(loaded.config, iter_safetensors(loaded.model_dir), jnp.float32)
    tok = loaded.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    options = dict(num_blocks=32, max_model_len=256)
    want = greedy_tokens(model, tok, "xla", prompts, 4, **options)
    got = greedy_tokens(model, tok, "pallas", prompts, 4, **options)
    assert got == want
    print("default model tokens:", got)
