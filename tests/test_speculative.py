"""N-gram speculative decoding: the proposer, the config, and outputs equal to plain decoding."""

from __future__ import annotations

import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.llm import LLM
from jpaged.model_runner import StepSeq
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence, next_seq_id
from jpaged.speculative import NgramProposer, SpeculativeConfig, num_accepted, speculates
from jpaged.step_shapes import step_shape, verify_step_shapes, verify_tile_size
from jpaged.tokenizer import Tokenizer
from tests.test_engine import make_llm
from tests.util import tiny_random_llama

VOCAB = 96  # a small vocabulary: greedy outputs of a random model soon repeat (drafts hit)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def brute_force(tokens: list[int], k: int, hi: int, lo: int) -> list[int]:
    """The latest earlier occurrence of the longest suffix (hi..lo tokens); what followed it."""
    n_tok = len(tokens)
    for n in range(min(hi, n_tok - 1), lo - 1, -1):
        suffix = tokens[n_tok - n :]
        for end in range(n_tok - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                ext = list(tokens)  # the stretch from end repeats past the list's end
                while len(ext) < end + k:
                    ext.append(ext[len(ext) - (n_tok - end)])
                return ext[end : end + k]
    return []


@pytest.mark.parametrize("hi,lo", [(4, 1), (3, 2), (1, 1)])
def test_proposer_equals_brute_force(hi, lo):
    rng = np.random.default_rng(hi * 10 + lo)
    config = SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=hi, prompt_lookup_min=lo)
    proposer = NgramProposer(config)
    for seq_id in range(20):
        tokens = rng.integers(0, 4, int(rng.integers(1, 10))).tolist()  # small vocab: many hits
        for _ in range(40):  # grow as a decode does, one or a few tokens a step
            limit = int(rng.integers(0, 7))
            want = brute_force(tokens, min(limit, 5), hi, lo)
            assert proposer.propose(seq_id, tokens, limit) == want, (tokens, limit)
            tokens += rng.integers(0, 4, int(rng.integers(1, 4))).tolist()
    proposer.retain([3, 5])
    assert sorted(proposer._index) == [3, 5]


def test_loops_draft_k_tokens():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=5))
    assert proposer.propose(0, [7, 5, 5, 5], 3) == [5, 5, 5]  # period 1 (was [5])
    assert proposer.propose(1, [9, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # period 2
    assert proposer.propose(2, [4, 6, 1, 2, 3, 4, 6], 2) == [1, 2]  # inside the list


def test_num_accepted():
    assert num_accepted([5, 6, 7], [5, 6, 7, 8]) == 3
    assert num_accepted([5, 6, 7], [5, 9, 7, 8]) == 1
    assert num_accepted([5, 6, 7], [1, 6, 7, 8]) == 0
    assert num_accepted([], [4]) == 0


def test_config_parse_and_errors():
    assert SpeculativeConfig.parse(None) is None
    c = SpeculativeConfig.parse(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    )
    assert c == SpeculativeConfig(2, 3, 1)
    assert EngineConfig(speculative_config=NGRAM).speculative_config == SpeculativeConfig(3, 4, 1)
    bad = [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 99}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3},
         "prompt_lookup_min"),
        ({"num_speculative_tokens": 2, "model": "x"}, "unknown keys"),
        ("ngram", "must be a dict"),
    ]  # fmt: skip
    for value, field in bad:
        with pytest.raises(ValueError, match=field):
            EngineConfig(speculative_config=value)


def test_batch_size_schedule_parse_and_lookup():
    key = "num_speculative_tokens_per_batch_size"
    c = SpeculativeConfig.parse({**NGRAM, key: [[33, 64, 1], [1, 8, 5], [9, 16, 2]]})
    assert c.num_speculative_tokens_per_batch_size == ((1, 8, 5), (9, 16, 2), (33, 64, 1))
    # capped at num_speculative_tokens; a gap (17..32) and the tail keep the k before them
    got = {b: c.tokens_for_batch(b) for b in (1, 8, 9, 16, 17, 32, 33, 64, 65, 999)}
    assert got == {1: 3, 8: 3, 9: 2, 16: 2, 17: 2, 32: 2, 33: 1, 64: 1, 65: 1, 999: 1}
    assert SpeculativeConfig.parse(NGRAM).tokens_for_batch(500) == 3
    bad = [[], [[2, 8, 1]], [[1, 8, 1], [8, 9, 0]], [[1, 0, 1]], [[1, 8, -1]], [[1, 8]],
           [[1, 8, 1.5]], "1-8:3"]  # fmt: skip
    for value in bad:
        with pytest.raises(ValueError, match=key):
            EngineConfig(speculative_config={**NGRAM, key: value})


