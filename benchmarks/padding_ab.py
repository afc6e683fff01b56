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
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import VOCAB, workload_w  # noqa: E402

CMD = ".venv/bin/python benchmarks/padding_ab.py " + " ".join(sys.argv[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speculative-config", type=json.loads, default=None)
    args = parser.parse_args()
    import jpaged
    from jpaged.sampling_params import SamplingParams

    def make() -> jpaged.LLM:
        spec = args.speculative_config
        return jpaged.LLM(dtype=args.dtype, warmup="none", speculative_config=spec)

    engines = {"all_rows": make(), "live_rows": make()}
    runner = engines["all_rows"].engine.runner
    build = runner.build_batch

    def all_rows_batch(*a, **k):  # noqa: ANN002, ANN003, ANN202
        return dataclasses.replace(build(*a, **k), num_tokens=None, num_rows=None)

    runner.build_batch = all_rows_batch
    prompts, out_lens = workload_w()
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    seconds = dict.fromkeys(engines, 0.0)
    identical = True
    for r in range(args.rounds):
        shifted = [[(p[0] + 7 * (r + 1)) % VOCAB] + p[1:] for p in prompts]
        hashes = {}
        for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            t0 = time.perf_counter()
            outs = engines[name].generate(shifted, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            seconds[name] += dt if r else 0.0
            ids = [list(o.outputs[0].token_ids) for o in outs]
            hashes[name] = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
            print(json.dumps({
                "bench": "padding_ab", "dtype": args.dtype, "round": r, "engine": name,
                "output_tok_s": round(sum(map(len, ids)) / dt, 1), "seconds": round(dt, 2),
                "outputs_sha256": hashes[name], "cmd": CMD,
            }), flush=True)  # fmt: skip
        identical &= len(set(hashes.values())) == 1
    if args.rounds > 1:
        print(json.dumps({
            "bench": "padding_ab", "dtype": args.dtype,
            "speculative_config": args.speculative_config,
            "all_over_live_time": round(seconds["all_rows"] / seconds["live_rows"], 3),
            "outputs_identical": identical, "cmd": CMD,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
