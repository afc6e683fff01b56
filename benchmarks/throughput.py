"""Throughput on workload W: jpaged against transformers static batching, in one run.

    .venv/bin/python benchmarks/throughput.py [--dtype float32] [--hf-batch-sizes 16,32]

Prints one JSON line per engine/configuration, then one with the ratios. The transformers
runs use .venv-ref (`make ref`); pass --hf-batch-sizes "" to skip them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import workload_w  # noqa: E402

CMD = "make bench  # or: .venv/bin/python benchmarks/throughput.py " + " ".join(sys.argv[1:])


def run_jpaged(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    import jpaged
    from jpaged.sampling_params import SamplingParams

    llm = jpaged.LLM(dtype=args.dtype, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                     max_num_batched_tokens=args.max_num_batched_tokens, warmup=args.warmup)  # fmt: skip
    engine = llm.engine
    start_s = time.perf_counter() - t_start
    prompts, out_lens = workload_w(args.num_requests)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    # time to first token on a fresh request, after start-up
    t0 = time.perf_counter()
    llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    first_token_s = time.perf_counter() - t0
    compiles_before = engine.runner.num_compilations
    peak = {"blocks": 0, "tokens": 0}
    step = engine.step

    def step_and_track() -> list:
        outs = step()
        blocks = engine.scheduler.stats.blocks_in_use
        if blocks > peak["blocks"]:  # tokens whose K/V the held blocks hold, at the peak
            held = sum(s.num_computed_tokens for s in engine.scheduler.running)
            peak.update(blocks=blocks, tokens=held)
        return outs

    engine.step = step_and_track
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    engine.step = step
    useful = sum(len(o.outputs[0].token_ids) for o in outs)
    assert useful == sum(out_lens)
    stats = engine.stats
    return {
        "engine": "jpaged",
        "mode": "continuous",
        "dtype": args.dtype,
        "block_size": args.block_size,
        "requests": len(prompts),
        "output_tokens": useful,
        "seconds": round(elapsed, 2),
        "output_tok_s": round(useful / elapsed, 1),
        "start_s": round(start_s, 2),
        "first_token_after_start_s": round(first_token_s, 3),
        "steps": stats.num_steps,
        "compilations_total": engine.runner.num_compilations,
        "compilations_during_w": engine.runner.num_compilations - compiles_before,
        "preemptions": stats.num_preemptions,
        "peak_kv_blocks": peak["blocks"],
        "tokens_held_at_peak": peak["tokens"],
        "peak_block_slots_over_tokens_held": round(
            peak["blocks"] * stats.block_size / max(peak["tokens"], 1), 3
        ),
        "cmd": CMD,
    }


def run_hf(batch_size: int, args: argparse.Namespace) -> dict | None:
    ref = os.environ.get("JPAGED_REF_PYTHON") or str(ROOT / ".venv-ref" / "bin" / "python")
    if not Path(ref).exists():
        return None
    from jpaged.gguf_import import default_gguf_path

    gguf = default_gguf_path()
    out = subprocess.run(
        [ref, str(ROOT / "benchmarks" / "ref_hf_static.py"), str(gguf.parent), gguf.name,
         str(batch_size), args.dtype, str(args.num_requests)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    line = json.loads(out.stdout.strip().splitlines()[-1])
    line["cmd"] = CMD
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hf-batch-sizes", default="16,32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", default="decode", choices=["none", "decode", "all"])
    args = parser.parse_args()
    results = [run_jpaged(args)]
    print(json.dumps(results[0]), flush=True)
    for bs in [int(b) for b in args.hf_batch_sizes.split(",") if b]:
        line = run_hf(bs, args)
        if line:
            results.append(line)
            print(json.dumps(line), flush=True)
    jp = results[0]["output_tok_s"]
    ratios = {
        f"jpaged/{r['engine']}_{r['mode']}": round(jp / r["output_tok_s"], 2) for r in results[1:]
    }
    print(json.dumps({"ratios": ratios, "dtype": args.dtype, "cmd": CMD}))


if __name__ == "__main__":
    main()
