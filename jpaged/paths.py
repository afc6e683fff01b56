"""Where jpaged keeps its on-disk caches: converted weights and the XLA compile cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root cache: `$JPAGED_CACHE_DIR`, else `$XDG_CACHE_HOME/jpaged`, else `~/.cache/jpaged`.

    Created on demand.
    """
    explicit = os.environ.get("JPAGED_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "jpaged"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_cache_dir() -> Path:
    """`cache_dir()/models`: one converted Hugging Face directory per imported GGUF file."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def xla_cache_dir() -> Path:
    """`cache_dir()/xla`: JAX's persistent compilation cache."""
    path = cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    return path


def kernels_cache_dir() -> Path:
    """`cache_dir()/kernels`: C++ kernels compiled on first use for this machine (the ones
    `python -m pallas_kernels.prebuild` put in the environment are found before these)."""
    path = cache_dir() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path
