"""LLMEngine / LLM on a tiny random model: continuous batching equals one-at-a-time."""

from __future__ import annotations

import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer
from tests.util import tiny_random_llama

VOCAB = 49152  # SmolLM2's tokenizer, so outputs detokenize


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_random_llama(VOCAB)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def make_llm(model, tokenizer, **options) -> LLM:
    options.setdefault("num_blocks", 256)
    options.setdefault("max_model_len", 512)
    options.setdefault("warmup", "none")
    return LLM.from_engine(LLMEngine(EngineConfig(**options), model=model, tokenizer=tokenizer))


def workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, VOCAB - 100, int(rng.integers(4, 60))).tolist() for _ in range(n)]
    params = [
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=int(rng.integers(4, 40)))
        for _ in range(n)
    ]
    return prompts, params


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def one_at_a_time(tiny_model, tokenizer):
    prompts, params = workload(12)
    llm = make_llm(tiny_model, tokenizer)
    return [
        token_ids(llm.generate([p], [sp], use_tqdm=False))[0]
        for p, sp in zip(prompts, params, strict=True)
    ]


def test_batched_equals_one_at_a_time(tiny_model, tokenizer, one_at_a_time):
    prompts, params = workload(12)
    llm = make_llm(tiny_model, tokenizer)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(outs) == one_at_a_time
    assert [len(t) for t in one_at_a_time] == [p.max_tokens for p in params]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.scheduler.stats.blocks_in_use == 0


def test_preemption_keeps_outputs(tiny_model, tokenizer, one_at_a_time):
    prompts, params = workload(12)
    llm = make_llm(tiny_model, tokenizer, num_blocks=24, block_size=8)
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == one_at_a_time
    assert llm.engine.stats.num_preemptions > 0
    print("preemptions:", llm.engine.stats.num_preemptions)


def test_chunked_prefill_keeps_outputs(tiny_model, tokenizer, one_at_a_time):
    prompts, params = workload(12)
    llm = make_llm(tiny_model, tokenizer, max_num_batched_tokens=16, max_num_seqs=8)
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == one_at_a_time


def test_compilations_bounded_and_none_after_warmup(tiny_model, tokenizer):
    from jpaged.step_shapes import all_step_shapes

    prompts, params = workload(12)
    llm = make_llm(tiny_model, tokenizer, max_num_seqs=4, max_num_batched_tokens=32, warmup="all")
    engine = llm.engine
    after_warmup = engine.runner.num_compilations
    assert after_warmup == len(all_step_shapes(4, 32))
    llm.generate(prompts, params, use_tqdm=False)
    assert engine.runner.num_compilations == after_warmup


def test_prefill_warmup_covers_a_burst_of_full_budget_prompts(tiny_model, tokenizer):
    """warmup="prefill": a burst of prompts that fills whole token budgets compiles nothing
    new; with warmup="decode" the same burst compiles its prefill shapes on first use."""
    prompts = [[100 + i] * 64 for i in range(2)]  # steps of 64 prompt tokens, then decodes
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=3)
    compiled = {}
    for warmup in ("decode", "prefill"):
        llm = make_llm(tiny_model, tokenizer, max_num_seqs=4, max_num_batched_tokens=64,
                       warmup=warmup)  # fmt: skip
        before = llm.engine.runner.num_compilations
        llm.generate(prompts, params, use_tqdm=False)
        compiled[warmup] = llm.engine.runner.num_compilations - before
    assert compiled["decode"] > 0
    assert compiled["prefill"] == 0


