"""Engine options (vLLM's names), validated once at the edge."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip


@dataclasses.dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs besides the model weights.

    `num_blocks` or `kv_cache_memory` (bytes) size the KV pool on CPU; on an accelerator
    the pool takes `gpu_memory_utilization` of device memory less weights and activations.
    """

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on accelerators
    kv_cache_dtype: str = "auto"  # auto: same as dtype
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: max(2048, ...) see resolve()
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | xla | pallas
    seed: int = 0
    warmup: str = "none"  # none | decode | all: step shapes compiled at start (the server: decode)
    enable_compile_cache: bool = True
    tensor_parallel_size: int = 1  # devices one model replica is sharded over
    mesh: Any = None  # {"dp": D, "tp": T} or "dp=D,tp=T" (jpaged.mesh); None: dp=1

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{field} {msg}, got {getattr(self, field)!r}")

        check(
            self.dtype == "auto" or self.dtype in _DTYPES,
            "dtype",
            "must be auto, float32, bfloat16 or float16",
        )
        check(self.kv_cache_dtype == "auto" or self.kv_cache_dtype in _DTYPES, "kv_cache_dtype",
              "must be auto, float32, bfloat16 or float16")  # fmt: skip
        check(
            self.block_size in (8, 16, 32, 64, 128, 256),
            "block_size",
            "must be a power of two in 8..256",
        )
        check(self.num_blocks is None or self.num_blocks >= 2, "num_blocks", "must be >= 2")
        check(
            self.kv_cache_memory is None or self.kv_cache_memory > 0,
            "kv_cache_memory",
            "must be > 0",
        )
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(
            self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2"
        )
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 8,
              "max_num_batched_tokens", "must be >= 8")  # fmt: skip
        check(
            self.attention_backend in ("auto", "xla", "pallas"),
            "attention_backend",
            "must be auto, xla or pallas",
        )
        check(self.warmup in ("none", "decode", "all"), "warmup", "must be none, decode or all")
        check(
            isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            "must be an int >= 1",
        )
        self.mesh_shape()  # ValueError naming mesh / tensor_parallel_size

    def mesh_shape(self) -> tuple[int, int]:
        """(dp, tp) from `mesh` and `tensor_parallel_size`."""
        from jpaged.mesh import mesh_shape

        return mesh_shape(self.tensor_parallel_size, self.mesh)

    def jax_dtype(self) -> str:
        """The weights' dtype name after resolving `auto` from the platform."""
        if self.dtype == "auto":
            return "float32" if jax.default_backend() == "cpu" else "bfloat16"
        return _DTYPES[self.dtype]

    def jax_kv_dtype(self) -> str:
        return self.jax_dtype() if self.kv_cache_dtype == "auto" else _DTYPES[self.kv_cache_dtype]

    def resolved_backend(self) -> str:
        # auto will pick pallas on accelerators once the kernels exist (#4); xla until then
        return "xla"