def test_batch_size_schedule_drafts_only_in_small_batches(tiny_model, tokenizer):
    prompts, params = repetitive_workload(12, seed=3)
    want = run_checked(make_llm(tiny_model, tokenizer), prompts, params)
    schedule = {**NGRAM, "num_speculative_tokens_per_batch_size": [[1, 4, 2], [5, 256, 0]]}
    llm = make_llm(tiny_model, tokenizer, speculative_config=schedule)
    engine, stats = llm.engine, llm.engine.stats
    step, per_step = engine.step, []

    def recording_step():
        running, drafts = len(engine.scheduler.running), stats.spec_draft_tokens
        outs = step()
        per_step.append((running, stats.spec_draft_tokens - drafts))
        return outs

    engine.step = recording_step
    try:
        assert run_checked(llm, prompts, params) == want
    finally:
        engine.step = step
    assert all(drafts == 0 for running, drafts in per_step if running > 4)
    assert all(drafts <= 2 * running for running, drafts in per_step)
    assert sum(drafts for running, drafts in per_step if running <= 4) > 0
    assert stats.spec_accepted_tokens > 0


def test_speculates_only_greedy_plain_requests():
    assert speculates(SamplingParams(temperature=0))
    assert speculates(SamplingParams(temperature=0, stop=["x"], min_tokens=2))
    assert not speculates(SamplingParams(temperature=0.7))
    assert not speculates(SamplingParams(temperature=0, logprobs=1))
    assert not speculates(SamplingParams(temperature=0, repetition_penalty=1.2))
    assert not speculates(SamplingParams(temperature=0, n=2))


def test_verify_shapes_cover_step_shape():
    shapes = set(verify_step_shapes(16, 64, 3))
    rng = np.random.default_rng(0)
    tile = verify_tile_size(3)
    assert tile == 4
    for _ in range(300):
        lens = rng.integers(1, 5, int(rng.integers(1, 17)))
        seqs = [StepSeq([0] * int(n), 0, [0]) for n in lens]
        assert step_shape(seqs, int(lens.sum()), tile) in shapes


def test_scheduler_drafts_accept_and_give_back_blocks():
    sched = Scheduler(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      max_model_len=64)  # fmt: skip
    seq = Sequence(next_seq_id(), "r", [1, 2, 3, 4, 5], 5, max_tokens=40)
    sched.add_seq(seq)
    out = sched.schedule()
    sched.postprocess(out, {seq.seq_id: 9})  # prompt done; 6 tokens, 5 computed
    seq.draft_token_ids = [7, 8, 9, 10, 11, 12]
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.token_ids == [9, 7, 8, 9, 10, 11, 12] and s.num_draft == 6
    assert len(seq.block_table) == 3  # 12 positions
    with pytest.raises(ValueError, match="not its drafts"):
        sched.postprocess(out, {seq.seq_id: 3}, {seq.seq_id: [8]})
    sched.postprocess(out, {seq.seq_id: 3}, {seq.seq_id: [7]})  # one kept, then 3
    assert seq.token_ids == [1, 2, 3, 4, 5, 9, 7, 3]
    assert seq.num_computed_tokens == 7 and len(seq.block_table) == 2  # rejected: given back
    assert seq.draft_token_ids == []
    sched.check_invariants()
    seq.draft_token_ids = [1] * 60  # past max_model_len: cut to what fits
    (s,) = sched.schedule().scheduled
    assert len(s.token_ids) + seq.num_computed_tokens == 63


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_random_llama(VOCAB)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def repetitive_workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts that repeat a short random phrase, so the proposer finds matches."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        phrase = rng.integers(3, VOCAB, int(rng.integers(2, 6))).tolist()
        prompts.append(phrase * int(rng.integers(2, 8)) + phrase[: int(rng.integers(0, 2))])
    params = [
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=int(rng.integers(4, 60)))
        for _ in range(n)
    ]
    return prompts, params


