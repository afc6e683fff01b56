"""Greedy steps' ids without the logits (the runner's `fast_greedy_head`, on the cpu linears).

bf16 head: `linear_cpu.linear_argmax`, the argmax inside the bf16 head kernel. f32 head:
`linear_cpu.head_argmax`, a bf16 screen with exact f32 recomputes of the candidate panels
(`screen_params` is its bf16 head copy and column norms). Both give the ids the logits give.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpaged.sampler import SamplerOutput, greedy_without_logprobs, ids_only_output, sample
from jpaged.sampling_tensors import SamplingTensors
from models.config import LlamaConfig
from models.forward import lm_head
from pallas_kernels import linear_cpu


def screen_params(head: jax.Array) -> dict[str, jax.Array]:
    """What `head_argmax` needs besides the packed f32 head: its bf16 copy and column norms."""
    return {
        "bf16": linear_cpu.pack(head.astype(jnp.bfloat16)[None]),
        "norms": linear_cpu.head_norms(head),
    }


def sample_hidden(
    c: LlamaConfig, params: dict, x: jax.Array, rows: jax.Array | None, sampling: SamplingTensors,
    sampler_kernels: bool,
) -> SamplerOutput:  # fmt: skip
    """Sample from the final hidden rows x: where every row is greedy and none wants its
    logprob, the ids straight from the head kernel (no logits); else the head's logits
    through `sample`. Both under one lax.cond, so the step stays one program."""
    head, v = params["packed"]["head"], c.vocab_size

    def greedy_ids() -> SamplerOutput:
        if "head_screen" in params:
            hs = params["head_screen"]
            ids = linear_cpu.head_argmax(x, head, hs["bf16"], hs["norms"], rows)
        else:
            ids = linear_cpu.linear_argmax(x, head, n=v, rows=rows)
        return ids_only_output(jnp.minimum(ids, v - 1))

    def full() -> SamplerOutput:
        return sample(lm_head(c, params, x, rows), sampling, 0, sampler_kernels)

    return jax.lax.cond(greedy_without_logprobs(sampling), greedy_ids, full)
