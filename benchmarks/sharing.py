"""KV blocks saved by sharing (parallel sampling, beam search) and by prefix caching.

    .venv/bin/python benchmarks/sharing.py                   # everything, default model
    .venv/bin/python benchmarks/sharing.py --model tiny      # fast: random 2-layer model
    .venv/bin/python benchmarks/sharing.py --only sampling   # sampling | beam | prefix

Sharing: every request of a profile is queued at once (n samples or a beam search of width
w each, ignore_eos so lengths are the profile's). After each schedule() (blocks allocated
for the step) it records the blocks in use (shared: forks and beams read one copy of
common blocks) and the sum of all live block tables (what the same sequences hold when
nothing is shared: every sample or beam with its own copy). saving = 1 - shared / unshared,
at the peak and over the whole run (block-steps), as vLLM's paper reports (fig. 15).

Profiles (seeded, like vLLM paper's fig. 11 means): alpaca, prompts ~19 tokens and outputs
~58; sharegpt, prompts ~161 and outputs ~338 (log-normal, clipped).

Prefix caching: requests sharing a long system prompt, one after another; prefix-cache hit
rate and time to first token with caching on and off (each after a warm-up pass with
another system prompt, so compilation is not timed). One JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CMD = ".venv/bin/python benchmarks/sharing.py"

PROFILES = {  # (prompt mean, prompt clip), (output mean, output clip)
    "alpaca": ((19.3, (4, 128)), (58.5, (8, 256))),
    "sharegpt": ((161.3, (16, 1024)), (338.0, (32, 1024))),
}


def lengths(mean: float, clip: tuple[int, int], n: int, rng: np.random.Generator) -> list[int]:
    """n log-normal lengths rescaled to the given sample mean, then clipped."""
    raw = rng.lognormal(0.0, 0.6, n)
    return np.clip(np.round(raw * mean / raw.mean()), *clip).astype(int).tolist()


def profile_requests(name: str, num: int, vocab: int) -> list[tuple[list[int], int]]:
    """num (prompt token ids, output length) pairs, the same on every run."""
    rng = np.random.default_rng(sum(map(ord, name)))
    (pm, pc), (om, oc) = PROFILES[name]
    p_lens, o_lens = lengths(pm, pc, num, rng), lengths(om, oc, num, rng)
    return [
        (rng.integers(100, vocab - 100, p).tolist(), o) for p, o in zip(p_lens, o_lens, strict=True)
    ]


def make_engine(model_name: str, **options):  # noqa: ANN201
    from jpaged.config import EngineConfig
    from jpaged.engine import LLMEngine

    options = {"max_model_len": 2048, "block_size": 16, "warmup": "none"} | options
    if model_name == "default":
        return LLMEngine(EngineConfig(**options))
    import jax.numpy as jnp

    from jpaged.tokenizer import Tokenizer
    from jpaged.weights import resolve_model
    from models.config import tiny_llama_config
    from models.llama import llama_from_hf_tensors
    from tests.util import random_llama_tensors

    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                               head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                               eos_token_id=2)  # fmt: skip
    model = llama_from_hf_tensors(config, random_llama_tensors(config, 3).items(), jnp.float32)
    tok = Tokenizer.from_dir(resolve_model(None))
    return LLMEngine(EngineConfig(**options), model=model, tokenizer=tok)


def measure_sharing(engine, add_all) -> dict:  # noqa: ANN001
    """Run add_all(engine)'s requests to the end, recording blocks after every schedule()."""
    sched = engine.scheduler
    bm = sched.block_manager
    shared, unshared = [], []
    schedule = sched.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        shared.append(bm.num_used_blocks)
        unshared.append(sum(len(s.block_table) for s in sched.running))
        return out

    sched.schedule = recording_schedule
    t0 = time.perf_counter()
    add_all(engine)
    while engine.has_unfinished_requests():
        engine.step()
    sched.schedule = schedule
    assert engine.stats.num_preemptions == 0 and bm.num_used_blocks == 0
    peak_s, peak_u = max(shared), max(unshared)
    return {
        "peak_blocks_shared": peak_s,
        "peak_blocks_unshared": peak_u,
        "saving_at_peak": round(1 - peak_s / peak_u, 4),
        "saving_block_steps": round(1 - sum(shared) / sum(unshared), 4),
        "steps": len(shared),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_sharing(args: argparse.Namespace, kind: str) -> None:
    from jpaged.beam_search import BeamSearchParams
    from jpaged.sampling_params import SamplingParams

    for profile in args.profiles:
        reqs = profile_requests(profile, args.requests[profile], 49152)
        for width in (2, 4, 6):
            engine = make_engine(
                args.model, num_blocks=args.num_blocks, enable_prefix_caching=False
            )

            def add_all(engine, width=width, reqs=reqs) -> None:  # noqa: ANN001
                for i, (prompt, out_len) in enumerate(reqs):
                    if kind == "beam":
                        bp = BeamSearchParams(beam_width=width, max_tokens=out_len, ignore_eos=True)
                        engine.add_beam_request(f"b{i}", prompt, bp)
                    else:
                        sp = SamplingParams(n=width, temperature=1.0, seed=i, max_tokens=out_len,
                                            ignore_eos=True)  # fmt: skip
                        engine.add_request(f"s{i}", prompt, sp)

            row = {"bench": "sharing", "kind": "beam_search" if kind == "beam" else
                   "parallel_sampling", "width": width, "profile": profile, "model": args.model,
                   "requests": len(reqs),
                   "mean_prompt": round(float(np.mean([len(p) for p, _ in reqs])), 1),
                   "mean_output": round(float(np.mean([o for _, o in reqs])), 1)}  # fmt: skip
            row |= measure_sharing(engine, add_all)
            print(json.dumps(row), flush=True)


def run_prefix(args: argparse.Namespace) -> None:
    from jpaged.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    sys_len, num = args.system_prompt_tokens, args.prefix_requests

    def batch(seed: int) -> list[list[int]]:
        r = np.random.default_rng(seed)
        system = r.integers(100, 40000, sys_len).tolist()
        return [system + r.integers(100, 40000, int(r.integers(16, 48))).tolist()
                for _ in range(num)]  # fmt: skip

    for caching in (False, True):
        engine = make_engine(args.model, num_blocks=args.num_blocks, enable_prefix_caching=caching)
        ttfts = []
        for phase, prompts in (("warmup", batch(1)), ("measured", batch(2))):
            q0, h0 = engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits
            ttfts = []
            for i, prompt in enumerate(prompts):  # one at a time: TTFT is the prefill's time
                engine.add_request(f"{phase}{i}", prompt, sp)
                first = None
                t0 = time.perf_counter()
                while engine.has_unfinished_requests():
                    outs = engine.step()
                    if first is None and any(o.outputs[0].token_ids for o in outs):
                        first = time.perf_counter() - t0
                ttfts.append(first)
            queries = engine.stats.prefix_cache_queries - q0
            hits = engine.stats.prefix_cache_hits - h0
        row = {"bench": "prefix_caching", "model": args.model, "prefix_caching": caching,
               "system_prompt_tokens": sys_len, "requests": num,
               "hit_rate": round(hits / queries, 4) if queries else 0.0,
               "ttft_first_s": round(ttfts[0], 4),
               "ttft_rest_mean_s": round(float(np.mean(ttfts[1:])), 4)}  # fmt: skip
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--only", choices=["sampling", "beam", "prefix"], action="append")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--alpaca-requests", type=int, default=16)
    ap.add_argument("--sharegpt-requests", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--system-prompt-tokens", type=int, default=768)
    ap.add_argument("--prefix-requests", type=int, default=8)
    args = ap.parse_args()
    args.requests = {"alpaca": args.alpaca_requests, "sharegpt": args.sharegpt_requests}
    only = args.only or ["sampling", "beam", "prefix"]
    print(json.dumps({"command": " ".join([CMD, *sys.argv[1:]])}), flush=True)
    for kind in ("sampling", "beam"):
        if kind in only:
            run_sharing(args, kind)
    if "prefix" in only:
        run_prefix(args)


if __name__ == "__main__":
    main()
