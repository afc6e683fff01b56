"""models/quant.py + models/quant_load.py: packing, checkpoint layouts, quantized linear == dequantize @."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.quantize import awq_tensors, gptq_tensors, rtn_dequantize, rtn_quantize
from models.quant import (
    dequantize,
    int8_from_float,
    linear,
    pack_int4_cols,
    pack_int4_rows,
    unpack_int4_cols,
    unpack_int4_rows,
)
from models.quant_load import AWQ_ORDER, QuantizedTensors, QuantSpec, resolve_quantization


def test_pack_rows_matches_gptq_bit_layout():
    q = np.arange(16 * 3).reshape(16, 3) % 16
    packed = pack_int4_rows(q)
    assert packed.shape == (2, 3) and packed.dtype == np.int32
    # nibble i of packed row r is row 8r + i: value = sum q[8r+i] << 4i
    want = sum(q[i::8].astype(np.int64) << (4 * i) for i in range(8))
    np.testing.assert_array_equal(packed.view(np.uint32), want.astype(np.uint32))
    np.testing.assert_array_equal(unpack_int4_rows(packed), q)


def test_pack_cols_awq_order():
    q = np.tile(np.arange(8), (2, 2))  # [2, 16]: column c holds c % 8
    packed = pack_int4_cols(q, AWQ_ORDER)
    assert packed.shape == (2, 2)
    # nibble i holds column AWQ_ORDER[i] -> value AWQ_ORDER[i]
    want = sum(v << (4 * i) for i, v in enumerate(AWQ_ORDER))
    assert packed.view(np.uint32)[0, 0] == want == 0x75316420
    np.testing.assert_array_equal(unpack_int4_cols(packed, AWQ_ORDER), q)


def _checkpoint_parts(method, w, gs, act_order):
    r = rtn_quantize(w, gs, sym=method == "gptq", act_order=act_order)
    raw = awq_tensors(r) if method == "awq" else gptq_tensors(r)
    spec = QuantSpec(method, 4, gs, act_order, 1 if method == "gptq" else 0)
    k, n = w.shape
    col = QuantizedTensors(spec, {"wq": (k, n)}, 1)
    for part, t in raw.items():
        assert col.take(0, f"self_attn.q_proj.{part}", t)
    stacked = col.stacked()
    parts = {key.split(".", 1)[1]: jnp.asarray(v[0]) for key, v in stacked.items()}
    return r, parts


CASES = [
    ("awq", 32, False),
    ("awq", 64, False),
    ("awq", 128, False),
    ("gptq", 32, False),
    ("gptq", 64, True),
    ("gptq", 128, True),
]


@pytest.mark.parametrize(("method", "gs", "act_order"), CASES)
def test_loaded_dequant_equals_quantizer_and_linear_matches(method, gs, act_order):
    rng = np.random.default_rng(gs)
    k, n = 256, 96
    w = rng.standard_normal((k, n)).astype(np.float32)
    r, parts = _checkpoint_parts(method, w, gs, act_order)
    assert ("perm" in parts) == act_order
    want = rtn_dequantize(r)
    np.testing.assert_array_equal(np.asarray(dequantize(parts)), want)
    assert np.max(np.abs(want - w)) < 0.6  # 4-bit RTN of N(0, 1) values stays within a step
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = linear(jnp.asarray(x), {f"wq.{p}": v for p, v in parts.items()}, "wq")
    np.testing.assert_allclose(np.asarray(got), x @ want, rtol=2e-5, atol=2e-4)


def test_int8_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 64, 48)).astype(np.float32)  # stacked [L, K, N]
    p = int8_from_float(w)
    assert p["q8"].dtype == np.int8 and p["scale"].shape == (2, 48)
    assert np.abs(p["q8"]).max(axis=1).min() == 127  # every channel uses the full range
    deq = p["q8"].astype(np.float32) * p["scale"][:, None, :]
    assert np.max(np.abs(deq - w) / p["scale"][:, None, :]) <= 0.5 + 1e-6
    x = rng.standard_normal((3, 64)).astype(np.float32)
    parts = {"wq.q8": jnp.asarray(p["q8"][0]), "wq.scale": jnp.asarray(p["scale"][0])}
    np.testing.assert_allclose(
        np.asarray(linear(jnp.asarray(x), parts, "wq")), x @ deq[0], rtol=1e-5, atol=1e-4
    )


def test_act_order_groups_follow_g_idx():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    r = rtn_quantize(w, 16, sym=True, act_order=True)
    assert np.bincount(r.g_idx).tolist() == [16] * 4
    assert not np.array_equal(r.g_idx, np.arange(64) // 16)  # really permuted
    norms = np.linalg.norm(w, axis=1)
    assert norms[r.g_idx == 0].min() >= norms[r.g_idx == 3].max()  # biggest rows first


def test_loader_errors_name_the_tensor():
    spec = QuantSpec("awq", 4, 32)
    col = QuantizedTensors(spec, {"wq": (64, 16)}, 1)
    col.take(0, "self_attn.q_proj.qweight", np.zeros((64, 2), np.int32))
    col.take(0, "self_attn.q_proj.scales", np.zeros((2, 16), np.float16))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.qzeros"):
        col.stacked()
    col.take(0, "self_attn.q_proj.qzeros", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"q_proj.qzeros has shape \(2, 3\), expected \(2, 2\)"):
        col.stacked()


@pytest.mark.parametrize(
    ("qc", "words"),
    [
        ({"quant_method": "fp8"}, "quant_method 'fp8'"),
        ({"quant_method": "awq", "bits": 8}, "bits must be 4"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ],
)
def test_bad_quantization_config(qc, words):
    with pytest.raises(ValueError, match=words):
        QuantSpec.from_hf(qc)


def test_resolve_quantization(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_quantization(None, tmp_path) is None
    assert resolve_quantization("int8", tmp_path) == QuantSpec("int8")
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        resolve_quantization("awq", tmp_path)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    assert resolve_quantization(None, tmp_path) == QuantSpec("gptq", 4, 64, True, 1)
    assert resolve_quantization("gptq", tmp_path).desc_act
    with pytest.raises(ValueError, match="int8 needs a float checkpoint"):
        resolve_quantization("int8", tmp_path)
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("fp4", tmp_path)
