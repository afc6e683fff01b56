"""`python -m jpaged "prompt" ...`: generate from the command line (the default model unless --model)."""

from __future__ import annotations

import argparse
import logging
import time

from jpaged.llm import LLM
from jpaged.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build an LLM, print one completion per prompt."""
    parser = argparse.ArgumentParser(prog="python -m jpaged", description=__doc__)
    parser.add_argument("prompts", nargs="*", default=["What is the capital of France?"])
    parser.add_argument(
        "--model",
        default=None,
        help="HF dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. dp=2,tp=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
        mesh=args.mesh,
    )  # fmt: skip
    print(f"[engine ready in {time.perf_counter() - t0:.1f}s]")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.raw:
        outputs = llm.generate(args.prompts, params)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    for out in outputs:
        print(f"--- {out.prompt!r}\n{out.outputs[0].text}  [{out.outputs[0].finish_reason}]")


if __name__ == "__main__":
    main()
