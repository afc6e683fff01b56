"""Cold and warm start: process start to the first generated token on the default model.

    .venv/bin/python benchmarks/cold_start.py

Runs a child process against a fresh cache dir: the first run converts the GGUF and compiles
(cold), the second finds both caches (warm). Both load the C++ kernels `make venv` prebuilt
(`python -m pallas_kernels.prebuild`); a third run, "cold_kernel_builds", starts cold with no
prebuilt kernels either, so it compiles them too. Prints one JSON line per run; the warm
start runs --warm-runs times (a shared machine's noise is ±0.5 s). The packed-weights cache
(jpaged.packed_cache) is on unless $JPAGED_PACKED_CACHE=0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = """
import time
t0 = time.perf_counter()
import jpaged
from jpaged import SamplingParams
llm = jpaged.LLM()
out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
               SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
print(time.perf_counter() - t0)
"""


def main() -> None:
    cache = tempfile.mkdtemp(prefix="jpaged-coldstart-")
    cold_cache = tempfile.mkdtemp(prefix="jpaged-coldstart-")
    no_kernels = tempfile.mkdtemp(prefix="jpaged-no-kernels-")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=3, help="warm starts to time (noisy)")
    args = parser.parse_args()
    runs = [("cold", {"JPAGED_CACHE_DIR": cache})]
    runs += [("warm", {"JPAGED_CACHE_DIR": cache})] * args.warm_runs
    runs += [
        ("cold_kernel_builds", {"JPAGED_CACHE_DIR": cold_cache, "JPAGED_KERNELS_DIR": no_kernels})
    ]
    try:
        for run, overrides in runs:
            env = dict(os.environ, **overrides)
            t0 = __import__("time").perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
            )
            wall = __import__("time").perf_counter() - t0
            inner = float(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"bench": "start_to_first_token", "run": run, "process_wall_s": round(wall, 2),
                              "in_process_s": round(inner, 2), "cmd": ".venv/bin/python benchmarks/cold_start.py"}),
                  flush=True)  # fmt: skip
    finally:
        for path in (cache, cold_cache, no_kernels):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