def run_checked(llm: LLM, prompts, params) -> list[list[int]]:
    """generate(), checking the scheduler's invariants after every step."""
    engine = llm.engine
    step = engine.step

    def checked_step():
        outs = step()
        engine.scheduler.check_invariants()
        return outs

    engine.step = checked_step
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.step = step
    assert engine.scheduler.stats.blocks_in_use == 0
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("options", [{}, {"num_blocks": 40, "block_size": 8},
                                     {"max_num_seqs": 3}], ids=["plain", "preempt", "few-seqs"])  # fmt: skip
def test_speculation_keeps_greedy_outputs(tiny_model, tokenizer, options):
    prompts, params = repetitive_workload(12)
    plain = make_llm(tiny_model, tokenizer, **options)
    want = run_checked(plain, prompts, params)
    spec = make_llm(tiny_model, tokenizer, speculative_config=NGRAM, **options)
    assert run_checked(spec, prompts, params) == want
    stats = spec.engine.stats
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0
    assert stats.num_steps < plain.engine.stats.num_steps
    if "num_blocks" in options:
        assert stats.num_preemptions > 0
    print(options, "drafts", stats.spec_draft_tokens, "kept", stats.spec_accepted_tokens,
          "steps", stats.num_steps, "vs", plain.engine.stats.num_steps)  # fmt: skip


def test_speculation_with_stops_and_other_requests(tiny_model, tokenizer):
    """Stop ids, min_tokens, max_tokens cut accepted drafts where plain decoding stops;
    sampled and logprob requests run unspeculated alongside."""
    prompts, params = repetitive_workload(6, seed=1)
    plain = make_llm(tiny_model, tokenizer)
    free = run_checked(plain, prompts, params)
    mixed = []
    for i, (ids, p) in enumerate(zip(free, params, strict=True)):
        stop_id = ids[len(ids) // 2]
        mixed.append(SamplingParams(temperature=0, max_tokens=p.max_tokens, stop_token_ids=[stop_id],
                                    min_tokens=min(i, len(ids) // 2)))  # fmt: skip
    mixed.append(SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True))
    mixed.append(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1))
    prompts = prompts + prompts[:2]
    want = run_checked(make_llm(tiny_model, tokenizer), prompts, mixed)
    spec = make_llm(tiny_model, tokenizer, speculative_config=NGRAM)
    assert run_checked(spec, prompts, mixed) == want
    assert spec.engine.stats.spec_accepted_tokens > 0


def test_speculation_warmup_compiles_every_verify_shape(tiny_model, tokenizer):
    from jpaged.step_shapes import all_step_shapes

    prompts, params = repetitive_workload(8, seed=2)
    llm = make_llm(tiny_model, tokenizer, speculative_config=NGRAM, max_num_seqs=8,
                   max_num_batched_tokens=64, warmup="decode")  # fmt: skip
    runner = llm.engine.runner
    warm = {s for s in all_step_shapes(8, 64) if s.tile_size == 1} | set(
        verify_step_shapes(8, 64, 3)
    )
    assert runner.num_compilations == len(warm)
    used = []
    execute = runner.execute

    def recording(seqs, rows, *args, **kwargs):
        verify = runner.verify_tile if len(kwargs.get("row_back", ())) else 0
        used.append((step_shape(seqs, len(rows), verify), all(len(s.token_ids) <= 4 for s in seqs)))
        return execute(seqs, rows, *args, **kwargs)

    runner.execute = recording
    run_checked(llm, prompts, params)
    assert llm.engine.stats.spec_draft_tokens > 0
    assert any(shape.num_rows > shape.num_tiles for shape, _ in used)  # verify steps ran
    for shape, short in used:
        assert not short or shape in warm, shape  # decode and verify steps: all warmed up
    cold = {shape for shape, _ in used} - warm  # the prefill steps' shapes
    assert runner.num_compilations == len(warm) + len(cold)
