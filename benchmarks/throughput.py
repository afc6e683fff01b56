"""Throughput on workload W: jpaged, vLLM and transformers, f32 and bf16, in one run.

    make bench   # or: .venv/bin/python benchmarks/throughput.py [--dtypes float32,bfloat16]
                 #       [--engines jpaged,vllm,transformers] [--hf-batch-sizes 32]

Each engine and dtype runs in its own subprocess, one after another (memory and threads do not
mix): jpaged in this python (benchmarks/bench_jpaged.py), vLLM in .venv-vllm
(benchmarks/ref_vllm.py, `make vllm`; or $JPAGED_VLLM_PYTHON), transformers static batching in
.venv-ref (benchmarks/ref_hf_static.py, `make ref`; or $JPAGED_REF_PYTHON). Prints one JSON
line per engine and dtype, then one with the throughput ratios (jpaged ÷ each peer, per dtype)
and one with greedy token agreement over W's first 8 requests (agreement.py). jpaged also runs
a second time with n-gram speculative decoding (--jpaged-ngram K drafts; 0: not), mode
"continuous+ngram": its ratios are keyed jpaged_ngram/..., and its outputs must equal plain
jpaged's (`jpaged_ngram_<dtype> vs jpaged_<dtype>`). vLLM runs as it comes (its CPU backend
has no speculative decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from agreement import agreement  # noqa: E402
from bench_jpaged import add_jpaged_args  # noqa: E402

ENGINES = ("jpaged", "vllm", "transformers")
DTYPES = ("float32", "bfloat16")
CMD = "make bench  # or: .venv/bin/python benchmarks/throughput.py " + shlex.join(sys.argv[1:])


def peer_python(env_var: str, venv: str) -> Path:
    """The interpreter of a peer's environment: $env_var, else ROOT/venv/bin/python."""
    return Path(os.environ.get(env_var) or ROOT / venv / "bin" / "python")


def worker_commands(engine: str, dtype: str, args: argparse.Namespace) -> list[list[str]]:
    """The subprocess command lines that run `engine` on W in `dtype` (one per configuration)."""
    n = str(args.num_requests)
    if engine == "jpaged":
        plain = [sys.executable, str(BENCH / "bench_jpaged.py"), "--dtype", dtype,
                 "--num-requests", n, "--max-num-seqs", str(args.max_num_seqs),
                 "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                 "--block-size", str(args.block_size), "--warmup", args.warmup,
                 "--attention-backend", args.attention_backend,
                 "--kv-cache-dtype", args.kv_cache_dtype,
                 *([] if args.unroll_layers is None else
                   ["--unroll-layers" if args.unroll_layers else "--no-unroll-layers"])]  # fmt: skip
        if not args.jpaged_ngram:
            return [plain]
        spec = {"method": "ngram", "num_speculative_tokens": args.jpaged_ngram}
        return [plain, [*plain, "--speculative-config", json.dumps(spec)]]
    if engine == "vllm":
        from jpaged.weights import resolve_model

        return [[str(peer_python("JPAGED_VLLM_PYTHON", ".venv-vllm")), str(BENCH / "ref_vllm.py"),
                 str(resolve_model(None)), "--dtype", dtype, "--num-requests", n,
                 "--max-num-seqs", str(args.max_num_seqs),
                 "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                 "--kv-space-gib", str(args.vllm_kv_space_gib),
                 "--threads-bind", args.vllm_threads_bind, "--openmp", args.vllm_openmp]]  # fmt: skip
    from jpaged.gguf_import import default_gguf_path

    gguf = default_gguf_path()
    ref = str(peer_python("JPAGED_REF_PYTHON", ".venv-ref"))
    return [[ref, str(BENCH / "ref_hf_static.py"), str(gguf.parent), gguf.name, str(bs), dtype, n]
            for bs in args.hf_batch_sizes]  # fmt: skip


def run_worker(engine: str, dtype: str, cmd: list[str], timeout_s: float) -> dict:
    """Run one worker; its last stdout line as a dict, or a line saying why there is none."""
    base = {"engine": engine, "dtype": dtype}
    if not Path(cmd[0]).exists():
        env = {"vllm": "make vllm", "transformers": "make ref"}.get(engine, "make venv")
        return {**base, "skipped": f"{cmd[0]} does not exist ({env})"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout_s:.0f} s", "worker": shlex.join(cmd)}
    wall_s = round(time.perf_counter() - t0, 1)
    # the result is the last line that is a JSON object naming the engine (vLLM logs to stdout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"engine": ')]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {**base, "error": f"exit {proc.returncode}", "stderr_tail": tail, "wall_s": wall_s}
    return {**json.loads(lines[-1]), "process_wall_s": wall_s}


