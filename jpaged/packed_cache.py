"""The packed-weights cache: a model's params as the `cpu` linear kernels take them, saved once.

Packing a checkpoint for the `cpu` linears reads every tensor, casts it, transposes it and
re-tiles it into panels (models.llama.llama_from_hf_tensors, then
models.packed_linears.pack_linear_params): on the default model that was about half of a
warm start. The first single-device start saves the packed params in
`cache_dir()/packed/<key>`, one raw file per array and a manifest; later starts map the
files and copy them to the device, with no model built. The key covers the model directory,
its weight files' sizes and mtimes, the dtype, the f32 layout (`f32_on_amx`) and the source
of the packing code, so a change to any of them writes a new entry. $JPAGED_PACKED_CACHE=0
turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpaged.paths import cache_dir
from jpaged.weights import weights_key
from pallas_kernels.linear_cpu import f32_on_amx

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_ROOT = Path(__file__).resolve().parent.parent
# the code whose output the entries hold: a change to it is a change of key
_PACKING_SOURCES = (
    "models/packed_linears.py",
    "pallas_kernels/linear_cpu.py",
    "models/llama.py",
    "models/forward.py",
)
_MANIFEST = "manifest.json"


def enabled() -> bool:
    """Off when $JPAGED_PACKED_CACHE is 0 (saves the disk a copy of the weights per dtype)."""
    return os.environ.get("JPAGED_PACKED_CACHE", "1") != "0"


def entry_dir(model_dir: Path | str, dtype: Any) -> Path:
    """Where the packed params of `model_dir` in `dtype` live (the entry may not exist yet)."""
    code = [hashlib.sha256((_ROOT / rel).read_bytes()).hexdigest() for rel in _PACKING_SOURCES]
    layout = "split" if jnp.dtype(dtype) == jnp.float32 and f32_on_amx() else "plain"
    key = weights_key(model_dir, str(jnp.dtype(dtype)), f"v{CACHE_VERSION}", layout, *code)
    return cache_dir() / "packed" / f"{Path(model_dir).name}-{jnp.dtype(dtype)}-{key}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if "/" in name:
            raise ValueError(f"params key {name!r} holds a '/'")
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def save(params: dict, path: Path) -> None:
    """Write `params` (nested dicts of arrays) to `path`, atomically: a reader sees the whole
    entry or none. An entry already there is kept."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        manifest = {}
        for i, (name, leaf) in enumerate(_flatten(params).items()):
            array = np.ascontiguousarray(np.asarray(leaf))
            array.tofile(tmp / f"{i}.bin")
            manifest[name] = {
                "file": f"{i}.bin",
                "dtype": str(array.dtype),
                "shape": list(array.shape),
            }
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():  # another process may have won the race: that entry is as good
            raise


_saving: list[threading.Thread] = []


def save_in_background(params: dict, path: Path) -> None:
    """`save` from a thread, so a cold start's first token does not wait for the writes (on
    the benchmark VM, ~0.6 GB of new page-cache pages at ~0.13 GB/s: 4.6 s of a cold start).
    A non-daemon thread: the interpreter finishes it before it exits. An OSError is logged;
    the next start packs again."""

    def run() -> None:
        try:
            save(params, path)
        except OSError as exc:  # a read-only or full disk costs the next start, not this one
            logger.warning("could not save the packed weights cache %s: %s", path, exc)

    thread = threading.Thread(target=run, name="jpaged-packed-cache-save")
    _saving.append(thread)
    thread.start()


def wait_for_saves() -> None:
    """Wait for every `save_in_background` of this process to end."""
    while _saving:
        _saving.pop().join()


def load(path: Path) -> dict | None:
    """The params saved at `path` as device arrays, or None when there is no entry. Raises
    ValueError for a damaged entry (a file missing or of the wrong size)."""
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    params: dict = {}
    for name, meta in manifest.items():
        dtype = jnp.dtype(meta["dtype"])
        shape = tuple(meta["shape"])
        file = path / meta["file"]
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not file.is_file() or file.stat().st_size != want:
            raise ValueError(
                f"packed cache {path}: {meta['file']} ({name}) is missing or truncated"
            )
        host = (
            np.memmap(file, dtype=dtype, mode="r", shape=shape) if want else np.zeros(shape, dtype)
        )
        node = params
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        # one copy into memory of the device's own (device_put would alias the mapped file:
        # weights in page cache, evictable, in 4 KiB pages)
        node[leaf] = jnp.asarray(host)
    return params


def load_or_none(path: Path) -> dict | None:
    """`load`, with a damaged entry logged, removed and reported as None (then rebuilt)."""
    try:
        return load(path)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        logger.warning("packed weights cache %s unreadable (%s); packing the checkpoint", path, exc)
        shutil.rmtree(path, ignore_errors=True)
        return None
