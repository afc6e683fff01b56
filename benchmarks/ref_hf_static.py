"""transformers static batching on W (run with .venv-ref's python; prints one JSON line).

Usage: ref_hf_static.py GGUF_DIR GGUF_NAME BATCH_SIZE DTYPE [NUM_REQUESTS]
Each batch is left-padded to its longest prompt and decoded to its longest output with EOS
switched off (ignore_eos, as in W); useful tokens are the requested ones, whose ids the line
carries as in agreement.py.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from agreement import output_record  # noqa: E402
from workload import workload_w  # noqa: E402


def main() -> None:
    gguf_dir, gguf_name, batch_size, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    num_requests = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    torch.set_num_threads(torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=getattr(torch, dtype)
    )
    model.eval()
    model.generation_config.eos_token_id = None  # ignore_eos: decode every batch to full length
    prompts, out_lens = workload_w(num_requests)
    token_ids: list[list[int]] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch, lens = prompts[i : i + batch_size], out_lens[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(lens),
                do_sample=False,
                pad_token_id=0,
            )  # [batch, width + max(lens)]
            token_ids += [out[j, width : width + n].tolist() for j, n in enumerate(lens)]
    elapsed = time.perf_counter() - t0
    useful = sum(out_lens)
    if sum(len(t) for t in token_ids) != useful:
        raise RuntimeError("transformers stopped a request early")
    print(json.dumps({"engine": "transformers", "mode": f"static_bs{batch_size}", "dtype": dtype,
                      "requests": len(prompts), "output_tokens": useful, "seconds": round(elapsed, 2),
                      "output_tok_s": round(useful / elapsed, 1),
                      **output_record(token_ids)}))  # fmt: skip


if __name__ == "__main__":
    main()
