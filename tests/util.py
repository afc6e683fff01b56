"""Shared test helpers: the reference subprocess and tiny random-weight HF directories."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from models.config import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent


def ref_python() -> str:
    """The .venv-ref interpreter (torch + transformers), or skip the test."""
    path = os.environ.get("JPAGED_REF_PYTHON") or str(ROOT / ".venv-ref" / "bin" / "python")
    if not Path(path).exists():
        pytest.skip(f"reference environment missing ({path}); run `make ref`")
    return path


def run_ref_model(tmp_path: Path, request: dict) -> dict[str, np.ndarray]:
    """Run tests/ref/ref_model.py on `request`; returns its npz arrays."""
    req_file, out_file = tmp_path / "ref_request.json", tmp_path / "ref_out.npz"
    req_file.write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX", "XLA"))}
    env["OMP_NUM_THREADS"] = "2"
    subprocess.run(
        [ref_python(), str(ROOT / "tests" / "ref" / "ref_model.py"), str(req_file), str(out_file)],
        check=True,
        env=env,
        timeout=600,
    )
    with np.load(out_file) as data:
        return dict(data)


def random_llama_tensors(config: LlamaConfig, seed: int) -> dict[str, np.ndarray]:
    """HF-named random weights ([out, in] linears), scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    c = config
    d, e, f = c.hidden_size, c.head_dim, c.intermediate_size

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((c.vocab_size, d)).astype(np.float32)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(c.num_attention_heads * e, d)
        t[p + "self_attn.k_proj.weight"] = w(c.num_key_value_heads * e, d)
        t[p + "self_attn.v_proj.weight"] = w(c.num_key_value_heads * e, d)
        t[p + "self_attn.o_proj.weight"] = w(d, c.num_attention_heads * e)
        t[p + "mlp.gate_proj.weight"] = w(f, d)
        t[p + "mlp.up_proj.weight"] = w(f, d)
        t[p + "mlp.down_proj.weight"] = w(d, f)
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(
            np.float32
        )
    t["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = w(c.vocab_size, d)
    return t


def save_tiny_hf_dir(path: Path, config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Write config.json + model.safetensors for a random-weight model; returns the tensors."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = random_llama_tensors(config, seed)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=1))
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def tiny_random_llama(vocab_size: int = 49152, eos_token_id: int = 2, seed: int = 3):  # noqa: ANN201
    """The engine tests' tiny random model (f32; SmolLM2's vocabulary size by default, so
    outputs detokenize)."""
    import jax.numpy as jnp

    from models.config import tiny_llama_config
    from models.llama import llama_from_hf_tensors

    config = tiny_llama_config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                               eos_token_id=eos_token_id)  # fmt: skip
    return llama_from_hf_tensors(config, random_llama_tensors(config, seed).items(), jnp.float32)
