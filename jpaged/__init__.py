"""jpaged: PagedAttention LLM inference and serving in JAX.

Public names are imported lazily so that `import jpaged.scheduler` (pure Python) does
not pull in jax.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "jpaged.llm",
    "generate": "jpaged.llm",
    "LLMEngine": "jpaged.engine",
    "EngineConfig": "jpaged.config",
    "SamplingParams": "jpaged.sampling_params",
    "BeamSearchParams": "jpaged.beam_search",
    "BeamSearchOutput": "jpaged.beam_search",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
    "Logprob": "jpaged.outputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jpaged' has no attribute {name!r}")
