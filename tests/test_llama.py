"""models/llama.py: token-exact greedy parity with transformers through the paged KV pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpaged.kv_pool import allocate_kv_pool
from jpaged.model_runner import ModelRunner, StepSeq
from jpaged.step_shapes import step_shape
from jpaged.weights import iter_safetensors, load_config
from models.config import tiny_llama_config
from models.llama import Llama, llama_from_hf_tensors, llama_to_hf_tensors
from models.rope import rope_inv_freq
from tests.util import run_ref_model, save_tiny_hf_dir


def paged_greedy(
    model: Llama, prompt: list[int], num_new: int, *, block_size: int = 16, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Prompt as one prefill, then one decode token per step, through a shuffled block table.

    Returns (logits after the prompt [vocab], greedy tokens).
    """
    total = len(prompt) + num_new
    num_blocks = -(-total // block_size) + 8
    rng = np.random.default_rng(seed)
    table = (rng.permutation(num_blocks - 1) + 1)[: -(-total // block_size)].tolist()
    pool = allocate_kv_pool(model.config, num_blocks, block_size, jnp.float32)
    runner = ModelRunner(model, pool, block_size=block_size, max_model_len=total + block_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, pool, batch):
        return nnx.merge(graphdef, state)(pool, batch)

    tokens, first_logits, pos = list(prompt), None, 0
    for _ in range(num_new):
        seq = StepSeq(tokens[pos:], pos, table)
        batch = runner.build_batch([seq], [0], step_shape([seq], 1))
        logits, pool = forward(state, pool, batch)
        logits = np.asarray(logits[0])
        if first_logits is None:
            first_logits = logits
        pos = len(tokens)
        tokens.append(int(np.argmax(logits)))
    return first_logits, tokens[len(prompt) :]


def test_hf_tensors_round_trip():
    config = tiny_llama_config()
    model = Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    tensors = llama_to_hf_tensors(model)
    rebuilt = llama_from_hf_tensors(config, tensors.items(), jnp.float32)
    for name, value in llama_to_hf_tensors(rebuilt).items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_missing_tensor_is_named():
    config = tiny_llama_config()
    tensors = llama_to_hf_tensors(Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        llama_from_hf_tensors(config, tensors.items(), jnp.float32)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    config = tiny_llama_config()
    plain = rope_inv_freq(tiny_llama_config(rope_scaling=None))
    scaled = rope_inv_freq(config)
    assert scaled[0] == plain[0]  # highest frequency untouched
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # lowest divided by factor


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_hf_dir(path, tiny_llama_config(), seed=0)
    return path


def test_tiny_parity_with_transformers(tiny_dir, tmp_path):
    """GQA 4:1, untied embeddings, llama3 RoPE scaling, saved as an HF dir and loaded back."""
    config = load_config(tiny_dir)
    assert config == tiny_llama_config()
    model = llama_from_hf_tensors(config, iter_safetensors(tiny_dir), jnp.float32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (1, 7, 33, 70)]
    ref = run_ref_model(
        tmp_path, {"model_dir": str(tiny_dir), "prompts": prompts, "max_new_tokens": 24}
    )
    for i, prompt in enumerate(prompts):
        logits, tokens = paged_greedy(model, prompt, 24, block_size=8, seed=i)
        np.testing.assert_allclose(logits, ref[f"last_logits_{i}"], atol=2e-4, rtol=0)
        assert tokens == ref[f"tokens_{i}"].tolist(), f"prompt {i}"
