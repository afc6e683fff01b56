"""Beam search: transformers' rules on hand-made logprobs (EOS hypotheses, forks, frees,
early stop), and inside the engine on a tiny model (blocks shared, freed at once, preemption)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jpaged.beam_search import BeamSearcher, BeamSearchParams
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.tokenizer import Tokenizer
from tests.util import tiny_random_llama

EOS = 2


class _Tok:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def run_rules(tops: dict[tuple[int, ...], list[tuple[int, float]]], params: BeamSearchParams):
    """Drive a real Scheduler + BeamSearcher with fake logprobs: tops[generated so far] is the
    beam's top-4 (token, logprob). Returns the final output and the live seqs after each step."""
    sched = Scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                      max_model_len=64)  # fmt: skip
    beams = BeamSearcher(sched, _Tok(), [EOS])
    beams.add("r", None, [5, 6, 7, 8, 9], params, max_model_len=64)
    live = []
    while True:
        out = sched.schedule()
        row_ids = [sid for s in out.scheduled for sid in s.sample_seq_ids]
        prefixes = [tuple(sched.get_seq(sid).output_token_ids) for sid in row_ids]
        sched.postprocess(
            out, {sid: tops[p][0][0] for sid, p in zip(row_ids, prefixes, strict=True)}
        )
        result = SimpleNamespace(top_token_ids=[[t for t, _ in tops[p]] for p in prefixes],
                                 top_logprobs=[[lp for _, lp in tops[p]] for p in prefixes])  # fmt: skip
        done, num_scored = beams.process(list(enumerate(row_ids)), result)
        assert num_scored == len(row_ids)
        sched.check_invariants()
        live.append(sorted(tuple(sched.get_seq(s).output_token_ids) for s in sched._seqs))
        if done:
            assert not sched.has_unfinished() and sched.stats.blocks_in_use == 0
            return done[0], live


def test_rules_eos_hypotheses_fork_and_free():
    tops = {
        (): [(10, -0.1), (EOS, -0.5), (11, -1.0), (12, -2.0)],
        (10,): [(20, -0.2), (EOS, -0.3), (21, -3.0), (22, -4.0)],
        (11,): [(30, -0.1), (31, -0.2), (EOS, -0.5), (32, -0.6)],
        (10, 20): [(40, -0.05), (41, -0.1), (42, -5.0), (43, -6.0)],
        (11, 30): [(50, -0.1), (51, -0.2), (52, -0.3), (53, -0.4)],
        (10, 20, 40): [(60, -1.0), (61, -1.1), (62, -1.2), (63, -1.3)],
        (10, 20, 41): [(70, -0.1), (71, -1.5), (72, -1.6), (73, -1.7)],
    }
    out, live = run_rules(tops, BeamSearchParams(beam_width=2, max_tokens=4))
    # step 1: EOS at rank 1 is a hypothesis; 10 and 11 run. Step 2: one child each.
    # step 3: beam (10, 20) forks into two, beam (11, 30) falls out (freed at once).
    assert live[:3] == [[(10,), (11,)], [(10, 20), (11, 30)], [(10, 20, 40), (10, 20, 41)]]
    got = [(o.token_ids, round(o.cumulative_logprob, 6), o.finish_reason) for o in out.outputs]
    # final step scores: (10,20,41,70) -0.5/4 = -0.125 beats (10, EOS) -0.4/2 = -0.2,
    # which beats (10,20,40,60) -1.35/4 and (EOS,) -0.5/1
    assert got == [([10, 20, 41, 70], -0.5, "length"), ([10, EOS], -0.4, "stop")]
    assert out.outputs[1].text == "10 2"


def test_rules_early_stop_when_no_running_beam_can_win():
    tops = {
        (): [(EOS, -0.1), (10, -1.0), (11, -1.1), (12, -2.0)],
        (10,): [(EOS, -0.05), (20, -5.0), (21, -6.0), (22, -7.0)],
        (11,): [(30, -3.0), (EOS, -4.0), (31, -5.0), (32, -6.0)],
    }
    out, live = run_rules(tops, BeamSearchParams(beam_width=2, max_tokens=10))
    # after step 2 the best running beam, -4.1 / 2, cannot beat the worst hypothesis -0.525
    assert len(live) == 2
    assert [(o.token_ids, o.finish_reason) for o in out.outputs] == [
        ([EOS], "stop"),
        ([10, EOS], "stop"),
    ]


