"""`python -m jpaged.quantize`: write AWQ-format or GPTQ-format 4-bit directories from a float model.

    python -m jpaged.quantize --method awq --out /tmp/smollm2-awq            # the default model
    python -m jpaged.quantize --method gptq --model DIR --out DIR [--group-size 64] [--no-act-order]

Round-to-nearest per group, no calibration: AWQ is asymmetric (zero point per group, as
AutoAWQ with zero_point), GPTQ symmetric (zero 8, as AutoGPTQ's default sym). GPTQ's
act-order (desc_act) orders input rows by decreasing weight-row norm, a stand-in for the
Hessian diagonal that calibration would give; g_idx records the resulting groups. The
embedding, norms and lm_head are copied unquantized. Layouts: see models/quant_load.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jpaged.weights import iter_safetensors, load_config, resolve_model
from models.quant import pack_int4_cols, pack_int4_rows
from models.quant_load import AWQ_ORDER, MODULES

GROUP_SIZES = (128, 64, 32)


@dataclasses.dataclass
class RTNWeight:
    """One linear quantized to 4 bits: rows in checkpoint order ([K, N] = [in, out])."""

    q: np.ndarray  # [K, N] uint8 in 0..15
    zeros: np.ndarray  # [G, N] uint8 (the real zero point)
    scales: np.ndarray  # [G, N] float16
    g_idx: np.ndarray  # [K] int32 group of each row


def rtn_quantize(
    w: np.ndarray, group_size: int, *, sym: bool, act_order: bool = False
) -> RTNWeight:
    """Round-to-nearest 4-bit quantization of w [K, N] in groups of `group_size` input rows.

    act_order: groups are formed over rows sorted by decreasing norm (GPTQ desc_act).
    Raises ValueError when group_size does not divide K.
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {k}")
    order = np.argsort(-np.linalg.norm(w, axis=1), kind="stable") if act_order else np.arange(k)
    g_idx = np.empty(k, np.int32)
    g_idx[order] = np.arange(k) // group_size
    grouped = w[order].reshape(k // group_size, group_size, n)  # [G, gs, N]
    if sym:
        amax = np.max(np.abs(grouped), axis=1)
        scales = np.where(amax > 0, 2 * amax / 15, 1.0).astype(np.float16)
        zeros = np.full(scales.shape, 8, np.uint8)
    else:
        wmax, wmin = np.max(grouped, axis=1), np.min(grouped, axis=1)
        scales = np.maximum((wmax - wmin) / 15, 1e-5).astype(np.float16)
        zeros = np.clip(np.rint(-wmin / scales.astype(np.float32)), 0, 15).astype(np.uint8)
    s = scales.astype(np.float32)[g_idx]  # [K, N]
    q = np.clip(np.rint(w / s) + zeros[g_idx], 0, 15).astype(np.uint8)
    return RTNWeight(q=q, zeros=zeros, scales=scales, g_idx=g_idx)


def rtn_dequantize(r: RTNWeight) -> np.ndarray:
    """The quantizer's own dequantization: (q - zero) * scale per row's group, f32 [K, N]."""
    zeros = r.zeros.astype(np.float32)[r.g_idx]
    return (r.q.astype(np.float32) - zeros) * r.scales.astype(np.float32)[r.g_idx]


def awq_tensors(r: RTNWeight) -> dict[str, np.ndarray]:
    """AutoAWQ GEMM tensors: qweight [K, N/8], qzeros [G, N/8] (AWQ order), scales [G, N]."""
    return {
        "qweight": pack_int4_cols(r.q, AWQ_ORDER),
        "qzeros": pack_int4_cols(r.zeros, AWQ_ORDER),
        "scales": r.scales,
    }


def gptq_tensors(r: RTNWeight) -> dict[str, np.ndarray]:
    """AutoGPTQ tensors: qweight [K/8, N], qzeros [G, N/8] stored as z - 1, scales, g_idx."""
    if np.any(r.zeros == 0):
        raise ValueError("GPTQ v1 stores zero - 1; a zero point of 0 cannot be written")
    return {
        "qweight": pack_int4_rows(r.q),
        "qzeros": pack_int4_cols(r.zeros - 1),
        "scales": r.scales,
        "g_idx": r.g_idx,
    }


def pick_group_size(requested: int | None, in_features: list[int]) -> int:
    """`requested`, or the largest of 128/64/32 dividing every linear's in_features."""
    if requested is not None:
        bad = [k for k in in_features if k % requested]
        if requested % 8 or bad:
            raise ValueError(f"--group-size {requested} must be a multiple of 8 dividing "
                             f"every in_features (not {bad[:1]})")  # fmt: skip
        return requested
    for g in GROUP_SIZES:
        if all(k % g == 0 for k in in_features):
            return g
    raise ValueError(
        f"no group size in {GROUP_SIZES} divides in_features {sorted(set(in_features))}"
    )


def quantization_config(method: str, group_size: int, act_order: bool) -> dict:
    """The `quantization_config` entry of config.json, as AutoAWQ / AutoGPTQ write it."""
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size,
            "desc_act": act_order, "sym": True, "static_groups": False, "true_sequential": True,
            "damp_percent": 0.01, "lm_head": False, "checkpoint_format": "gptq"}  # fmt: skip


def quantize_model_dir(
    model: str | None,
    out_dir: Path | str,
    method: str,
    *,
    group_size: int | None = None,
    act_order: bool = True,
) -> Path:
    """Write `out_dir`: config.json with quantization_config, model.safetensors, tokenizer files.

    model: an HF directory, .gguf file or hub id (None: the embedded default). act_order
    applies to GPTQ only. Raises ValueError for an unknown method or a bad group size.
    """
    if method not in ("awq", "gptq"):
        raise ValueError(f"method must be awq or gptq, got {method!r}")
    src = resolve_model(model)
    config = load_config(src)
    c = config
    in_features = [c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size]
    gs = pick_group_size(group_size, in_features)
    act_order = act_order and method == "gptq"
    out: dict[str, np.ndarray] = {}
    for name, array in iter_safetensors(src):
        module, _, part = name.rpartition(".")
        layer_module = module.split(".", 3)[-1] if name.startswith("model.layers.") else ""
        if layer_module in MODULES and part == "weight":
            w = np.asarray(array, np.float32).T  # [K, N]
            r = rtn_quantize(w, gs, sym=method == "gptq", act_order=act_order)
            tensors = awq_tensors(r) if method == "awq" else gptq_tensors(r)
            out.update({f"{module}.{p}": np.ascontiguousarray(t) for p, t in tensors.items()})
        else:
            out[name] = np.ascontiguousarray(array)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    hf["quantization_config"] = quantization_config(method, gs, act_order)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():  # tokenizer, generation config, chat template
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model.safetensors"):
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jpaged.quantize", description=__doc__.split("\n")[0]
    )
    p.add_argument("--method", required=True, choices=["awq", "gptq"])
    p.add_argument("--model", default=None, help="HF directory, .gguf or hub id (default: SmolLM2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--group-size", type=int, default=None,
                   help="input rows per group (default: largest of 128/64/32 that divides)")  # fmt: skip
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ desc_act: permuted groups recorded in g_idx")  # fmt: skip
    args = p.parse_args(argv)
    try:
        out = quantize_model_dir(
            args.model, args.out, args.method, group_size=args.group_size, act_order=args.act_order
        )
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {args.method} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
