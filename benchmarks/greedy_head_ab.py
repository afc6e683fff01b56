"""W with greedy ids straight from the head kernel (fast_greedy_head) vs from the logits.

    .venv/bin/python benchmarks/greedy_head_ab.py [--dtype float32] [--rounds 2] [--ngram]

f32: linear_cpu.head_argmax (bf16 screen, exact f32 recompute) vs the f32 head's logits;
bf16: linear_cpu.linear_argmax (the argmax inside the AMX head) vs its logits. Two `LLM`s in
one process (fast_greedy_head True / False, both warmed up on the decode shapes), W run on each in interleaved rounds (alternating order, prompts shifted per round;
benchmarks/workload.py). --ngram: both speculate (n-gram, k = 3), as make bench's second
jpaged run does. Prints one JSON line per (round, engine) and a last one with the ratio of the
summed times and whether the outputs were identical every round.
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

CMD = ".venv/bin/python benchmarks/greedy_head_ab.py " + " ".join(sys.argv[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ngram", action="store_true", help="both engines speculate (k = 3)")
    args = parser.parse_args()
    import jpaged

    spec = {"method": "ngram", "num_speculative_tokens": 3} if args.ngram else None
    engines = {
        name: jpaged.LLM(
            dtype=args.dtype, warmup="decode", speculative_config=spec, fast_greedy_head=fast
        )  # fmt: skip
        for name, fast in (("fast", True), ("logits", False))
    }
    runner = engines["fast"].engine.runner
    if not (runner.head_screening or runner.head_argmax):
        sys.exit("no fast greedy head on this machine (needs the cpu linears and AMX-BF16)")
    seconds = dict.fromkeys(engines, 0.0)
    hashes: dict[int, set[str]] = {}
    for run in interleaved_w_rounds(engines, args.rounds):
        seconds[run.engine] += run.seconds
        hashes.setdefault(run.round, set()).add(run.outputs_sha256)
        print(json.dumps({
            "bench": "greedy_head_ab", "dtype": args.dtype, "round": run.round, "engine": run.engine,
            "ngram": args.ngram, "output_tok_s": round(run.tokens / run.seconds, 1),
            "seconds": round(run.seconds, 2), "outputs_sha256": run.outputs_sha256, "cmd": CMD,
        }), flush=True)  # fmt: skip
    print(json.dumps({
        "bench": "greedy_head_ab", "dtype": args.dtype, "ngram": args.ngram,
        "logits_over_fast_time": round(seconds["logits"] / seconds["fast"], 3),
        "outputs_identical": all(len(h) == 1 for h in hashes.values()), "cmd": CMD,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
