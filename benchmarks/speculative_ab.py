"""N-gram speculative decoding on W: two engines in one process, interleaved rounds.

    .venv/bin/python benchmarks/speculative_ab.py [--dtype bfloat16] [--rounds 3] [--k 3]
        [--schedule '[[1, 24, 3], [25, 256, 0]]']

One `LLM` decodes plainly, the other with speculative_config {"method": "ngram",
"num_speculative_tokens": k}; with --schedule a third one adds that
num_speculative_tokens_per_batch_size (num_speculative_tokens its largest k). All warm up their decode (and verify) shapes first. Each
round runs W on both, in alternating order, with every prompt's first token changed so the
prefix cache never serves a round from the one before. Prints one JSON line per (round,
engine) with tok/s, steps and drafts kept, and a last line with the ratio of the summed
times and whether every round's outputs were identical between the engines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import interleaved_w_rounds  # noqa: E402

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

    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    engines = {
        "plain": jpaged.LLM(dtype=args.dtype, warmup="decode"),
        "ngram": jpaged.LLM(dtype=args.dtype, warmup="decode", speculative_config=spec),
    }
    if args.schedule is not None:
        top = max([args.k] + [k for _start, _end, k in args.schedule])  # the schedule's own cap
        scheduled = {**spec, "num_speculative_tokens": top,
                     "num_speculative_tokens_per_batch_size": args.schedule}  # fmt: skip
        engines["ngram_schedule"] = jpaged.LLM(
            dtype=args.dtype, warmup="decode", speculative_config=scheduled
        )
    seconds = dict.fromkeys(engines, 0.0)

    def counts_of(name: str) -> tuple[int, int, int]:  # steps, drafts, drafts kept so far
        stats = engines[name].engine.stats
        return stats.num_steps, stats.spec_draft_tokens, stats.spec_accepted_tokens

    counts = {n: counts_of(n) for n in engines}
    hashes: dict[int, set[str]] = {}
    for run in interleaved_w_rounds(engines, args.rounds):
        now = counts_of(run.engine)
        steps, drafts, kept = (a - b for a, b in zip(now, counts[run.engine], strict=True))
        counts[run.engine] = now
        seconds[run.engine] += run.seconds
        hashes.setdefault(run.round, set()).add(run.outputs_sha256)
        print(json.dumps({
            "bench": "speculative_ab", "dtype": args.dtype, "round": run.round,
            "engine": run.engine, "output_tok_s": round(run.tokens / run.seconds, 1),
            "seconds": round(run.seconds, 2), "steps": steps, "drafts": drafts,
            "drafts_kept": kept, "outputs_sha256": run.outputs_sha256, "cmd": CMD,
        }), flush=True)  # fmt: skip
    identical = all(len(h) == 1 for h in hashes.values())
    ratios = {f"plain_over_{n}_time": round(seconds["plain"] / t, 3) for n, t in seconds.items()}
    del ratios["plain_over_plain_time"]
    print(json.dumps({
        "bench": "speculative_ab", "dtype": args.dtype, "k": args.k, "schedule": args.schedule,
        **ratios, "outputs_identical": identical, "cmd": CMD,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
