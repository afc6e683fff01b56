"""Continuous batching equals one-request-at-a-time on workload W (default model, greedy).

    .venv/bin/python benchmarks/consistency.py [--num-requests 64]

Runs W one request at a time, then batched three ways: default pool, a pool small
enough to force preemption, and a token budget small enough to force chunked prefill.
Prints one JSON line per run: token-exact agreement with the one-at-a-time outputs and
the preemption count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import workload_w  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=64)
    args = parser.parse_args()
    cmd = f".venv/bin/python benchmarks/consistency.py --num-requests {args.num_requests}"
    import jpaged
    from jpaged.sampling_params import SamplingParams

    prompts, out_lens = workload_w(args.num_requests)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    llm = jpaged.LLM(warmup="none")
    t0 = time.perf_counter()
    alone = [
        llm.generate([p], [sp], use_tqdm=False)[0].outputs[0].token_ids
        for p, sp in zip(prompts, params, strict=True)
    ]
    print(
        json.dumps(
            {
                "run": "one_at_a_time",
                "requests": len(prompts),
                "seconds": round(time.perf_counter() - t0, 1),
                "cmd": cmd,
            }
        ),
        flush=True,
    )
    del llm
    # peak need of W is ~723 blocks of 16 tokens; 300 forces preemption
    runs = {
        "batched": {},
        "small_pool": {"num_blocks": 300},
        "small_budget": {"max_num_batched_tokens": 64, "max_num_seqs": 64},
    }
    for name, options in runs.items():
        llm = jpaged.LLM(warmup="none", **options)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        print(json.dumps({
            "run": name, "options": options, "requests": len(prompts),
            "identical_requests": sum(a == b for a, b in zip(got, alone, strict=True)),
            "all_identical": got == alone, "preemptions": llm.engine.stats.num_preemptions,
            "steps": llm.engine.stats.num_steps, "seconds": round(time.perf_counter() - t0, 1), "cmd": cmd,
        }), flush=True)  # fmt: skip
        del llm


if __name__ == "__main__":
    main()
