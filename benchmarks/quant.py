"""Quantized vs f32 on the default model: weight bytes, perplexity, token agreement, W throughput.

    .venv/bin/python benchmarks/quant.py [--methods f32,int8,awq,gptq] [--num-requests 64]

For each method, in one process, one after another: the bytes the layers' linears take on
device (and all weights), perplexity on tests/data/quant_ppl.txt, greedy tokens on W's first
`--agreement-requests` requests at their full output lengths compared with f32 (positional
agreement and the matching prefix), then workload W's throughput (`--num-requests` of it).
awq / gptq use directories written by `python -m jpaged.quantize` (gptq with act-order).
Prints one JSON line per method, then one with the throughput ratios to f32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import workload_w  # noqa: E402

CMD = ".venv/bin/python benchmarks/quant.py " + " ".join(sys.argv[1:])
TEXT = ROOT / "tests" / "data" / "quant_ppl.txt"


def perplexity(llm, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of token_ids[1:] given their prefixes."""
    from jpaged.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([token_ids], params, use_tqdm=False)[0]
    lps = [
        pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], token_ids[1:], strict=True)
    ]
    return float(np.exp(-np.mean(lps)))


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    """Positional agreement and matching-prefix fraction of greedy outputs against ref."""
    same = [np.mean(np.array(a) == np.array(b)) for a, b in zip(tokens, ref, strict=True)]
    prefix = []
    for a, b in zip(tokens, ref, strict=True):
        diff = np.flatnonzero(np.array(a) != np.array(b))
        prefix.append((diff[0] if diff.size else len(b)) / len(b))
    first = np.mean([a[0] == b[0] for a, b in zip(tokens, ref, strict=True)])
    return {"token_agreement": round(float(np.mean(same)), 3),
            "prefix_agreement": round(float(np.mean(prefix)), 3),
            "first_token_agreement": round(float(first), 3)}  # fmt: skip


def weight_bytes(llm) -> dict:
    import jax

    from models.quant import linear_weight_bytes

    stored, as_f32 = linear_weight_bytes(llm.engine.runner.params)
    total = sum(x.nbytes for x in jax.tree.leaves(llm.engine.runner.params))
    return {"linear_bytes": stored, "linear_bytes_over_f32": round(stored / as_f32, 4),
            "all_weight_bytes": total}  # fmt: skip


def run(method: str, args: argparse.Namespace, quant_dirs: dict, ref: dict) -> dict:
    import jpaged
    from jpaged.sampling_params import SamplingParams

    t0 = time.perf_counter()
    model = quant_dirs.get(method, args.model)
    quantization = "int8" if method == "int8" else None
    llm = jpaged.LLM(model=model, quantization=quantization, max_num_seqs=256,
                     max_num_batched_tokens=2048, warmup=args.warmup)  # fmt: skip
    line = {"method": method, "start_s": round(time.perf_counter() - t0, 2), **weight_bytes(llm)}
    line["perplexity"] = round(perplexity(llm, llm.get_tokenizer().encode(TEXT.read_text())), 3)
    prompts, out_lens = workload_w()  # W's 64 requests; the runs below take its first ones
    greedy = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    k = args.agreement_requests
    if k:
        outs = llm.generate(prompts[:k], greedy[:k], use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        ref.setdefault("tokens", tokens)  # the first method (f32) is the reference
        line.update(agreement(tokens, ref["tokens"]))
    if args.num_requests:
        t0 = time.perf_counter()
        n = args.num_requests
        outs = llm.generate(prompts[:n], greedy[:n], use_tqdm=False)
        elapsed = time.perf_counter() - t0
        useful = sum(len(o.outputs[0].token_ids) for o in outs)
        line.update(requests=n, output_tokens=useful, seconds=round(elapsed, 2),
                    output_tok_s=round(useful / elapsed, 1))  # fmt: skip
    line["cmd"] = CMD
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="f32,int8,awq,gptq")
    parser.add_argument("--model", default=None, help="float HF dir (default: the embedded model)")
    parser.add_argument(
        "--num-requests",
        type=int,
        default=64,
        help="throughput on W's first N requests (64: all of W; 0: skip)",
    )
    parser.add_argument("--agreement-requests", type=int, default=8, help="0: skip")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--warmup", default="decode", choices=["none", "decode", "prefill", "all"])
    args = parser.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "f32":
        raise SystemExit("--methods must start with f32 (the reference)")
    from jpaged.quantize import quantize_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="jpaged-quant-"))
    quant_dirs = {
        m: str(quantize_model_dir(args.model, tmp / m, m, group_size=args.group_size))
        for m in methods
        if m in ("awq", "gptq")
    }
    ref: dict = {}
    results = []
    for method in methods:
        results.append(run(method, args, quant_dirs, ref))
        print(json.dumps(results[-1]), flush=True)
    if args.num_requests:
        base = results[0]["output_tok_s"]
        ratios = {r["method"]: round(r["output_tok_s"] / base, 2) for r in results}
        print(json.dumps({"throughput_over_f32": ratios, "cmd": CMD}))


if __name__ == "__main__":
    main()