def test_rules_ignore_eos_keeps_eos_beams_running():
    tops = {(): [(EOS, -0.1), (10, -1.0), (11, -1.1), (12, -2.0)],
            (EOS,): [(40, -0.1), (41, -0.2), (42, -0.3), (43, -0.4)],
            (10,): [(50, -0.1), (51, -0.2), (52, -0.3), (53, -0.4)]}  # fmt: skip
    out, _ = run_rules(tops, BeamSearchParams(beam_width=2, max_tokens=2, ignore_eos=True))
    assert [o.token_ids for o in out.outputs] == [[EOS, 40], [EOS, 41]]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"beam_width": 0, "max_tokens": 4}, "beam_width"), ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
     ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty"),
     ({"beam_width": 2, "max_tokens": 4, "early_stopping": "sometimes"}, "early_stopping"),
     ({"beam_width": True, "max_tokens": 4}, "beam_width")],
)  # fmt: skip
def test_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        BeamSearchParams(**kwargs)


# ---- inside the engine, tiny random model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_llama(eos_token_id=EOS)


def make_llm(model, tokenizer, **options) -> LLM:
    options = {"num_blocks": 128, "max_model_len": 256, "block_size": 8} | options
    return LLM.from_engine(LLMEngine(EngineConfig(**options), model=model, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def llm(tiny, default_model_dir):
    return make_llm(tiny, Tokenizer.from_dir(default_model_dir))


PROMPT = list(range(300, 321))  # 21 tokens: 2 full blocks + a partial one at block_size 8
PARAMS = BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llm):
    return llm.beam_search([PROMPT], PARAMS)[0]


def test_beams_share_blocks_and_free_them_at_once(llm, alone):
    engine = llm.engine
    engine.add_beam_request("b", PROMPT, PARAMS)
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        sched = engine.scheduler
        sched.check_invariants()
        if engine.has_unfinished_requests():
            # exactly w live beams: a beam that falls out is finished in the step it does
            assert len(sched.running) == 4 and not sched.waiting
            tables = [s.block_table for s in sched.running]
            assert all(t[:2] == tables[0][:2] for t in tables)  # the full prompt blocks, shared
            assert sched.stats.blocks_in_use < sum(len(t) for t in tables)
    assert steps == PARAMS.max_tokens and engine.scheduler.stats.blocks_in_use == 0
    # the second run hits the prefix cache (other step shapes): logprobs agree to float noise
    assert [o.token_ids for o in outs[0].outputs] == [s.token_ids for s in alone.sequences]
    np.testing.assert_allclose([o.cumulative_logprob for o in outs[0].outputs],
                               [s.cumulative_logprob for s in alone.sequences], atol=1e-4)  # fmt: skip
    scores = [s.score for s in alone.sequences]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(s.token_ids) for s in alone.sequences}) == 4


def test_beam_search_same_in_a_busy_batch_and_under_preemption(tiny, llm, alone):
    engine = llm.engine
    rng = np.random.default_rng(1)
    for i in range(5):
        engine.add_request(f"g{i}", rng.integers(100, 40000, 30).tolist(),
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))  # fmt: skip
    busy = llm.beam_search([PROMPT, PROMPT[::-1]], PARAMS)
    while engine.has_unfinished_requests():
        engine.step()
    assert [s.token_ids for s in busy[0].sequences] == [s.token_ids for s in alone.sequences]
    # a pool too small for both requests' beams: beams get preempted, requests restart
    small = make_llm(tiny, llm.get_tokenizer(), num_blocks=14)
    again = small.beam_search([PROMPT, PROMPT[::-1]], PARAMS)
    assert small.engine.stats.num_preemptions > 0
    for a, b in zip(again, busy, strict=True):
        assert [s.token_ids for s in a.sequences] == [s.token_ids for s in b.sequences]
        np.testing.assert_allclose([s.score for s in a.sequences], [s.score for s in b.sequences],
                                   atol=1e-5)  # fmt: skip
    assert small.engine.scheduler.stats.blocks_in_use == 0


def test_engine_rejects_beams_it_cannot_serve(tiny, llm):
    with pytest.raises(ValueError, match="beam_width must be <= 10"):
        llm.beam_search([PROMPT], BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(ValueError, match="beam_width is 4 but max_num_seqs is 2"):
        make_llm(tiny, llm.get_tokenizer(), max_num_seqs=2).beam_search([PROMPT], PARAMS)
    with pytest.raises(ValueError, match="needs up to 14 blocks but the KV pool has 13"):
        make_llm(tiny, llm.get_tokenizer(), num_blocks=14).beam_search(
            [PROMPT], BeamSearchParams(beam_width=4, max_tokens=20)
        )
    engine = llm.engine
    engine.add_beam_request("x", PROMPT, PARAMS)
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        engine.add_request("x", PROMPT)
    engine.step()
    engine.abort_request("x")
    assert not engine.has_unfinished_requests() and engine.scheduler.stats.blocks_in_use == 0
