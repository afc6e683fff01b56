"""Cold and warm start: process start to the first generated token on the default model.

    .venv/bin/python benchmarks/cold_start.py

Runs a child process twice against a fresh cache dir: the first run converts the GGUF and
compiles (cold), the second finds both caches (warm). Prints one JSON line per run.
"""

from __future__ import annotations

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
    try:
        for run in ("cold", "warm"):
            env = dict(os.environ, JPAGED_CACHE_DIR=cache)
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
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
