"""W with the `cpu` linears (packed weights, C++ kernels) vs the `xla` ones (plain dots).

    .venv/bin/python benchmarks/linear_backend_ab.py [--dtype bfloat16] [--rounds 3]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 3}']

Two `LLM`s in one process, as padding_ab.py runs them: rounds alternate the order and shift
every prompt's first token; prints one JSON line per (round, engine) and the ratio of the
summed times over rounds 1.. (round 0 holds the prefill compiles), with each engine's output
hashes (the two backends sum in different orders, so their tokens may differ).
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

CMD = ".venv/bin/python benchmarks/linear_backend_ab.py " + " ".join(sys.argv[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speculative-config", type=json.loads, default=None)
    args = parser.parse_args()
    import jpaged

    engines = {
        backend: jpaged.LLM(
            dtype=args.dtype,
            warmup="none",
            linear_backend=backend,
            speculative_config=args.speculative_config,
        )  # fmt: skip
        for backend in ("xla", "cpu")
    }
    seconds = dict.fromkeys(engines, 0.0)
    hashes: dict[str, set[str]] = {name: set() for name in engines}
    for run in interleaved_w_rounds(engines, args.rounds):
        seconds[run.engine] += run.seconds if run.round else 0.0
        hashes[run.engine].add(run.outputs_sha256)
        print(json.dumps({
            "bench": "linear_backend_ab", "dtype": args.dtype, "round": run.round,
            "engine": run.engine, "output_tok_s": round(run.tokens / run.seconds, 1),
            "seconds": round(run.seconds, 2), "outputs_sha256": run.outputs_sha256, "cmd": CMD,
        }), flush=True)  # fmt: skip
    if args.rounds > 1:
        print(json.dumps({
            "bench": "linear_backend_ab", "dtype": args.dtype,
            "speculative_config": args.speculative_config,
            "xla_over_cpu_time": round(seconds["xla"] / seconds["cpu"], 3),
            "hashes": {name: sorted(h) for name, h in hashes.items()}, "cmd": CMD,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
