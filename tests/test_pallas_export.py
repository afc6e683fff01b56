"""The Pallas kernels lower for CUDA on this GPU-less machine and export with jax.export.

Lowering runs the Pallas -> Triton IR translation (the Triton module is built and embedded
in the `__gpu$xla.gpu.triton` custom call), so unsupported ops, non-power-of-two shapes and
bad dot shapes fail here. What cannot be checked without a GPU: Triton's own compilation of
that IR to PTX, and the run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from models.config import tiny_llama_config
from models.llama import Llama, ModelBatch
from pallas_kernels.kv_write_pallas import write_kv
from pallas_kernels.paged_decode_pallas import paged_decode_attention
from pallas_kernels.paged_ragged_pallas import ragged_paged_attention

TRITON = "__gpu$xla.gpu.triton"
H100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                                   num_cores=132, platform="gpu"))  # fmt: skip
A100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA A100-SXM4-80GB",
                                                   num_cores=108, platform="gpu"))  # fmt: skip
sds = jax.ShapeDtypeStruct


def export_cuda(fn, *args, mesh: AbstractMesh = H100) -> str:
    """jax.export `fn` for CUDA under an abstract GPU; returns the StableHLO text."""
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(
            jax.jit(fn),
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
        )(*args)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def attention_args(q_len: int, dtype, *, heads: int, kv_heads: int, head_dim: int, bs: int):
    seqs, layers, blocks, width = 8, 4, 256, 128
    return (
        sds((seqs, q_len, heads, head_dim), dtype),
        sds((layers, blocks, 2, bs, kv_heads, head_dim), dtype),
        sds((), jnp.int32),
        sds((seqs, width), jnp.int32),
        sds((seqs,), jnp.int32),
        sds((seqs, q_len), jnp.int32),
    )


SHAPES = [  # (dtype, heads, kv_heads, head_dim, block_size): Llama-3-8B-like, SmolLM2-like
    (jnp.bfloat16, 32, 8, 128, 16),
    (jnp.float32, 9, 3, 64, 32),
]


@pytest.mark.parametrize(("dtype", "h", "kv", "d", "bs"), SHAPES)
def test_kernels_export_for_cuda(dtype, h, kv, d, bs):
    shape = dict(heads=h, kv_heads=kv, head_dim=d, bs=bs)
    decode = functools.partial(paged_decode_attention, scale=d**-0.5, interpret=False)
    ragged = functools.partial(ragged_paged_attention, scale=d**-0.5, interpret=False)
    for fn, q_len in ((decode, 1), (ragged, 32)):
        text = export_cuda(fn, *attention_args(q_len, dtype, **shape))
        assert text.count(f"custom_call @{TRITON}(") == 1
    pool = attention_args(1, dtype, **shape)[1]
    tokens = sds((64, kv, d), dtype)
    text = export_cuda(functools.partial(write_kv, interpret=False), pool, sds((), jnp.int32),
                       tokens, tokens, sds((64,), jnp.int32))  # fmt: skip
    assert text.count(f"custom_call @{TRITON}(") == 1
    assert "output_operand_aliases" in text  # the pool is updated in place


def test_decode_exports_for_ampere():
    """No Hopper-only feature: the same kernel lowers for an A100 (sm_80)."""
    decode = functools.partial(paged_decode_attention, scale=0.125, interpret=False)
    args = attention_args(1, jnp.bfloat16, heads=8, kv_heads=2, head_dim=64, bs=16)
    assert TRITON in export_cuda(decode, *args, mesh=A100)


def test_model_step_with_pallas_backend_exports_for_cuda():
    """The whole Llama step (scan over layers) with attention_backend="pallas" lowers for
    CUDA: interpret mode is chosen off automatically from the abstract GPU device."""
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, head_dim=16,
                               num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    num_tokens, num_tiles, q_len, rows, width = 16, 4, 4, 4, 8
    i32 = lambda *shape: sds(shape, jnp.int32)  # noqa: E731
    batch = ModelBatch(
        token_ids=i32(num_tokens), positions=i32(num_tokens), slot_mapping=i32(num_tokens),
        query_index=i32(num_tiles, q_len), q_positions=i32(num_tiles, q_len),
        token_seq=i32(num_tokens), token_q=i32(num_tokens), block_tables=i32(num_tiles, width),
        seq_lens=i32(num_tiles), logits_index=i32(rows),
    )  # fmt: skip
    c = config
    pool = sds((c.num_hidden_layers, 32, 2, 16, c.num_key_value_heads, c.head_dim), jnp.bfloat16)
    text = export_cuda(lambda p, b: model(p, b, "pallas"), pool, batch)
    # One write and one ragged attention call inside the scan body.
    assert text.count(f"custom_call @{TRITON}(") == 2
