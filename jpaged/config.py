"""Engine options (vLLM's names), validated once at the edge."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip
# KV pool dtypes beyond _DTYPES, vLLM's names: fp8 = e4m3 (stored unscaled, as vLLM does
# with its default k/v scales of 1.0; e4m3 holds magnitudes up to 448)
_KV_DTYPES = {**_DTYPES, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
              "fp8_e5m2": "float8_e5m2"}  # fmt: skip


WARMUP_CHOICES = ("none", "decode", "prefill", "all")


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
    attention_backend: str = "auto"  # auto | cpu | xla | pallas
    quantization: str | None = None  # None (the checkpoint's own) | int8 | awq | gptq
    seed: int = 0
    warmup: str = "none"  # none | decode | prefill | all: compiled at start (LLMEngine.warmup)
    enable_compile_cache: bool = True
    # layers unrolled over per-layer weight arrays (faster steps, longer compiles) instead of
    # a lax.scan over stacked weights, whose slices XLA copies every step
    unroll_layers: bool = False
    # auto: cpu (C++ kernels over weights packed once: f32 on AVX-512, bf16 on AMX tiles) for
    # float weights on one CPU device that has the instructions, else xla (plain dots)
    linear_backend: str = "auto"
    # cpu linears on AMX: a step whose rows are all greedy without logprobs takes its ids
    # without writing the logits (the same ids): a bf16 head's argmax in its kernel; an f32
    # head screened on bf16 scores, exact f32 recomputes of the panels that may hold the
    # argmax (a bf16 copy of the head is kept besides)
    fast_greedy_head: bool = True
    tensor_parallel_size: int = 1  # devices one model replica is sharded over
    mesh: Any = None  # {"dp": D, "tp": T} or "dp=D,tp=T" (jpaged.mesh); None: dp=1
    # vLLM's {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
    # "prompt_lookup_min": 1}: prompt-lookup drafts for greedy requests (jpaged.speculative);
    # parsed into a SpeculativeConfig. None: off
    speculative_config: Any = None

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{field} {msg}, got {getattr(self, field)!r}")

        check(
            self.dtype == "auto" or self.dtype in _DTYPES,
            "dtype",
            "must be auto, float32, bfloat16 or float16",
        )
        check(self.kv_cache_dtype == "auto" or self.kv_cache_dtype in _KV_DTYPES, "kv_cache_dtype",
              "must be auto, float32, bfloat16, float16, fp8, fp8_e4m3 or fp8_e5m2")  # fmt: skip
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
            self.attention_backend in ("auto", "cpu", "xla", "pallas"),
            "attention_backend",
            "must be auto, cpu, xla or pallas",
        )
        check(self.quantization in (None, "int8", "awq", "gptq"), "quantization",
              "must be None, int8, awq or gptq")  # fmt: skip
        check(self.warmup in WARMUP_CHOICES, "warmup", "must be none, decode, prefill or all")
        check(self.linear_backend in ("auto", "cpu", "xla"), "linear_backend",
              "must be auto, cpu or xla")  # fmt: skip
        check(
            isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            "must be an int >= 1",
        )
        self.mesh_shape()  # ValueError naming mesh / tensor_parallel_size
        from jpaged.speculative import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

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
        """The KV pool's dtype name (`auto` = the weights' dtype)."""
        if self.kv_cache_dtype == "auto":
            return self.jax_dtype()
        return _KV_DTYPES[self.kv_cache_dtype]

    def resolved_backend(self) -> str:
        """The attention backend to run after resolving `auto`.

        auto: pallas on GPUs; on CPU the C++ `cpu` kernel where it builds, else xla.
        `pallas` off a GPU runs the kernels in Pallas interpret mode (slow; for tests).
        Raises ValueError when `cpu` is asked for and cannot run here.
        """
        on_cpu = jax.default_backend() == "cpu"
        # The cpu kernel is one FFI call XLA cannot partition (it would all-gather a sharded
        # pool): with tp > 1, auto takes xla, which shards along KV heads with the step.
        sharded = self.mesh_shape()[1] > 1
        if self.attention_backend == "cpu" and sharded:
            raise ValueError("attention_backend cpu does not run with tensor_parallel_size > 1")
        if self.attention_backend == "auto" and on_cpu and sharded:
            return "xla"
        if self.attention_backend in ("auto", "cpu") and on_cpu:
            from jpaged.paths import kernels_cache_dir
            from pallas_kernels import paged_attention_cpu

            if paged_attention_cpu.load(kernels_cache_dir()):
                return "cpu"
            if self.attention_backend == "cpu":
                raise ValueError("attention_backend cpu: the C++ kernel could not be built")
        if self.attention_backend == "cpu":
            raise ValueError("attention_backend cpu runs only on the CPU platform")
        if self.attention_backend == "auto":
            return "pallas" if jax.default_backend() == "gpu" else "xla"
        return self.attention_backend

    def resolved_linear_backend(self, weights_dtype: str, float_linears: bool = True) -> str:
        """The linear layers' backend after resolving `auto` (see `linear_backend`), for
        weights of `weights_dtype` (float_linears: none of them quantized).

        Raises ValueError when `cpu` is asked for and cannot run here.
        """
        if self.linear_backend == "xla":
            return "xla"
        why = None
        if jax.default_backend() != "cpu":
            why = "runs only on the CPU platform"
        elif weights_dtype not in ("float32", "bfloat16"):
            why = f"needs float32 or bfloat16 weights, not {weights_dtype}"
        elif self.quantization is not None or not float_linears:
            why = "does not run quantized weights"
        elif self.mesh_shape() != (1, 1):
            why = "does not run on a mesh of more than one device"
        else:
            from jpaged.paths import kernels_cache_dir
            from pallas_kernels import linear_cpu

            if not linear_cpu.available(kernels_cache_dir(), weights_dtype):
                why = f"needs a CPU with AVX-512F or AVX2 + FMA and a C++ compiler for {weights_dtype}"
        if why is None:
            return "cpu"
        if self.linear_backend == "cpu":
            raise ValueError(f"linear_backend cpu {why}")
        return "xla"
