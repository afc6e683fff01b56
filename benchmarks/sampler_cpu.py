"""The sampler's step on CPU with and without its C++ row reductions, in one process.

    .venv/bin/python benchmarks/sampler_cpu.py [--rows 64] [--vocab 49152] [--rounds 50]

Times `jpaged.sampler.sample` on random f32 logits for all-greedy rows (W's case), with
`cpu_kernels` False (XLA's argmax / logsumexp / rank passes) and True
(pallas_kernels.sampling_cpu), interleaved; best of `--rounds`. Prints one JSON line per
variant and whether the two agree (ids and ranks equal, max logprob difference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attention_cpu import timed  # noqa: E402

from jpaged import SamplingParams  # noqa: E402
from jpaged.paths import kernels_cache_dir  # noqa: E402
from jpaged.sampler import sample  # noqa: E402
from jpaged.sampling_tensors import SamplingRow, build_sampling_tensors  # noqa: E402
from pallas_kernels import sampling_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    if not sampling_cpu.load(kernels_cache_dir()):
        raise SystemExit("the C++ sampling kernels cannot be built here")
    greedy = SamplingParams(temperature=0, max_tokens=16)
    t = build_sampling_tensors([SamplingRow(greedy, 0, 0, [], [])] * args.rows, args.rows)
    logits = jax.random.normal(jax.random.PRNGKey(0), (args.rows, args.vocab), jnp.float32)
    fns = {on: jax.jit(lambda x, t, on=on: sample(x, t, 0, on)) for on in (False, True)}
    times = timed({on: (lambda fn=fn: fn(logits, t)) for on, fn in fns.items()}, args.rounds)
    xla, cpu = fns[False](logits, t), fns[True](logits, t)
    cmd = ".venv/bin/python benchmarks/sampler_cpu.py " + " ".join(sys.argv[1:])
    for on, ms in times.items():
        print(json.dumps({"bench": "sampler_cpu", "cpu_kernels": on, "rows": args.rows,
                          "vocab": args.vocab, "ms_best": round(min(ms), 3), "cmd": cmd}))  # fmt: skip
    print(json.dumps({
        "bench": "sampler_cpu", "ids_equal": bool((xla.token_ids == cpu.token_ids).all()),
        "ranks_equal": bool((xla.rank == cpu.rank).all()),
        "logprob_max_diff": float(jnp.abs(xla.logprob - cpu.logprob).max()), "cmd": cmd,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
