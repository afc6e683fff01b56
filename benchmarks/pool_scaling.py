"""Decode step time against KV pool size, and the default model's load time (cold / cached).

    .venv/bin/python benchmarks/pool_scaling.py

A decode step must not grow with num_blocks: the pool is donated and updated in place.
Prints one JSON line per pool size, then the ratio step(8192) / step(512), then load times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CMD = ".venv/bin/python benchmarks/pool_scaling.py"


def decode_step_time(num_blocks: int, batch: int = 32, context: int = 200, reps: int = 10) -> float:
    import jax.numpy as jnp

    from jpaged.kv_pool import allocate_kv_pool
    from jpaged.model_runner import ModelRunner, StepSeq
    from jpaged.sampling_params import SamplingParams
    from jpaged.sampling_tensors import SamplingRow
    from jpaged.weights import iter_safetensors, load_model
    from models.llama import llama_from_hf_tensors

    loaded = load_model(None)
    model = llama_from_hf_tensors(loaded.config, iter_safetensors(loaded.model_dir), jnp.float32)
    pool = allocate_kv_pool(loaded.config, num_blocks, 16, jnp.float32)
    runner = ModelRunner(model, pool, block_size=16, max_model_len=2048)
    per_seq = -(-(context + 1) // 16)
    # sequences spread over the whole pool: the last ones use the highest block ids
    stride = (num_blocks - 1) // batch
    seqs = [
        StepSeq([5], context, [1 + i * stride + j for j in range(per_seq)]) for i in range(batch)
    ]
    rows = [SamplingRow(SamplingParams(temperature=0), 0, 0, (), ()) for _ in range(batch)]
    for _ in range(2):
        runner.execute(seqs, rows, list(range(batch)))
    t0 = time.perf_counter()
    for _ in range(reps):
        runner.execute(seqs, rows, list(range(batch)))
    return (time.perf_counter() - t0) / reps


def load_time(cache_dir: str) -> float:
    code = (
        "import time; t=time.perf_counter(); import jax.numpy as jnp;"
        "from jpaged.weights import load_model, iter_safetensors;"
        "from models.llama import llama_from_hf_tensors;"
        "m=load_model(None); llama_from_hf_tensors(m.config, iter_safetensors(m.model_dir), jnp.float32);"
        "print(time.perf_counter()-t)"
    )
    env = dict(os.environ, JPAGED_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(decode_step_time(int(sys.argv[2])))
        return
    times = {}
    for num_blocks in (512, 8192):  # separate processes: no shared allocator state
        out = subprocess.run([sys.executable, __file__, "--one", str(num_blocks)], capture_output=True,
                             text=True, check=True)  # fmt: skip
        times[num_blocks] = float(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"bench": "decode_step", "num_blocks": num_blocks, "batch": 32, "context": 200,
                          "step_ms": round(times[num_blocks] * 1e3, 1), "cmd": CMD}), flush=True)  # fmt: skip
    print(json.dumps({"bench": "decode_step_ratio", "step_8192_over_512": round(times[8192] / times[512], 3),
                      "goal": "<= 1.1", "cmd": CMD}), flush=True)  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="jpaged-bench-")
    try:
        cold = load_time(tmp)
        warm = load_time(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"bench": "load_default_model", "cold_s": round(cold, 2), "cached_s": round(warm, 2),
                      "note": "cold = GGUF dequantize + convert + load; cached = converted safetensors",
                      "cmd": CMD}))  # fmt: skip


if __name__ == "__main__":
    main()
