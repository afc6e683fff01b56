"""LLMEngine: requests in, RequestOutputs out; one `step()` = schedule, run, sample, detokenize."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from jpaged.beam_search import BeamSearcher, BeamSearchParams
from jpaged.config import EngineConfig
from jpaged.detokenizer import IncrementalDetokenizer
from jpaged.engine_setup import (
    build_runner,
    enable_compile_cache,
    load_engine_model,
    prebuild_cpu_kernels,
    start_pool_prefault,
    tp_mesh,
)
from jpaged.malloc_tuning import tune_malloc
from jpaged.model_runner import StepSeq
from jpaged.outputs import Logprob, RequestMetrics, RequestOutput, logprob_entry
from jpaged.prompts import PromptType, tokenize_prompt
from jpaged.request import RequestState, SampleTrack
from jpaged.sampling_params import SamplingParams
from jpaged.sampling_tensors import SamplingRow, wants_logprob
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence as Seq
from jpaged.sequence import next_seq_id
from jpaged.speculative import NgramProposer, propose_drafts, speculates, step_tokens
from jpaged.step_shapes import (
    all_step_shapes,
    burst_prefill_shapes,
    verify_step_shapes,
    verify_tile_size,
)
from jpaged.tokenizer import Tokenizer
from models.config import LlamaConfig

if TYPE_CHECKING:  # models.llama imports Flax; a packed-cache start builds no Llama
    from models.llama import Llama

logger = logging.getLogger("jpaged")


@dataclasses.dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_compilations: int = 0
    num_preemptions: int = 0
    num_blocks: int = 0
    block_size: int = 0
    blocks_in_use: int = 0
    peak_blocks_in_use: int = 0
    num_cached_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    prompt_tokens: int = 0
    generation_tokens: int = 0
    spec_draft_tokens: int = 0  # speculative tokens verified (cumulative)
    spec_accepted_tokens: int = 0  # of which kept
    load_time_s: float = 0.0
    warmup_time_s: float = 0.0


class LLMEngine:
    """Continuous-batching engine over one model and one KV pool."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model: Llama | None = None,
        tokenizer: Tokenizer | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ) -> None:
        """Load the model (or take a prebuilt `model` + `tokenizer`), size and allocate the pool.

        `mesh`: a (1, tp) mesh to shard over; default: built from `config` (dp must be 1
        here; `jpaged.data_parallel` runs dp > 1). ValueError when devices are too few.
        """
        t0 = time.perf_counter()
        self.config = config
        tune_malloc()
        prebuild_cpu_kernels(config)
        if config.enable_compile_cache:
            enable_compile_cache()
        self.mesh = mesh if mesh is not None else tp_mesh(config)
        weights, tokenizer = load_engine_model(config, self.mesh, model, tokenizer)
        self.tokenizer = tokenizer
        self.model_config: LlamaConfig = weights.config
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.max_num_batched_tokens = config.max_num_batched_tokens or 2048
        self.runner, num_blocks = build_runner(config, weights, self.mesh, self.max_model_len)
        del weights
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self._prefaulter = start_pool_prefault(self.runner)
        self.eos_token_ids = frozenset(mc.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self._eos_ids = tuple(sorted(self.eos_token_ids))  # banned before min_tokens
        self.requests: dict[str, RequestState] = {}
        self._seq_request: dict[int, tuple[RequestState, SampleTrack]] = {}
        self._rng = random.Random(config.seed)
        self.beam_search = BeamSearcher(self.scheduler, tokenizer, self.eos_token_ids)
        spec = config.speculative_config
        self.proposer = NgramProposer(spec) if spec is not None else None
        self.num_speculative_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.runner.verify_tile = verify_tile_size(self.num_speculative_tokens)
        self.stats = EngineStats(num_blocks=num_blocks, block_size=config.block_size)
        self.stats.load_time_s = time.perf_counter() - t0
        logger.info(
            "KV pool: %d blocks of %d tokens (%d tokens, %.1f MiB, %s); attention %s, linears %s;"
            " load %.2fs",
            num_blocks, config.block_size, num_blocks * config.block_size,
            self.runner.kv_pool.nbytes / 2**20,
            self.runner.kv_pool.dtype, self.runner.attention_backend, self.runner.linear_backend,
            self.stats.load_time_s,
        )  # fmt: skip
        self.warmup(config.warmup)

    def warmup(self, which: str) -> None:
        """Compile the step shapes `which` names: none, decode, prefill or all.

        decode: pure decode steps and speculative decoding's verify steps; prefill: those and
        the steps a burst of prompts fills (a full or half token budget in prefill tiles).
        """
        if which != "none":
            args = (self.config.max_num_seqs, self.max_num_batched_tokens)
            shapes = all_step_shapes(*args, self.num_speculative_tokens)
            if which in ("decode", "prefill"):
                picked = [s for s in shapes if s.tile_size == 1]
                if which == "prefill":
                    burst = burst_prefill_shapes(*args)
                    picked += [s for s in shapes if s in burst]
                shapes = picked + verify_step_shapes(*args, self.num_speculative_tokens)
            self.stats.warmup_time_s = self.runner.warmup(shapes)
            logger.info("compiled %d step shapes in %.2fs", len(shapes), self.stats.warmup_time_s)
        self._update_stats()

    # ---- requests -------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Accepts text, token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        return tokenize_prompt(prompt, self.tokenizer, self.model_config.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | BeamSearchParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. ValueError if it can never fit (context or pool), or the id is taken.

        BeamSearchParams make it a beam search (see add_beam_request).
        """
        if isinstance(params, BeamSearchParams):
            return self.add_beam_request(request_id, prompt, params, arrival_time)
        params = params or SamplingParams()
        if request_id in self.requests or request_id in self.beam_search:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n is {params.n} but max_num_seqs is {self.config.max_num_seqs}")
        vocab = self.model_config.vocab_size
        for token_id in params.stop_token_ids or ():
            if not 0 <= token_id < vocab:
                raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {token_id}")
        text, ids = self.tokenize_prompt(prompt)
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        tracks = [
            SampleTrack(
                index=i,
                seed=(base_seed + i * 0x9E3779B1) & 0xFFFFFFFF,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer.backend,
                    ids,
                    params.skip_special_tokens,
                    params.spaces_between_special_tokens,
                ),
                cumulative_logprob=0.0 if wants_logprob(params) else None,
                logprobs=[] if params.logprobs is not None else None,
            )
            for i in range(params.n)
        ]
        state = RequestState(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.eos_token_ids,
            tracks=tracks,
            metrics=RequestMetrics(arrival_time=arrival_time or time.time()),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        seq = Seq(
            seq_id=next_seq_id(),
            request_id=request_id,
            token_ids=list(ids),
            num_prompt_tokens=len(ids),
            n=params.n,
            max_tokens=max_tokens,
            skip_prefix_cache=params.prompt_logprobs is not None,
        )
        self.scheduler.add_seq(seq)  # raises ValueError when the pool can never hold it
        self.requests[request_id] = state
        self._seq_request[seq.seq_id] = (state, tracks[0])
        self.stats.prompt_tokens += len(ids)

    def add_beam_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: BeamSearchParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a beam search (jpaged.beam_search); its one output comes when it finishes.

        ValueError if the id is taken, beam_width > max_num_seqs or too wide for the top
        logprobs, or the request can never fit.
        """
        if request_id in self.requests or request_id in self.beam_search:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.beam_width > self.config.max_num_seqs:
            raise ValueError(
                f"beam_width is {params.beam_width} but max_num_seqs is {self.config.max_num_seqs}"
            )
        text, ids = self.tokenize_prompt(prompt)
        self.beam_search.add(request_id, text, ids, params, self.max_model_len, arrival_time)
        self.stats.prompt_tokens += len(ids)

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        """Stop requests now; their blocks are freed at once. Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if self.beam_search.abort(rid):
                continue
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            for sid in self.scheduler.abort_request(rid):
                self._seq_request.pop(sid, None)
            for track in state.tracks:
                if track.finish_reason is None:
                    track.finish_reason = "abort"
        self._update_stats()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.beam_search)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests) + len(self.beam_search)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the (cumulative) output of every request it touched."""
        if self._prefaulter is None:
            return self._step()
        with self._prefaulter.during_step(self.scheduler.block_manager):  # it pauses
            return self._step()

    def _step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            propose_drafts(self.proposer, self.scheduler, self._draft_limit)
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        self.beam_search.note_preempted(out.preempted_seq_ids)
        seqs, rows, row_seq, row_ids, row_back = [], [], [], [], []
        prompt_rows, prompt_owner = [], []
        for i, s in enumerate(out.scheduled):
            seqs.append(StepSeq(s.token_ids, s.start_position, s.block_table))
            for sid in s.sample_seq_ids:
                row = self._sampling_row(sid)
                for j in range(s.num_draft + 1):  # after the last token, then after each draft
                    rows.append(row if j == 0 else dataclasses.replace(row, step=row.step + j))
                    row_seq.append(i)
                    row_ids.append(sid)
                    row_back.append(s.num_draft - j)
            entry = self._seq_request.get(s.seq_id)
            if entry is not None and entry[0].prompt_logprobs is not None and entry[1].index == 0:
                for offset, next_id in entry[0].prompt_logprob_rows(
                    s.start_position, len(s.token_ids)
                ):
                    prompt_rows.append((i, offset, next_id))
                    prompt_owner.append(entry[0])
        result = self.runner.execute(
            seqs, rows, row_seq, out.block_copies, prompt_rows=prompt_rows,
            row_back=row_back if any(row_back) else (),  # drafts: a verify step
        )  # fmt: skip
        if prompt_rows:
            self._record_prompt_logprobs(result.prompt_logprobs, prompt_rows, prompt_owner)
        tokens = step_tokens(out.scheduled, result.token_ids)
        self.stats.spec_draft_tokens += tokens.num_drafts
        self.stats.spec_accepted_tokens += tokens.num_kept
        self.scheduler.postprocess(out, tokens.sampled, tokens.accepted)
        beam_rows = [(r, sid) for r, sid in tokens.emitted if sid not in self._seq_request]
        beam_outputs, num_beam_tokens = self.beam_search.process(beam_rows, result)
        self.stats.generation_tokens += num_beam_tokens
        touched: dict[str, RequestState] = {}
        for r, sid in tokens.emitted:
            if sid not in self._seq_request:
                continue  # a beam's, or a sample that stopped at an earlier token of this step
            state, track = self._seq_request[sid]
            top = (
                self._logprob_dict(result, r, state.params.logprobs)
                if track.logprobs is not None
                else None
            )
            done = state.append_token(track, result.token_ids[r], result.logprobs[r], top)
            self.stats.generation_tokens += 1
            touched[state.request_id] = state
            if done:
                self.scheduler.finish_seq(sid)
                del self._seq_request[sid]
        for state in touched.values():
            if state.finished:
                del self.requests[state.request_id]
        self._update_stats()
        return [s.to_output() for s in touched.values()] + beam_outputs

    def _draft_limit(self, seq: Seq) -> int:
        """Most drafts seq may take: 0 unless its request speculates (greedy, n = 1, ...);
        none past max_tokens, as the token after the last draft is sampled."""
        entry = self._seq_request.get(seq.seq_id)
        if entry is None or not speculates(entry[0].params):
            return 0  # beams, sampling, penalties, logprobs
        state, track = entry
        return state.max_tokens - len(track.token_ids) - 1

    def _sampling_row(self, seq_id: int) -> SamplingRow:
        seq = self.scheduler.get_seq(seq_id)
        if (beam_row := self.beam_search.sampling_row(seq)) is not None:
            return beam_row
        if seq_id not in self._seq_request:  # a child just forked from its request's parent
            state = self.requests[seq.request_id]
            self._seq_request[seq_id] = (state, state.tracks[seq.sample_index])
        state, track = self._seq_request[seq_id]
        p = state.params
        penalties = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        return SamplingRow(
            params=p,
            seed=track.seed,
            step=seq.num_output_tokens,
            prompt_token_ids=state.prompt_token_ids if penalties else (),
            output_token_ids=seq.output_token_ids if penalties else (),
            eos_token_ids=() if p.ignore_eos else self._eos_ids,
        )

    def _logprob_dict(self, result: Any, row: int, k: int | None) -> dict[int, Logprob]:
        top_ids = result.top_token_ids[row] if result.top_token_ids is not None else ()
        top_lps = result.top_logprobs[row] if result.top_logprobs is not None else ()
        return logprob_entry(
            self.tokenizer.decode, result.token_ids[row], result.logprobs[row], result.ranks[row],
            top_ids, top_lps, k or 0,
        )  # fmt: skip

    def _record_prompt_logprobs(
        self, lp: Any, prompt_rows: list, owners: list[RequestState]
    ) -> None:
        for r, ((_, _, next_id), state) in enumerate(zip(prompt_rows, owners, strict=True)):
            entry = logprob_entry(
                self.tokenizer.decode, next_id, lp.logprobs[r], lp.ranks[r],
                lp.top_token_ids[r], lp.top_logprobs[r], state.params.prompt_logprobs or 0,
            )  # fmt: skip
            state.prompt_logprobs.append(entry)

    def _update_stats(self) -> None:
        s = self.stats
        s.num_steps = self.runner.num_steps
        s.num_compilations = self.runner.num_compilations
        sched = self.scheduler.stats
        s.num_preemptions = sched.num_preemptions
        s.blocks_in_use = sched.blocks_in_use
        s.peak_blocks_in_use = sched.peak_blocks_in_use
        s.num_cached_blocks = sched.num_cached_blocks
        s.prefix_cache_queries = sched.prefix_cache_queries
        s.prefix_cache_hits = sched.prefix_cache_hits
