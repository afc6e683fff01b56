"""Reference greedy decoding with transformers on torch (run with .venv-ref's python).

Usage: ref_model.py REQUEST.json OUT.npz
REQUEST: {"model_dir": str, "gguf_file": str | null, "prompts": [[ids]], "max_new_tokens": int,
          "dtype": "float32"}
OUT: last_logits_{i} [vocab] f32 (logits after the prompt), tokens_{i} [max_new_tokens] i64
(greedy, EOS not treated specially), step_logits_{i} [max_new_tokens, vocab] only if asked.
"""

import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    req = json.load(open(sys.argv[1]))
    torch.manual_seed(0)
    kwargs = {"dtype": getattr(torch, req.get("dtype", "float32"))}
    if req.get("gguf_file"):
        kwargs["gguf_file"] = req["gguf_file"]
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], **kwargs)
    model.eval()
    out = {}
    with torch.no_grad():
        for i, prompt in enumerate(req["prompts"]):
            ids = torch.tensor([prompt])
            res = model(ids, use_cache=True)
            past, logits = res.past_key_values, res.logits[0, -1]
            out[f"last_logits_{i}"] = logits.float().numpy()
            tokens = []
            for _ in range(req["max_new_tokens"]):
                nxt = int(torch.argmax(logits))
                tokens.append(nxt)
                res = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, logits = res.past_key_values, res.logits[0, -1]
            out[f"tokens_{i}"] = np.array(tokens, np.int64)
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
