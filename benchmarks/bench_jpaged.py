"""jpaged on workload W (the worker that benchmarks/throughput.py starts); prints one JSON line.

    .venv/bin/python benchmarks/bench_jpaged.py --dtype bfloat16

start_s runs from the start of main() (before `import jpaged`) to a constructed, warmed-up
`jpaged.LLM`; first_token_after_start_s is one 1-token request after that.
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

from agreement import output_record  # noqa: E402
from workload import workload_w  # noqa: E402


def add_jpaged_args(parser: argparse.ArgumentParser) -> None:
    """The engine options this worker takes (throughput.py passes them through)."""
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", default="prefill", choices=["none", "decode", "prefill", "all"])
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "xla"])
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--linear-backend", default="auto", choices=["auto", "cpu", "xla"])
    parser.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the engine's")  # fmt: skip
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help='JSON, e.g. {"method": "ngram", "num_speculative_tokens": 3}')  # fmt: skip


def run_jpaged(args: argparse.Namespace, t_start: float) -> dict:
    """Run W once on jpaged; the JSON-ready result with the output ids (see agreement.py)."""
    import jpaged
    from jpaged.sampling_params import SamplingParams

    extra = {} if args.unroll_layers is None else {"unroll_layers": args.unroll_layers}
    if args.speculative_config is not None:
        extra["speculative_config"] = args.speculative_config
    llm = jpaged.LLM(dtype=args.dtype, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                     max_num_batched_tokens=args.max_num_batched_tokens, warmup=args.warmup,
                     attention_backend=args.attention_backend,
                     linear_backend=args.linear_backend, kv_cache_dtype=args.kv_cache_dtype, **extra)  # fmt: skip
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
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    useful = sum(len(t) for t in token_ids)
    if useful != sum(out_lens):
        raise RuntimeError(f"jpaged produced {useful} tokens, W asks for {sum(out_lens)}")
    stats = engine.stats
    return {
        "engine": "jpaged",
        "mode": "continuous+ngram" if args.speculative_config else "continuous",
        "dtype": args.dtype,
        "block_size": args.block_size,
        "attention_backend": engine.runner.attention_backend,
        "linear_backend": engine.runner.linear_backend,
        "kv_cache_dtype": engine.config.jax_kv_dtype(),
        "unroll_layers": isinstance(engine.runner.params["layers"], list),
        "requests": len(prompts),
        "output_tokens": useful,
        "seconds": round(elapsed, 2),
        "output_tok_s": round(useful / elapsed, 1),
        "start_s": round(start_s, 2),
        "first_token_after_start_s": round(first_token_s, 3),
        "steps": stats.num_steps,
        "speculative_config": args.speculative_config,
        "spec_draft_tokens": stats.spec_draft_tokens,
        "spec_accepted_tokens": stats.spec_accepted_tokens,
        "compilations_total": engine.runner.num_compilations,
        "compilations_during_w": engine.runner.num_compilations - compiles_before,
        "preemptions": stats.num_preemptions,
        "peak_kv_blocks": peak["blocks"],
        "tokens_held_at_peak": peak["tokens"],
        "peak_block_slots_over_tokens_held": round(
            peak["blocks"] * stats.block_size / max(peak["tokens"], 1), 3
        ),
        **output_record(token_ids),
    }


def main() -> None:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_jpaged_args(parser)
    print(json.dumps(run_jpaged(parser.parse_args(), t_start)), flush=True)


if __name__ == "__main__":
    main()