def ratios(results: list[dict]) -> dict:
    """jpaged's output tok/s over each peer's, per dtype: {"float32": {"jpaged/vllm": 1.2}}."""
    out: dict[str, dict[str, float]] = {}
    for dtype in DTYPES:
        rows = [r for r in results if r["dtype"] == dtype and "output_tok_s" in r]
        for mode, name in (("continuous", "jpaged"), ("continuous+ngram", "jpaged_ngram")):
            jp = next((r["output_tok_s"] for r in rows
                       if r["engine"] == "jpaged" and r["mode"] == mode), None)  # fmt: skip
            if jp is None:
                continue
            for r in rows:
                if r["engine"] != "jpaged":
                    peer = "vllm" if r["engine"] == "vllm" else f"hf_{r['mode']}"
                    out.setdefault(dtype, {})[f"{name}/{peer}"] = round(jp / r["output_tok_s"], 2)
    return out


def agreements(results: list[dict]) -> dict:
    """Greedy agreement over the first requests: jpaged bf16 vs f32, and each dtype's jpaged
    vs each peer; also each engine's bf16 vs its own f32 for scale. Keys name the pair."""
    done = {(r["engine"], r.get("mode"), r["dtype"]): r for r in results if "first_outputs" in r}
    jp = {d: done.get(("jpaged", "continuous", d)) for d in DTYPES}
    out = {}
    for (engine, mode, dtype), r in done.items():
        name = {"transformers": f"hf_{mode}", "jpaged": "jpaged"}.get(engine, engine)
        if mode == "continuous+ngram":
            name = "jpaged_ngram"
            if jp[dtype]:
                out[f"jpaged_ngram_{dtype} vs jpaged_{dtype}"] = pair(r, jp[dtype])
        if engine != "jpaged" and jp[dtype]:
            out[f"jpaged_{dtype} vs {name}_{dtype}"] = pair(jp[dtype], r)
        f32 = done.get((engine, mode, "float32"))
        if dtype == "bfloat16" and f32:
            out[f"{name}_bfloat16 vs {name}_float32"] = pair(r, f32)
    return out


def pair(a: dict, b: dict) -> dict:
    """agreement() of two result lines, plus whether all of W's outputs are identical."""
    return {**agreement(a["first_outputs"], b["first_outputs"]),
            "all_requests_identical": a["outputs_sha256"] == b["outputs_sha256"]}  # fmt: skip


def csv(kind: type, choices: tuple[str, ...] | None = None):
    """An argparse type: a comma-separated list of `kind`, each in `choices` if given."""

    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x]
        bad = [x for x in items if choices and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def main() -> None:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", "--dtype", type=csv(str, DTYPES), default=list(DTYPES))
    parser.add_argument("--engines", type=csv(str, ENGINES), default=list(ENGINES))
    parser.add_argument("--hf-batch-sizes", type=csv(int), default=[32],
                        help="transformers static batch sizes; each is one more W run")  # fmt: skip
    parser.add_argument("--vllm-kv-space-gib", type=int, default=2)
    parser.add_argument("--vllm-threads-bind", default="all")
    parser.add_argument("--vllm-openmp", default="gomp", choices=["gomp", "iomp"])
    parser.add_argument("--worker-timeout-s", type=float, default=900)
    parser.add_argument("--jpaged-ngram", type=int, default=3,
                        help="also run jpaged with this many n-gram drafts (0: do not)")  # fmt: skip
    parser.add_argument("--raw-out", type=Path, help="also write each worker's full line here")
    add_jpaged_args(parser)
    args = parser.parse_args()
    results = []
    for engine in args.engines:
        for dtype in args.dtypes:
            for cmd in worker_commands(engine, dtype, args):
                line = run_worker(engine, dtype, cmd, args.worker_timeout_s)
                results.append(line)
                if args.raw_out:
                    with args.raw_out.open("a") as f:
                        f.write(json.dumps(line) + "\n")
                shown = {k: v for k, v in line.items() if k != "first_outputs"}
                print(json.dumps({**shown, "cmd": CMD}), flush=True)
    print(json.dumps({"ratios": ratios(results), "cmd": CMD}), flush=True)
    print(json.dumps({"agreement_first_8": agreements(results), "cmd": CMD}), flush=True)
    print(json.dumps({"total_s": round(time.perf_counter() - t_start, 1), "cmd": CMD}))


if __name__ == "__main__":
    main()
