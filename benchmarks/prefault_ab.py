"""W with the KV pool's prefault thread on and off (JPAGED_POOL_PREFAULT_MIB), processes alternated.

    .venv/bin/python benchmarks/prefault_ab.py --dtype bfloat16 --rounds 2 [--ngram 3]

Each run is a new process (a pool whose pages nothing has touched yet): start-up with
`warmup="prefill"` as bench_jpaged.py does, one 1-token request, then W, timed. Prints one JSON
line per run: W seconds, start seconds, and the blocks faulted in before W and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CMD = ".venv/bin/python benchmarks/prefault_ab.py " + " ".join(sys.argv[1:])

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/benchmarks")
t0 = time.perf_counter()
import jpaged
from jpaged.sampling_params import SamplingParams
from workload import workload_w
spec = {{"speculative_config": {{"method": "ngram", "num_speculative_tokens": {ngram}}}}} if {ngram} else {{}}
llm = jpaged.LLM(dtype={dtype!r}, warmup="prefill", **spec)
start = time.perf_counter() - t0
pf = llm.engine._prefaulter
prompts, lens = workload_w()
llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
before = pf.done_blocks if pf else 0
params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in lens]
t = time.perf_counter()
llm.generate(prompts, params, use_tqdm=False)
w = time.perf_counter() - t
print(json.dumps(dict(w_s=round(w, 2), start_s=round(start, 2), faulted_before_w=before,
                      faulted_after_w=pf.done_blocks if pf else 0,
                      high_water=llm.engine.scheduler.block_manager.high_water)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ngram", type=int, default=0, help="n-gram drafts (0: no speculation)")
    parser.add_argument("--lead-mib", type=int, default=1024, help="the 'on' runs' lead")
    args = parser.parse_args()
    code = CHILD.format(root=str(ROOT), dtype=args.dtype, ngram=args.ngram)
    for r in range(args.rounds):
        for lead in (args.lead_mib, 0) if r % 2 == 0 else (0, args.lead_mib):
            env = {**os.environ, "JPAGED_POOL_PREFAULT_MIB": str(lead)}
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True)  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"bench": "prefault_ab", "dtype": args.dtype, "ngram": args.ngram,
                   "round": r, "prefault_lead_mib": lead, **result, "cmd": CMD}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
