"""W with the `cpu` linears computing every row of a padded step vs only its real rows.

    .venv/bin/python benchmarks/padding_ab.py [--dtype float32] [--rounds 3]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 3}']

Two `LLM`s in one process. "live_rows" is the engine as shipped: the batch carries the real
token and row counts (ModelBatch.num_tokens / num_rows) and the linears and the head skip the
padding. "all_rows" drops those counts from every batch, so its linears compute the whole
bucket (as before they existed). Rounds alternate the order and shift every prompt's first
token (no prefix-cache hits across rounds). Prints one JSON line per (round, engine) and the
ratio of the summed times over rounds 1.. (round 0 holds the prefill compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import interleaved_w_rounds  # noqa: E402

CMD = ".venv/bin/python benchmarks/padding_ab.py " + " ".join(sys.argv[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speculative-config", type=json.loads, default=None)
    args = parser.parse_args()
    import jpaged

    def make() -> jpaged.LLM:
        spec = args.speculative_config
        return jpaged.LLM(dtype=args.dtype, warmup="none", speculative_config=spec)

    engines = {"all_rows": make(), "live_rows": make()}
    runner = engines["all_rows"].engine.runner
    build = runner.build_batch

    def all_rows_batch(*a, **k):  # noqa: ANN002, ANN003, ANN202
        return dataclasses.replace(build(*a, **k), num_tokens=None, num_rows=None)

    runner.build_batch = all_rows_batch
    seconds = dict.fromkeys(engines, 0.0)
    hashes: dict[int, set[str]] = {}
    for run in interleaved_w_rounds(engines, args.rounds):
        seconds[run.engine] += run.seconds if run.round else 0.0
        hashes.setdefault(run.round, set()).add(run.outputs_sha256)
        print(json.dumps({
            "bench": "padding_ab", "dtype": args.dtype, "round": run.round, "engine": run.engine,
            "output_tok_s": round(run.tokens / run.seconds, 1), "seconds": round(run.seconds, 2),
            "outputs_sha256": run.outputs_sha256, "cmd": CMD,
        }), flush=True)  # fmt: skip
    identical = all(len(h) == 1 for h in hashes.values())
    if args.rounds > 1:
        print(json.dumps({
            "bench": "padding_ab", "dtype": args.dtype,
            "speculative_config": args.speculative_config,
            "all_over_live_time": round(seconds["all_rows"] / seconds["live_rows"], 3),
            "outputs_identical": identical, "cmd": CMD,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
