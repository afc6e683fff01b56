"""ModelRunner: pads a scheduled step into bucketed arrays and runs one jitted device step.

Queries are laid out as G tiles of Q query slots; a tile holds consecutive tokens of one
sequence. Pure decode steps use Q = 1 (a tile per sequence); steps with prefill chunks use
Q = min(bucket(longest chunk), PREFILL_TILE), so padding is at most one partial tile per
sequence instead of every sequence padded to the longest chunk. Step shapes are powers of
two: T (tokens), G (tiles), Q (tile size), R (sampling rows), C (block copies). The
block-table width W is fixed at ceil(max_model_len / block_size); attention loops only
over the columns in use.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import greedy_head
from jpaged.paths import kernels_cache_dir
from jpaged.sampler import compute_logprobs, penalty_free, sample
from jpaged.sampling_tensors import SamplingRow, build_sampling_tensors
from jpaged.step_shapes import StepShape, bucket, step_shape
from models.config import LlamaConfig
from models.forward import ModelBatch, llama_forward, unstack_layers
from models.packed_linears import pack_linear_params, unpacked_head
from pallas_kernels import linear_cpu, sampling_cpu

if TYPE_CHECKING:  # models.llama imports Flax; a packed-cache start builds no Llama
    from models.llama import Llama

logger = logging.getLogger(__name__)

NUM_TOP_LOGPROBS = 20  # top-k logprobs computed when any row asks (vLLM's max is 20)


@dataclasses.dataclass(slots=True)
class StepSeq:
    """One sequence's share of a step (plain data, copied from the scheduler's output)."""

    token_ids: Sequence[int]  # tokens whose K/V are computed this step
    start_position: int
    block_table: Sequence[int]


@dataclasses.dataclass(slots=True)
class ModelRunnerOutput:
    token_ids: list[int]  # [R] sampled ids, one per sampling row
    logprobs: list[float]  # [R] raw logprob of each sampled id
    ranks: list[int]  # [R] 1-based rank of each sampled id under the raw distribution
    top_token_ids: np.ndarray | None  # [R, K] when logprobs were asked for
    top_logprobs: np.ndarray | None  # [R, K]
    prompt_logprobs: PromptLogprobs | None = None  # for the step's prompt_rows


@dataclasses.dataclass(slots=True)
class PromptLogprobs:
    logprobs: np.ndarray  # [P] raw logprob of each next prompt token
    ranks: np.ndarray  # [P] its 1-based rank
    top_token_ids: np.ndarray  # [P, NUM_TOP_LOGPROBS]
    top_logprobs: np.ndarray  # [P, NUM_TOP_LOGPROBS]


class ModelRunner:
    """Owns the weights, the KV pool and the jitted step function."""

    def __init__(
        self,
        model: Llama | None,
        kv_pool: jax.Array,
        *,
        block_size: int,
        max_model_len: int,
        attention_backend: str = "xla",
        unroll_layers: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        linear_backend: str = "xla",
        fast_greedy_head: bool = True,
        packed_params: dict | None = None,
        config: LlamaConfig | None = None,
    ) -> None:
        """`mesh`: the weights and pool are sharded over it (jpaged.sharded_model); step
        outputs are replicated on it, the pool keeps its sharding. `linear_backend`: xla
        (plain dots) or cpu (weights packed for the C++ kernels, pallas_kernels.linear_cpu).
        `fast_greedy_head`: with cpu linears, steps whose rows are all greedy and need no
        logprobs take their ids without the f32 logits (the same ids): a bf16 head from
        `linear_cpu.linear_argmax`, an f32 one from `linear_cpu.head_argmax` (on AMX only; a
        bf16 copy of the head kept besides). `packed_params`: with cpu linears, what
        `pack_linear_params` gives for the model (jpaged.packed_cache); then `model` may be
        None and `config` its config."""
        if packed_params is not None and linear_backend != "cpu":
            raise ValueError("packed_params: only the cpu linear backend takes packed params")
        if model is None and (packed_params is None or config is None):
            raise ValueError("model: needed unless packed_params and config are given")
        self.config = model.config if model is not None else config
        self.attention_backend = attention_backend  # a name in ATTENTION_BACKENDS, fixed
        self.linear_backend = linear_backend
        # the sampler's reductions as C++ kernels where the C++ attention runs (one CPU device)
        self.sampler_kernels = attention_backend == "cpu" and sampling_cpu.load(kernels_cache_dir())
        self.head_screening = self.head_argmax = False  # the fast greedy path, f32 / bf16
        if linear_backend == "cpu":
            c = self.config
            params = packed_params
            if params is None:
                params = pack_linear_params(c, model.params())
            params = dict(params)
            head_dtype = params["packed"]["head"].dtype
            if fast_greedy_head and linear_cpu.available(kernels_cache_dir(), "bfloat16"):
                # the f32 screen pays only where bf16 runs far faster than f32
                self.head_screening = head_dtype == jnp.float32 and linear_cpu.has_bf16_dot()
                self.head_argmax = head_dtype == jnp.bfloat16
            if self.head_screening:
                params["head_screen"] = greedy_head.screen_params(unpacked_head(c, params))
        else:
            params = model.params()
        if unroll_layers:  # per-layer weight arrays, so the step copies no weight slices
            params["layers"] = unstack_layers(params["layers"], self.config.num_hidden_layers)
        self.params = params
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.vocab_size = self.config.vocab_size
        self.mesh = mesh
        shardings = {}
        if mesh is not None:
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            shardings = {"out_shardings": (kv_pool.sharding, replicated, replicated)}
        self._step = jax.jit(self._step_fn, static_argnums=(6,), donate_argnums=(1,), **shardings)
        self.num_steps = 0
        self.verify_tile = 1  # the engine sets verify_tile_size(k) when it speculates
        # multi-host: process 0 hands every step's host inputs to this (jpaged.multihost)
        self.step_listener: Callable[[tuple], None] | None = None

    @property
    def num_compilations(self) -> int:
        """Distinct step programs traced so far (one per bucket shape used)."""
        return self._step._cache_size()

    def _step_fn(self, params, kv_pool, batch, copies, sampling, prompt_lp, num_logprobs):  # noqa: ANN001, ANN202
        """prompt_lp: ([P] flat token index, [P] next prompt token id), P = 0 when unused."""
        if copies.shape[0]:  # copy-on-write: [C, 2] (src, dst) block ids, padding (0, 0)
            kv_pool = kv_pool.at[:, copies[:, 1]].set(kv_pool[:, copies[:, 0]])
        num_rows = batch.logits_index.shape[0]
        prompt_index, prompt_next = prompt_lp
        if prompt_index.shape[0]:  # extra logits rows for prompt logprobs
            index = jnp.concatenate([batch.logits_index, prompt_index])
            batch = dataclasses.replace(batch, logits_index=index, num_rows=None)
        fast = self.head_screening or self.head_argmax
        fast = fast and num_logprobs == 0 and not prompt_index.shape[0] and penalty_free(sampling)
        out, kv_pool = llama_forward(
            self.config, params, kv_pool, batch, self.attention_backend, head=not fast
        )
        if fast:  # out: the final hidden rows
            sampled = greedy_head.sample_hidden(
                self.config, params, out, batch.num_rows, sampling, self.sampler_kernels
            )
        else:
            sampled = sample(out[:num_rows], sampling, num_logprobs, self.sampler_kernels)
        prompt_out = None
        if prompt_index.shape[0]:
            prompt_out = compute_logprobs(
                out[num_rows:], prompt_next, NUM_TOP_LOGPROBS, self.sampler_kernels
            )
        return kv_pool, sampled, prompt_out

    def build_batch(
        self,
        seqs: Sequence[StepSeq],
        row_seq: Sequence[int],
        shape: StepShape,
        row_back: Sequence[int] = (),
    ) -> ModelBatch:
        """Pad a step into numpy arrays of `shape` (host side, O(tokens) numpy work).
        Row i takes the logits of token len - 1 - row_back[i] of seqs[row_seq[i]] (default
        its last)."""
        n = len(seqs)
        T, G, Q, R = shape.num_tokens, shape.num_tiles, shape.tile_size, shape.num_rows
        lens = np.fromiter((len(s.token_ids) for s in seqs), np.int32, n)
        starts = np.fromiter((s.start_position for s in seqs), np.int32, n)
        num_real = int(lens.sum())
        offsets = np.zeros(n, np.int32)  # first flat token of each sequence
        np.cumsum(lens[:-1], out=offsets[1:])
        tok_seq = np.repeat(np.arange(n, dtype=np.int32), lens)
        tok_q = np.arange(num_real, dtype=np.int32) - offsets[tok_seq]  # index in its chunk
        positions = starts[tok_seq] + tok_q
        tiles_per_seq = -(-lens // Q)
        tile_offsets = np.zeros(n, np.int32)
        np.cumsum(tiles_per_seq[:-1], out=tile_offsets[1:])
        tok_tile = tile_offsets[tok_seq] + tok_q // Q
        tok_slot = tok_q % Q
        tile_seq = np.repeat(np.arange(n, dtype=np.int32), tiles_per_seq)  # [G_real]

        seq_tables = np.zeros((n, self.max_blocks_per_seq), np.int32)
        for i, s in enumerate(seqs):
            seq_tables[i, : len(s.block_table)] = s.block_table
        bs = self.block_size
        slots = seq_tables[tok_seq, positions // bs] * bs + positions % bs

        def padded(values: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
            out = np.full((size, *values.shape[1:]), fill, np.int32)
            out[: len(values)] = values
            return out

        token_ids = np.concatenate([np.asarray(s.token_ids, np.int32) for s in seqs])
        query_index = np.zeros((G, Q), np.int32)
        query_index[tok_tile, tok_slot] = np.arange(num_real, dtype=np.int32)
        q_positions = np.full((G, Q), -1, np.int32)
        q_positions[tok_tile, tok_slot] = positions
        logits_index = np.zeros(R, np.int32)
        logits_index[: len(row_seq)] = (offsets + lens - 1)[np.asarray(row_seq, np.int64)]
        if len(row_back):
            logits_index[: len(row_seq)] -= np.asarray(row_back, np.int32)
        return ModelBatch(
            token_ids=padded(token_ids, T),
            positions=padded(positions, T),
            slot_mapping=padded(slots, T),  # padding tokens write slot 0 of the null block
            query_index=query_index,
            q_positions=q_positions,
            token_seq=padded(tok_tile, T),
            token_q=padded(tok_slot, T),
            block_tables=padded(seq_tables[tile_seq], G),
            seq_lens=padded((starts + lens)[tile_seq], G),
            logits_index=logits_index,
            num_tokens=np.int32(num_real),
            num_rows=np.int32(len(row_seq)),
        )

    def execute(
        self,
        seqs: Sequence[StepSeq],
        rows: Sequence[SamplingRow],
        row_seq: Sequence[int],
        block_copies: Sequence[tuple[int, int]] = (),
        shape: StepShape | None = None,
        prompt_rows: Sequence[tuple[int, int, int]] = (),
        row_back: Sequence[int] = (),
    ) -> ModelRunnerOutput:
        """Run one step. rows[i] samples from the last token of seqs[row_seq[i]], or with
        row_back, from the token row_back[i] before it (a verify step's drafts).

        prompt_rows: (seq index, token index in its chunk, next prompt token id) for each
        prompt position whose logprob is wanted; results in `prompt_logprobs`.
        """
        shape = shape or step_shape(seqs, len(rows), self.verify_tile if len(row_back) else 0)
        batch = self.build_batch(seqs, row_seq, shape, row_back)
        copies = np.zeros((bucket(len(block_copies)) if block_copies else 0, 2), np.int32)
        if block_copies:
            copies[: len(block_copies)] = block_copies
        sampling = build_sampling_tensors(rows, shape.num_rows)
        want_logprobs = any(r.params.logprobs for r in rows)
        num_logprobs = NUM_TOP_LOGPROBS if want_logprobs else 0
        num_prompt = bucket(len(prompt_rows)) if prompt_rows else 0
        prompt_index = np.zeros(num_prompt, np.int32)
        prompt_next = np.zeros(num_prompt, np.int32)
        if prompt_rows:
            offsets = np.cumsum([0] + [len(s.token_ids) for s in seqs[:-1]])
            rows_arr = np.asarray(prompt_rows, np.int64)
            prompt_index[: len(prompt_rows)] = offsets[rows_arr[:, 0]] + rows_arr[:, 1]
            prompt_next[: len(prompt_rows)] = rows_arr[:, 2]
        inputs = (batch, copies, sampling, (prompt_index, prompt_next), num_logprobs)
        if self.step_listener is not None:
            self.step_listener(inputs)
        out, prompt_out = self.run_inputs(inputs)
        num_rows = len(rows)
        token_ids = np.asarray(out.token_ids)[:num_rows].tolist()
        logprobs = np.asarray(out.logprob)[:num_rows].tolist()
        ranks = np.asarray(out.rank)[:num_rows].tolist()
        top_ids = top_lps = None
        if num_logprobs:
            top_ids = np.asarray(out.top_token_ids)[:num_rows]
            top_lps = np.asarray(out.top_logprobs)[:num_rows]
        prompt_logprobs = None
        if prompt_out is not None:
            n = len(prompt_rows)
            prompt_logprobs = PromptLogprobs(
                logprobs=np.asarray(prompt_out.logprob)[:n],
                ranks=np.asarray(prompt_out.rank)[:n],
                top_token_ids=np.asarray(prompt_out.top_token_ids)[:n],
                top_logprobs=np.asarray(prompt_out.top_logprobs)[:n],
            )
        return ModelRunnerOutput(token_ids, logprobs, ranks, top_ids, top_lps, prompt_logprobs)

    def run_inputs(self, inputs: tuple) -> tuple[Any, Any]:
        """Run the jitted step on host inputs (what `execute` builds, or a follower receives)."""
        *arrays, num_logprobs = inputs
        if jax.process_count() > 1:  # a mesh across processes takes global arrays only
            from jpaged.mesh import to_global

            arrays = to_global(arrays, self.mesh)
        self.kv_pool, out, prompt_out = self._step(self.params, self.kv_pool, *arrays, num_logprobs)
        self.num_steps += 1
        return out, prompt_out

    def warmup(self, shapes: Sequence[StepShape]) -> float:
        """Compile (and run once, writing only the null block) each step shape; returns seconds."""
        from jpaged.sampling_params import SamplingParams

        t0 = time.perf_counter()
        greedy = SamplingParams(temperature=0.0)
        for shape in shapes:  # one token in the null block, padded to `shape`
            self.execute(
                [StepSeq([0], 0, [0])], [SamplingRow(greedy, 0, 0, (), ())], [0], shape=shape
            )
        jax.block_until_ready(self.kv_pool)
        return time.perf_counter() - t0
