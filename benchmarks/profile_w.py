"""Where the time of a W run goes: host vs device per step, and the CPU split by kind of work.

    .venv/bin/python benchmarks/profile_w.py [--dtype float32] [--num-requests 64] [--no-perf]

Runs workload W on the default model in-process. Every engine step is split into host work
(scheduling, batch building, detokenizing, stop checks) and the runner's device call
(`ModelRunner.execute`: dispatch, the jitted step, reading back the sampled ids). With
`perf` installed (linux-perf), the W part of a second run is sampled with `perf record`
(enabled through its control fifo only while W runs) and the CPU samples are grouped by symbol: matmuls (YNNPACK / XLA dot kernels and their weight
packing), attention (the `cpu` kernel), copies and page faults, Python/numpy (host), and
XLA's generated fused code (norms, RoPE, KV scatter, sampling). Idle = 1 - CPU time /
(cores x wall). Prints one JSON line per section.
"""

from __future__ import annotations

import argparse
import collections
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import workload_w  # noqa: E402

CMD = ".venv/bin/python benchmarks/profile_w.py " + " ".join(sys.argv[1:])
CATEGORIES = [  # (category, substrings of a symbol or DSO), first match wins
    ("attention", ("attend_item", "PagedAttentionImpl", "paged_attention_cpu")),
    ("matmul", ("linear_cpu", "LinearAmx", "LinearF32", "micro_f32", "ynn::dot", "ynn::interleave", "ynn::pack", "ynn::transpose", "dnnl", "gemm",
                "Eigen::internal::gebp", "xnn_")),
    ("copies_and_page_faults", ("memmove", "memcpy", "memset", "clear_page", "page_fault",
                                "folio", "get_page_from_freelist")),
    ("python_numpy_host", ("libpython", "_PyEval", "multiarray", "python3", "gc_collect",
                           "tokenizers")),
    ("xla_runtime", ("xla::", "tsl::", "slinky", "absl", "Eigen::ThreadPool", "pthread",
                     "futex", "_raw_spin", "schedule")),
]  # fmt: skip


def categorize(symbol: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in symbol for k in keys):
            return name
    return "xla_generated_code_and_other"


def run_w(args: argparse.Namespace) -> dict:
    import jpaged
    from jpaged.sampling_params import SamplingParams

    extra = {"speculative_config": args.speculative_config} if args.speculative_config else {}
    llm = jpaged.LLM(dtype=args.dtype, warmup="decode", linear_backend=args.linear_backend, **extra)
    runner = llm.engine.runner
    prompts, out_lens = workload_w(args.num_requests)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    device = {"prefill": 0.0, "decode": 0.0, "prefill_steps": 0, "decode_steps": 0}
    execute = runner.execute

    def timed_execute(seqs, *a, **k):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = execute(seqs, *a, **k)
        # decode: one token a sequence, or a verify step's chunks (a row per token)
        decode = all(len(s.token_ids) == 1 for s in seqs) or len(k.get("row_back", ()))
        kind = "decode" if decode else "prefill"
        device[kind] += time.perf_counter() - t0
        device[kind + "_steps"] += 1
        return out

    runner.execute = timed_execute
    perf_ctl = os.environ.get("JPAGED_PERF_CTL")  # perf's control fifo: sample W only
    if perf_ctl:
        with open(perf_ctl, "w") as ctl:
            ctl.write("enable\n")
    cpu0, t0 = time.process_time(), time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if perf_ctl:
        with open(perf_ctl, "w") as ctl:
            ctl.write("disable\n")
    runner.execute = execute
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_runner = device["prefill"] + device["decode"]
    cores = os.cpu_count() or 1
    return {
        "section": "steps",
        "dtype": args.dtype,
        "attention_backend": runner.attention_backend,
        "output_tokens": tokens,
        "seconds": round(wall, 2),
        "output_tok_s": round(tokens / wall, 1),
        "prefill_steps": device["prefill_steps"],
        "prefill_s": round(device["prefill"], 2),
        "decode_steps": device["decode_steps"],
        "decode_s": round(device["decode"], 2),
        "host_outside_runner_s": round(wall - in_runner, 2),
        "host_fraction": round((wall - in_runner) / wall, 3),
        "cpu_s": round(cpu, 1),
        "idle_fraction": round(max(0.0, 1 - cpu / (cores * wall)), 3),
        "cmd": CMD,
    }


def perf_split(args: argparse.Namespace) -> dict | None:
    """Re-run this script under `perf record` and group its samples by category."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        data, ctl = Path(tmp) / "perf.data", Path(tmp) / "ctl.fifo"
        os.mkfifo(ctl)
        cmd = [sys.executable, __file__, "--dtype", args.dtype, "--num-requests",
               str(args.num_requests), "--no-perf"]  # fmt: skip
        if args.speculative_config:
            cmd += ["--speculative-config", json.dumps(args.speculative_config)]
        env = {**os.environ, "JPAGED_PERF_CTL": str(ctl)}
        rec = subprocess.run(  # starts disabled (-D -1); the child enables it around W
            [perf, "record", "-F", "499", "-D", "-1", f"--control=fifo:{ctl}", "-o", str(data),
             "--", *cmd],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if rec.returncode != 0:
            return {"section": "cpu_split", "error": rec.stderr[-500:], "cmd": CMD}
        report = subprocess.run(
            [perf, "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio",
             "-g", "none", "--percent-limit", "0"],
            capture_output=True, text=True,
        )  # fmt: skip
    shares: collections.Counter[str] = collections.Counter()
    for line in report.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line.split()[0]:
            continue
        pct = float(line.split()[0].rstrip("%"))
        shares[categorize(line)] += pct
    total = sum(shares.values()) or 1.0
    split = {k: round(100 * v / total, 1) for k, v in shares.most_common()}
    return {"section": "cpu_split_percent_of_samples", "dtype": args.dtype, **split, "cmd": CMD}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--no-perf", action="store_true", help="skip the perf-sampled re-run")
    parser.add_argument("--linear-backend", default="auto", choices=["auto", "cpu", "xla"])
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help='JSON, e.g. {"method": "ngram", "num_speculative_tokens": 3}')  # fmt: skip
    args = parser.parse_args()
    print(json.dumps(run_w(args)), flush=True)
    if not args.no_perf:
        split = perf_split(args)
        print(json.dumps(split or {"section": "cpu_split", "error": "perf not installed"}))


if __name__ == "__main__":
    main()
