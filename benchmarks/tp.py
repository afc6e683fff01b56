"""Tensor-parallel overhead on workload W: the default model at tp=1 and tp=2 on 2 CPU devices.

    .venv/bin/python benchmarks/tp.py [--num-requests 64] [--tp 1,2] [--devices 2]

Both configurations run in one process that sees `--devices` CPU devices (set before jax
starts), one after the other. Each runs W twice with prefix caching off, so the second,
timed pass has the same schedule and finds every step shape compiled. Prints one JSON line
per configuration and one with the ratio and whether the greedy tokens matched.
On a CPU the devices share the same cores: this measures the cost of the collectives and
of the split programs, not a speed-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-num-seqs", type=int, default=64)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    from workload import workload_w

    from jpaged.llm import LLM
    from jpaged.sampling_params import SamplingParams

    cmd = "benchmarks/tp.py " + " ".join(sys.argv[1:])
    prompts, out_lens = workload_w(args.num_requests)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    results, tokens = [], {}
    for tp in [int(t) for t in args.tp.split(",")]:
        t0 = time.perf_counter()
        llm = LLM(dtype=args.dtype, tensor_parallel_size=tp, max_num_seqs=args.max_num_seqs,
                  enable_prefix_caching=False, warmup="decode",
                  num_blocks=len(prompts) * 32 + 1)  # every request at 512 tokens  # fmt: skip
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)  # compiles the prefill shapes
        cold_s = time.perf_counter() - t0
        compiled = llm.engine.runner.num_compilations
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        warm_s = time.perf_counter() - t0
        tokens[tp] = [o.outputs[0].token_ids for o in outs]
        useful = sum(len(t) for t in tokens[tp])
        line = {
            "engine": "jpaged", "tp": tp, "devices": len(jax.devices()), "dtype": args.dtype,
            "requests": len(prompts), "output_tokens": useful, "seconds": round(warm_s, 2),
            "output_tok_s": round(useful / warm_s, 1), "first_pass_s": round(cold_s, 2),
            "start_s": round(start_s, 2),
            "compilations_in_timed_pass": llm.engine.runner.num_compilations - compiled,
            "kv_pool_shard_shape": list(llm.engine.runner.kv_pool.addressable_shards[0].data.shape),
            "cmd": cmd,
        }  # fmt: skip
        results.append(line)
        print(json.dumps(line), flush=True)
        del llm, outs
        gc.collect()
    base = results[0]
    print(json.dumps({
        "ratios": {f"tp{r['tp']}/tp{base['tp']}": round(r["output_tok_s"] / base["output_tok_s"], 3)
                   for r in results[1:]},
        "tokens_equal": {f"tp{r['tp']}": tokens[r["tp"]] == tokens[base["tp"]] for r in results[1:]},
        "cmd": cmd,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
