"""Reference beam search with transformers on torch (run with .venv-ref's python).

Usage: ref_beam.py REQUEST.json OUT.json
REQUEST: {"model_dir": str, "prompts": [[ids]], "beam_widths": [int], "max_new_tokens": int,
          "length_penalty": float}
OUT: {"w{k}_p{i}": {"sequences": [[generated ids]], "scores": [sequences_scores]}} from
generate(num_beams=k, num_return_sequences=k, do_sample=False, early_stopping=False), one
prompt at a time (no padding). Generated ids are cut after an EOS (the rest is padding).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    req = json.load(open(sys.argv[1]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = {}
    with torch.no_grad():
        for k in req["beam_widths"]:
            for i, prompt in enumerate(req["prompts"]):
                ids = torch.tensor([prompt])
                res = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    num_beams=k,
                    num_return_sequences=k,
                    do_sample=False,
                    early_stopping=False,
                    length_penalty=req["length_penalty"],
                    max_new_tokens=req["max_new_tokens"],
                    return_dict_in_generate=True,
                    output_scores=True,
                )
                seqs = []
                for row in res.sequences[:, len(prompt) :].tolist():
                    cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                    seqs.append(row[:cut])
                out[f"w{k}_p{i}"] = {"sequences": seqs, "scores": res.sequences_scores.tolist()}
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