def test_prompt_too_long_is_rejected(tiny_model, tokenizer):
    llm = make_llm(tiny_model, tokenizer, max_model_len=64)
    with pytest.raises(ValueError, match="70 tokens but max_model_len is 64"):
        llm.generate([[5] * 70], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(tiny_model, tokenizer):
    llm = make_llm(tiny_model, tokenizer)
    engine = llm.engine
    engine.add_request("a", [7] * 40, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", [8] * 20, SamplingParams(max_tokens=3, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.stats.blocks_in_use == 0


def test_stop_token_and_min_tokens(tiny_model, tokenizer):
    llm = make_llm(tiny_model, tokenizer)
    prompt = [11, 12, 13, 14]
    free = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    ids = free[0].outputs[0].token_ids
    stop_id = ids[5]
    first = ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert out.token_ids == ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_seeded_sampling_same_alone_and_in_batch(tiny_model, tokenizer):
    llm = make_llm(tiny_model, tokenizer)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = token_ids(llm.generate([[21, 22, 23]], sp, use_tqdm=False))[0]
    prompts, params = workload(6, seed=5)
    mixed = llm.generate(
        prompts[:3] + [[21, 22, 23]] + prompts[3:], params[:3] + [sp] + params[3:], use_tqdm=False
    )
    assert token_ids(mixed)[3] == alone


def test_parallel_sampling_shares_prompt_blocks(tiny_model, tokenizer):
    llm = make_llm(tiny_model, tokenizer, block_size=8)
    engine = llm.engine
    sp = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    engine.add_request("r", list(range(100, 140)), sp)  # 40 tokens = 5 blocks
    engine.step()  # prefill + fork
    # 4 samples share the 5 prompt blocks; each child copied only the shared partial block? (40 = full)
    assert engine.scheduler.stats.blocks_in_use <= 5 + 4
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1]
    assert len(final.outputs) == 4 and all(len(o.token_ids) == 6 for o in final.outputs)
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1


@pytest.mark.parametrize("budget", [2048, 16])
def test_prompt_logprobs_match_generation_logprobs(tiny_model, tokenizer, budget):
    """Scoring prompt + generated tokens gives the logprobs the generation reported."""
    llm = make_llm(tiny_model, tokenizer, max_num_batched_tokens=budget, max_num_seqs=8)
    prompt = [31, 32, 33, 34, 35]
    gen = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]  # fmt: skip
    full = prompt + gen.token_ids
    scored = llm.generate([full], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[
        0
    ]
    plp = scored.prompt_logprobs
    assert len(plp) == len(full) and plp[0] is None
    for i, tok in enumerate(gen.token_ids):
        entry = plp[len(prompt) + i]
        assert entry[tok].rank == 1  # greedy tokens are the top-1
        np.testing.assert_allclose(entry[tok].logprob, gen.logprobs[i][tok].logprob, atol=1e-4)
    assert all(len(e) in (2, 3) for e in plp[1:])  # top-2 plus the actual token


def test_screened_greedy_head_gives_the_same_tokens(tiny_model, tokenizer, one_at_a_time):
    """Greedy steps take their ids from linear_cpu.head_argmax where it can run (f32 head,
    cpu linears, AMX); ids must equal the full f32 logits' path, plain and speculative, and
    a request that wants logprobs turns the screen off for its steps only."""
    prompts, params = workload(12)
    screened = make_llm(tiny_model, tokenizer)
    if not screened.engine.runner.head_screening:
        pytest.skip("no head screening here (needs the cpu linears and AMX-BF16)")
    full = make_llm(tiny_model, tokenizer, fast_greedy_head=False)
    assert not full.engine.runner.head_screening
    want = token_ids(full.generate(prompts, params, use_tqdm=False))
    assert want == one_at_a_time  # one_at_a_time ran screened, one request at a time
    assert token_ids(screened.generate(prompts, params, use_tqdm=False)) == want
    spec = make_llm(tiny_model, tokenizer,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 3})  # fmt: skip
    assert token_ids(spec.generate(prompts, params, use_tqdm=False)) == want
    mixed = list(params)
    mixed[3] = SamplingParams(temperature=0, ignore_eos=True, max_tokens=params[3].max_tokens,
                              logprobs=1)  # fmt: skip
    outs = screened.generate(prompts, mixed, use_tqdm=False)
    assert token_ids(outs) == want


def test_cumulative_logprob_only_where_used(tiny_model, tokenizer):
    """As vLLM: None unless the request asks for logprobs or has n > 1 samples."""
    llm = make_llm(tiny_model, tokenizer)
    prompt = [[5, 6, 7, 8]]
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert plain[0].outputs[0].cumulative_logprob is None
    asked = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=0),
                         use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert asked.token_ids == plain[0].outputs[0].token_ids
    total = sum(next(iter(d.values())).logprob for d in asked.logprobs)
    assert asked.cumulative_logprob == pytest.approx(total) and asked.cumulative_logprob < 0
    two = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=4),
                       use_tqdm=False)[0]  # fmt: skip
    assert all(o.cumulative_logprob is not None and o.cumulative_logprob < 0 for o in two.outputs)


def test_bf16_greedy_ids_from_the_head_kernel_equal_the_logits_path(tokenizer):
    """bf16 on AMX: greedy steps take the argmax inside the head kernel (linear_argmax); the
    tokens must be those of the logits path."""
    import jax.numpy as jnp

    from models.llama import llama_from_hf_tensors
    from tests.util import random_llama_tensors

    config = tiny_random_llama(VOCAB).config
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.bfloat16)
    prompts, params = workload(8, seed=1)
    fast = make_llm(model, tokenizer, dtype="bfloat16")
    if not fast.engine.runner.head_argmax:
        pytest.skip("no fused head argmax here (needs the cpu linears and AMX-BF16)")
    logits = make_llm(model, tokenizer, dtype="bfloat16", fast_greedy_head=False)
    want = token_ids(logits.generate(prompts, params, use_tqdm=False))
    assert token_ids(fast.generate(prompts, params, use_tqdm=False)) == want
