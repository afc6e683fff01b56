"""Shared pytest fixtures. Keep each one small and documented; add new ones at the end.

- `default_model_dir` (session): the converted default model (SmolLM2-135M-Instruct) as an HF
  directory. It goes through the normal cache (`$JPAGED_CACHE_DIR`, else `~/.cache/jpaged`), so the
  GGUF is converted at most once per machine (~5 s), not once per test run.
- `ref_python` (session): the reference interpreter (torch + transformers) for scripts in
  `tests/ref/`: `$JPAGED_REF_PYTHON`, else `.venv-ref/bin/python`; tests using it are skipped,
  with the reason, when it does not exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from jpaged.weights import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def ref_python() -> Path:
    explicit = os.environ.get("JPAGED_REF_PYTHON")
    path = Path(explicit) if explicit else REPO_ROOT / ".venv-ref" / "bin" / "python"
    if not path.exists():
        pytest.skip(f"reference python {path} not found (run `make ref` or set JPAGED_REF_PYTHON)")
    if not explicit and not (REPO_ROOT / ".venv-ref" / ".done").exists():
        pytest.skip("reference env .venv-ref is still being built (no .venv-ref/.done)")
    return path
