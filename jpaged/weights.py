"""Find a model (default GGUF, .gguf file, local HF directory or hub id) and read its weights.

`resolve_model` turns what the user typed into a local Hugging Face directory, converting GGUF
files once into `cache_dir()/models`; `load_config` and `iter_safetensors` read that directory.
Tensors come out as numpy arrays one at a time (bf16 as `ml_dtypes.bfloat16`), so a loader can
place each on device before the next one is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jpaged.gguf_import import convert_gguf, default_gguf_path
from jpaged.paths import models_cache_dir
from jpaged.tokenizer import Tokenizer
from models.config import LlamaConfig

logger = logging.getLogger(__name__)

# Bump when convert_gguf's output changes, so old conversions are not reused.
CONVERTER_VERSION = 1

HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# safetensors dtype tag -> little-endian numpy dtype
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _gguf_cache_key(gguf_path: Path) -> str:
    """`<stem>-<10 hex>`: changes when the file (path, size, mtime) or the converter changes."""
    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    return f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def _converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached HF directory of a GGUF file, converting it on first use."""
    out_dir = models_cache_dir() / _gguf_cache_key(gguf_path)
    if (out_dir / "config.json").is_file():
        return out_dir
    logger.info("converting %s into %s (first use)", gguf_path, out_dir)
    start = time.perf_counter()
    convert_gguf(gguf_path, out_dir)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return out_dir


def _snapshot(model: str) -> Path:
    """A hub id's local snapshot: the HF cache first, then a download."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(model, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True)
    except Exception as cached_error:  # any failure here means "not cached"
        try:
            path = snapshot_download(model, allow_patterns=HUB_ALLOW_PATTERNS)
        except Exception as download_error:
            raise OSError(
                f"cannot resolve model {model!r}: it is not a local directory or .gguf file, "
                f"not in the Hugging Face cache ({type(cached_error).__name__}), and could not be "
                f"downloaded ({type(download_error).__name__}: {download_error})"
            ) from download_error
    return Path(path)


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The local HF directory (config.json, safetensors, tokenizer) for `model`.

    None -> the default SmolLM2-135M-Instruct GGUF, converted once into the cache;
    a `.gguf` file -> likewise converted; a directory with config.json -> itself;
    anything else -> a Hugging Face hub id (cache, then download).
    Raises FileNotFoundError / ValueError / OSError naming `model` when none of these works.
    """
    if model is None:
        return _converted_gguf_dir(default_gguf_path())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {str(model)!r} does not exist")
        return _converted_gguf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(model)!r} has no config.json")
        return path
    snapshot = _snapshot(str(model))
    if not (snapshot / "config.json").is_file():
        raise ValueError(f"hub model {str(model)!r} has no config.json")
    return snapshot


def load_config(model_dir: Path | str) -> LlamaConfig:
    """The LlamaConfig of an HF directory; ValueError for a non-Llama-family model."""
    path = Path(model_dir) / "config.json"
    hf: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or not set(architectures) <= set(
        SUPPORTED_ARCHITECTURES
    ):
        raise ValueError(
            f"{path}: architectures {architectures} / model_type {model_type!r} is not supported; "
            f"expected one of {SUPPORTED_ARCHITECTURES}"
        )
    window = hf.get("sliding_window")
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise ValueError(f"{path}: sliding_window {window} is not supported")
    return LlamaConfig.from_hf_dict(hf)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _iter_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    header, data_start = _read_header(path)
    # read in file order so the disk is read sequentially
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, entry in entries:
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if (end - begin) != count * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} byte range does not match its shape")
            array = np.empty(shape, dtype=dtype)
            f.seek(data_start + begin)
            if f.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
                raise ValueError(f"{path}: file ends inside tensor {name}")
            yield name, array


def safetensors_files(model_dir: Path | str) -> list[Path]:
    """The safetensors files of a model: the index's shards, `model.safetensors`, or all `*.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    return files


def weights_key(model_dir: Path | str, *parts: str) -> str:
    """A 16-hex-digit key of a model directory's weights as they are on disk (its resolved path,
    each weight file's name, size and mtime) and `parts`: for caches derived from them."""
    lines = [str(Path(model_dir).resolve()), *parts]
    for f in safetensors_files(model_dir):
        stat = f.stat()
        lines.append(f"{f.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def iter_safetensors(model_dir: Path | str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a model, one at a time, in file order.

    Arrays are writable numpy arrays in the stored dtype (bf16 as ml_dtypes.bfloat16).
    With an index, raises ValueError if a tensor it lists is not found in its shard.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    expected = set(json.loads(index.read_text())["weight_map"]) if index.is_file() else None
    seen: set[str] = set()
    for path in safetensors_files(model_dir):
        for name, array in _iter_file(path):
            seen.add(name)
            yield name, array
    if expected is not None and expected - seen:
        missing = sorted(expected - seen)
        raise ValueError(f"{index}: tensors {missing[:5]} listed in the index were not found")


def load_state_dict(model_dir: Path | str) -> dict[str, np.ndarray]:
    """All tensors of a model in memory: `dict(iter_safetensors(model_dir))`."""
    return dict(iter_safetensors(model_dir))


@dataclasses.dataclass
class LoadedModel:
    """A resolved model: its config, its local directory and its tokenizer (weights read later)."""

    config: LlamaConfig
    model_dir: Path
    tokenizer: Tokenizer


def load_model(model: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Resolve `model` (see `resolve_model`) and load its config; the tokenizer loads on a
    thread meanwhile (its first use waits for it)."""
    model_dir = resolve_model(model)
    tokenizer = Tokenizer.from_dir(model_dir, background=True)
    return LoadedModel(config=load_config(model_dir), model_dir=model_dir, tokenizer=tokenizer)
