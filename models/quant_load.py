"""Quantized checkpoints: the `quantization_config` of config.json, AWQ / GPTQ tensors -> layouts.

Checkpoint layouts read here (Hugging Face names `model.layers.{i}.{module}.{part}`):

- AWQ (AutoAWQ GEMM, `version: gemm`): qweight [K, N/8] int32 packed along output columns,
  nibble i of packed column c holding column 8c + AWQ_ORDER[i]; qzeros [G, N/8] int32, same
  packing; scales [G, N] f16; w = (q - z) * s, groups of consecutive input rows.
- GPTQ (AutoGPTQ / exllama, `checkpoint_format: gptq`): qweight [K/8, N] int32 packed along
  input rows (nibble i of packed row r = row 8r + i); qzeros [G, N/8] int32 packed along
  output columns in order, stored as z - 1 (the v1 offset; `gptq_v2` stores z); scales
  [G, N] f16; g_idx [K] int32, the group of each input row (permuted under desc_act).

Both become the 4-bit device layout of `models/quant.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.quant import (
    LINEAR_NAMES,
    PACK,
    int4_from_unpacked,
    int8_from_float,
    unpack_int4_cols,
    unpack_int4_rows,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ packed column holds column AWQ_ORDER[i]
METHODS = ("int8", "awq", "gptq")

# HF module path -> jpaged linear name
MODULES = {
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up",
    "mlp.down_proj": "w_down",
}
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclasses.dataclass(frozen=True, slots=True)
class QuantSpec:
    """How a model's linears are quantized: int8 (at load time), or a 4-bit checkpoint's format."""

    method: str  # int8 | awq | gptq
    bits: int = 8
    group_size: int = -1  # rows per group; -1: one group (int8: per output channel)
    desc_act: bool = False  # GPTQ act-order: g_idx permutes rows
    zero_offset: int = 0  # added to stored zeros (GPTQ v1 stores z - 1)

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> QuantSpec:
        """From a config.json `quantization_config`; ValueError naming the unsupported field."""
        method = str(qc.get("quant_method", "")).lower()
        if method not in ("awq", "gptq"):
            raise ValueError(f"quantization_config.quant_method {method!r} is not supported "
                             "(awq, gptq)")  # fmt: skip
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ValueError(f"quantization_config.bits must be 4, got {bits!r}")
        group_size = int(qc.get("group_size", qc.get("q_group_size", -1)))
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(
                    f"quantization_config.version {version!r}: only AWQ gemm is supported"
                )
            if not qc.get("zero_point", True):
                raise ValueError("quantization_config.zero_point false is not supported for AWQ")
            return cls("awq", 4, group_size)
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported")
        return cls(
            "gptq", 4, group_size, bool(qc.get("desc_act", False)), 1 if fmt == "gptq" else 0
        )


def resolve_quantization(requested: str | None, model_dir: Path | str) -> QuantSpec | None:
    """The QuantSpec for a model: from its config.json, checked against what the user asked.

    requested None -> whatever the checkpoint declares (None for a float checkpoint).
    Raises ValueError when they disagree (awq asked of a GPTQ checkpoint, int8 of a 4-bit one).
    """
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS}, got {requested!r}")
    hf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    qc = hf.get("quantization_config")
    found = QuantSpec.from_hf(qc) if qc else None
    if requested is None:
        return found
    if requested == "int8":
        if found is not None:
            raise ValueError(f"quantization int8 needs a float checkpoint; {model_dir} is "
                             f"already quantized with {found.method}")  # fmt: skip
        return QuantSpec("int8")
    if found is None or found.method != requested:
        have = found.method if found else "no quantization_config"
        raise ValueError(f"quantization {requested} does not match the checkpoint ({have})")
    return found


def int8_layers(stacked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace each float linear [L, K, N] of stacked layer weights by its int8 parts."""
    out = {n: a for n, a in stacked.items() if n not in LINEAR_NAMES}
    for name in LINEAR_NAMES:
        for part, array in int8_from_float(stacked[name]).items():
            out[f"{name}.{part}"] = array
    return out


class QuantizedTensors:
    """Collects a 4-bit checkpoint's per-layer linear tensors, then stacks their device layouts."""

    def __init__(self, spec: QuantSpec, shapes: dict[str, tuple[int, ...]], num_layers: int):
        self.spec = spec
        self.shapes = shapes  # linear name -> (K, N)
        self.num_layers = num_layers
        self.raw: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def take(self, layer: int, suffix: str, array: np.ndarray) -> bool:
        """Keep `model.layers.{layer}.{suffix}` if it is a quantized linear's part."""
        module, _, part = suffix.rpartition(".")
        if module not in MODULES or part not in _PARTS:
            return False
        self.raw.setdefault((MODULES[module], layer), {})[part] = array
        return True

    def _layout(self, name: str, layer: int) -> dict[str, np.ndarray]:
        k, n = self.shapes[name]
        where = f"model.layers.{layer}.{next(m for m, v in MODULES.items() if v == name)}"
        t = self.raw.get((name, layer), {})
        missing = [p for p in ("qweight", "qzeros", "scales") if p not in t]
        if missing:
            raise ValueError(f"checkpoint is missing {where}.{missing[0]}")
        gs = self.spec.group_size if self.spec.group_size > 0 else k
        if k % gs or gs % PACK:
            raise ValueError(
                f"{where}: group_size {gs} must divide in_features {k} and be a multiple of 8"
            )
        g = k // gs
        expect = {"scales": (g, n), "qzeros": (g, n // PACK)}
        expect["qweight"] = (k, n // PACK) if self.spec.method == "awq" else (k // PACK, n)
        for part, shape in expect.items():
            if tuple(t[part].shape) != shape:
                raise ValueError(
                    f"{where}.{part} has shape {tuple(t[part].shape)}, expected {shape}"
                )
        if self.spec.method == "awq":
            q = unpack_int4_cols(t["qweight"], AWQ_ORDER)  # [K, N]
            zeros = unpack_int4_cols(t["qzeros"], AWQ_ORDER)
            g_idx = np.arange(k) // gs
        else:
            q = unpack_int4_rows(t["qweight"])
            zeros = unpack_int4_cols(t["qzeros"]) + np.uint8(self.spec.zero_offset)
            g_idx = np.asarray(t["g_idx"]) if "g_idx" in t else np.arange(k) // gs
            if g_idx.shape != (k,):
                raise ValueError(f"{where}.g_idx has shape {g_idx.shape}, expected ({k},)")
        return int4_from_unpacked(q, zeros, t["scales"], g_idx)

    def stacked(self) -> dict[str, np.ndarray]:
        """`{name}.{qweight,scales,zeros[,perm]}` arrays with a leading layer axis."""
        out: dict[str, np.ndarray] = {}
        for name in self.shapes:
            layouts = [self._layout(name, i) for i in range(self.num_layers)]
            if any("perm" in lay for lay in layouts):  # one pytree structure for the scan
                for lay in layouts:
                    lay.setdefault("perm", np.arange(self.shapes[name][0], dtype=np.int32))
            for part in layouts[0]:
                out[f"{name}.{part}"] = np.stack([lay[part] for lay in layouts])
        return out
