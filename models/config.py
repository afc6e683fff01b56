"""Llama-family model configuration: the fields jpaged reads from an HF `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    Field names follow Hugging Face's `LlamaConfig`, so `from_hf_dict` is a filter.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or HF's rope_scaling dict: {"rope_type": "linear"|"llama3"|"default", "factor": ...}
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")

    def __hash__(self) -> int:  # rope_scaling is a dict; jit needs the config hashable
        items = dataclasses.astuple(self)
        return hash(tuple(repr(v) if isinstance(v, dict | list) else v for v in items))

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed HF `config.json`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        # transformers >= 5 may keep rope_theta inside rope_parameters
        rope_params = hf.get("rope_parameters")
        if isinstance(rope_params, dict):
            if "rope_theta" in rope_params and "rope_theta" not in hf:
                kwargs["rope_theta"] = rope_params["rope_theta"]
            if rope_params.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
                kwargs["rope_scaling"] = dict(rope_params)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` of this config (architectures LlamaForCausalLM)."""
        d = dataclasses.asdict(self)
        d["architectures"] = ["LlamaForCausalLM"]
        d["model_type"] = "llama"
        return d


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A random-weight-sized config for tests: 2 layers, GQA 4:1, llama3 RoPE, untied."""
    base: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return LlamaConfig(**base)
