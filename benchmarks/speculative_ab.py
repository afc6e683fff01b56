"""N-gram speculative decoding on W: two engines in one process, interleaved rounds.

    .venv/bin/python benchmarks/speculative_ab.py [--dtype bfloat16] [--rounds 3] [--k 3]
        [--schedule '[[1, 24, 3], [25, 256, 0]]']

One `LLM` decodes plainly, the other with speculative_config {"method": "ngram",
"num_speculative_tokens": k}; with --schedule a third one adds that
num_speculative_tokens_per_batch_size. All warm up their decode (and verify) shapes first. Each
round runs W on both, in alternating order, with every prompt's first token changed so the
prefix cache never serves a round from the one before. Prints one JSON line per (round,
engine) with tok/s, steps and drafts kept, and a last line with the ratio of the summed
times and whether every round's outputs were identical between the engines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import VOCAB, workload_w  # noqa: E402

CMD = ".venv/bin/python benchmarks/speculative_ab.py " + " ".join(sys.argv[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--schedule", type=json.loads, default=None,
                        help="num_speculative_tokens_per_batch_size for a third engine")  # fmt: skip
    args = parser.parse_args()
    import jpaged
    from jpaged.sampling_params import SamplingParams

    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    engines = {
        "plain": jpaged.LLM(dtype=args.dtype, warmup="decode"),
        "ngram": jpaged.LLM(dtype=args.dtype, warmup="decode", speculative_config=spec),
    }
    if args.schedule is not None:
        scheduled = {**spec, "num_speculative_tokens_per_batch_size": args.schedule}
        engines["ngram_schedule"] = jpaged.LLM(
            dtype=args.dtype, warmup="decode", speculative_config=scheduled
        )
    prompts, out_lens = workload_w()
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    seconds = dict.fromkeys(engines, 0.0)
    identical = True
    for r in range(args.rounds):
        shifted = [[(p[0] + 7 * (r + 1)) % VOCAB] + p[1:] for p in prompts]
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        hashes = {}
        for name in order:
            llm = engines[name]
            stats = llm.engine.stats
            steps0, drafts0, kept0 = (
                stats.num_steps,
                stats.spec_draft_tokens,
                stats.spec_accepted_tokens,
            )
            t0 = time.perf_counter()
            outs = llm.generate(shifted, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            seconds[name] += dt
            ids = [list(o.outputs[0].token_ids) for o in outs]
            tokens = sum(len(t) for t in ids)
            hashes[name] = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
            print(json.dumps({
                "bench": "speculative_ab", "dtype": args.dtype, "round": r, "engine": name,
                "output_tok_s": round(tokens / dt, 1), "seconds": round(dt, 2),
                "steps": stats.num_steps - steps0,
                "drafts": stats.spec_draft_tokens - drafts0,
                "drafts_kept": stats.spec_accepted_tokens - kept0,
                "outputs_sha256": hashes[name], "cmd": CMD,
            }), flush=True)  # fmt: skip
        identical &= len(set(hashes.values())) == 1
    ratios = {f"plain_over_{n}_time": round(seconds["plain"] / t, 3) for n, t in seconds.items()}
    del ratios["plain_over_plain_time"]
    print(json.dumps({
        "bench": "speculative_ab", "dtype": args.dtype, "k": args.k, "schedule": args.schedule,
        **ratios, "outputs_identical": identical, "cmd": CMD,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
