"""Parallel sampling (n > 1) with a seed: the same samples alone and in a busy batch, and the
n samples read one copy of the prompt's blocks (exact block-manager counts)."""

from __future__ import annotations

import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer
from tests.util import tiny_random_llama

PROMPT = list(range(300, 321))  # 21 tokens: 2 full blocks + 5 tokens of a third at size 8
N4 = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=7, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(default_model_dir):
    model = tiny_random_llama()
    engine = LLMEngine(EngineConfig(num_blocks=128, max_model_len=256, block_size=8),
                       model=model, tokenizer=Tokenizer.from_dir(default_model_dir))  # fmt: skip
    return LLM.from_engine(engine)


def samples(out) -> list[list[int]]:
    return [o.token_ids for o in out.outputs]


def test_seeded_n4_same_alone_and_in_a_busy_batch(llm):
    alone = samples(llm.generate([PROMPT], N4, use_tqdm=False)[0])
    assert len(alone) == 4 and len({tuple(s) for s in alone}) == 4
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 40000, int(rng.integers(5, 40))).tolist() for _ in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=3, ignore_eos=True)] * 2  # fmt: skip
    outs = llm.generate(prompts[:3] + [PROMPT] + prompts[3:], params[:3] + [N4] + params[3:],
                        use_tqdm=False)  # fmt: skip
    assert samples(outs[3]) == alone
    assert llm.engine.scheduler.stats.blocks_in_use == 0


def test_n4_samples_share_the_prompt_blocks(llm):
    engine = llm.engine
    bm = engine.scheduler.block_manager
    engine.add_request("p", PROMPT, N4)
    engine.step()  # the prompt, then 4 samples forked from it
    tables = [s.block_table for s in engine.scheduler.running]
    assert len(tables) == 4 and all(t == tables[0] for t in tables)
    assert [bm.blocks[b].ref_count for b in tables[0]] == [4, 4, 4]
    assert bm.num_used_blocks == 3  # not 4 * 3
    engine.step()  # each sample writes its first token into the shared partial block: 3 copies
    tables = [s.block_table for s in engine.scheduler.running]
    assert all(t[:2] == tables[0][:2] for t in tables) and len({t[2] for t in tables}) == 4
    assert [bm.blocks[b].ref_count for b in tables[0][:2]] == [4, 4]
    assert bm.num_used_blocks == 2 + 4  # not 4 * 3
    engine.scheduler.check_invariants()
    while engine.has_unfinished_requests():
        engine.step()
    assert bm.num_used_blocks == 0
