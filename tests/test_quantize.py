"""jpaged/quantize.py: the written AWQ / GPTQ directories load, dequantize exactly, and run.

A tiny random-weight model is quantized by the CLI, loaded through `resolve_quantization`
+ `llama_from_hf_tensors`, and compared with (a) the quantizer's own dequantization, tensor
by tensor, bit for bit, and (b) a float model holding those dequantized weights, logits
through the paged KV pool.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.quantize import main, rtn_dequantize, rtn_quantize
from jpaged.weights import iter_safetensors, load_config, load_state_dict
from models.config import tiny_llama_config
from models.llama import _LAYER_WEIGHTS, llama_from_hf_tensors
from models.quant import LINEAR_NAMES, dequantize, parts_of
from models.quant_load import QuantSpec, resolve_quantization
from tests.test_llama import paged_greedy
from tests.util import save_tiny_hf_dir

CONFIG = tiny_llama_config(intermediate_size=384)  # in_features 128 and 384: g128, g64, g32


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-float")
    save_tiny_hf_dir(path, CONFIG, seed=3)
    return path


def _hf_weight(tensors, name, layer):
    return tensors[f"model.layers.{layer}.{_LAYER_WEIGHTS[name][0]}"].T  # [K, N]


def _logits(model, prompt):
    """Logits after the prompt and the greedy next token (one prefill step, one compile)."""
    return paged_greedy(model, prompt, 1, block_size=8)


@pytest.mark.parametrize(
    ("method", "group_size", "act_order", "run_model"),
    [("awq", 128, False, False), ("awq", 32, False, True), ("gptq", 64, True, True),
     ("gptq", 32, False, False)],
)  # fmt: skip
def test_quantized_dir_round_trip(float_dir, tmp_path, method, group_size, act_order, run_model):
    out = tmp_path / method
    flag = "--act-order" if act_order else "--no-act-order"
    assert main(["--method", method, "--model", str(float_dir), "--out", str(out),
                 "--group-size", str(group_size), flag]) == 0  # fmt: skip
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == (method, 4, group_size)
    assert (out / "tokenizer.json").is_file() == (float_dir / "tokenizer.json").is_file()

    # the published layouts, tensor by tensor
    stored = load_state_dict(out)
    k, n = CONFIG.hidden_size, CONFIG.intermediate_size
    p = "model.layers.1.mlp.up_proj."
    assert "model.layers.1.mlp.up_proj.weight" not in stored
    want = {
        "qweight": (k, n // 8),
        "qzeros": (k // group_size, n // 8),
        "scales": (k // group_size, n),
    }
    if method == "gptq":
        want.update(qweight=(k // 8, n), g_idx=(k,))
    assert {part: stored[p + part].shape for part in want} == want
    assert stored[p + "qweight"].dtype == np.int32 and stored[p + "scales"].dtype == np.float16
    if method == "gptq":
        g_idx = stored[p + "g_idx"]
        assert np.array_equal(g_idx, np.arange(k) // group_size) != act_order
        assert np.bincount(g_idx).tolist() == [group_size] * (k // group_size)

    spec = resolve_quantization(None, out)
    assert spec == QuantSpec(method, 4, group_size, act_order, 1 if method == "gptq" else 0)
    model = llama_from_hf_tensors(load_config(out), iter_safetensors(out), jnp.float32, spec)
    layers = {name: v[...] for name, v in model.layers.items()}
    assert all(name not in layers for name in LINEAR_NAMES)
    src = load_state_dict(float_dir)
    deq_tensors = dict(src)
    for name in LINEAR_NAMES:
        parts = parts_of(layers, name)
        assert ("perm" in parts) == act_order
        for layer in range(CONFIG.num_hidden_layers):
            w = _hf_weight(src, name, layer)
            own = rtn_dequantize(
                rtn_quantize(w, group_size, sym=method == "gptq", act_order=act_order)
            )
            loaded = np.asarray(dequantize({part: v[layer] for part, v in parts.items()}))
            np.testing.assert_array_equal(loaded, own, err_msg=f"{name} layer {layer}")
            deq_tensors[f"model.layers.{layer}.{_LAYER_WEIGHTS[name][0]}"] = own.T

    if not run_model:  # the device layout is shared; two runs cover AWQ and GPTQ act-order
        return
    # the quantized model == a float model holding the dequantized weights
    ref = llama_from_hf_tensors(CONFIG, deq_tensors.items(), jnp.float32)
    prompt = np.random.default_rng(0).integers(3, CONFIG.vocab_size, 21).tolist()
    got_logits, got_tokens = _logits(model, prompt)
    want_logits, want_tokens = _logits(ref, prompt)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
    assert got_tokens == want_tokens


def test_int8_model_equals_dequantized_float(float_dir):
    src = load_state_dict(float_dir)
    model = llama_from_hf_tensors(CONFIG, src.items(), jnp.float32, QuantSpec("int8"))
    layers = {name: v[...] for name, v in model.layers.items()}
    deq_tensors = dict(src)
    for name in LINEAR_NAMES:
        parts = parts_of(layers, name)
        assert parts["q8"].dtype == jnp.int8
        for layer in range(CONFIG.num_hidden_layers):
            w = np.asarray(dequantize({p: v[layer] for p, v in parts.items()}))
            deq_tensors[f"model.layers.{layer}.{_LAYER_WEIGHTS[name][0]}"] = w.T
            assert np.max(np.abs(w - _hf_weight(src, name, layer))) > 0  # really quantized
    ref = llama_from_hf_tensors(CONFIG, deq_tensors.items(), jnp.float32)
    prompt = np.random.default_rng(1).integers(3, CONFIG.vocab_size, 13).tolist()
    got_logits, got_tokens = _logits(model, prompt)
    want_logits, want_tokens = _logits(ref, prompt)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
    assert got_tokens == want_tokens


def test_cli_errors(float_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "--method",
                "awq",
                "--model",
                str(float_dir),
                "--out",
                str(tmp_path),
                "--group-size",
                "48",
            ]
        )
    assert exc.value.code == 2
    assert (
        "--group-size 48 must be a multiple of 8 dividing every in_features"
        in capsys.readouterr().err
    )


def test_missing_quantized_tensor_is_named(float_dir, tmp_path):
    out = tmp_path / "awq"
    main(["--method", "awq", "--model", str(float_dir), "--out", str(out)])
    tensors = load_state_dict(out)
    del tensors["model.layers.1.self_attn.o_proj.scales"]
    spec = resolve_quantization("awq", out)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.scales"):
        llama_from_hf_tensors(CONFIG, tensors.items(), jnp.float32, spec)
