"""Reference for tests/test_weights.py and tests/test_tokenizer.py: transformers reading a GGUF.

Run with the reference interpreter (.venv-ref: torch + transformers + gguf), never from jpaged:

    python tests/ref/ref_weights.py weights  --gguf FILE.gguf --out DIR
        -> DIR/weights.npz (selected float32 tensors, HF names) and DIR/config.json
    python tests/ref/ref_weights.py tokenize --gguf FILE.gguf --texts IN.json --out OUT.json
        -> per text: ids (with/without special tokens) and decodes; the chat template rendering
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def dump_weights(gguf: Path, out: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    state = model.state_dict()
    last = model.config.num_hidden_layers - 1
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{t}" for i in (0, last) for t in LAYER_TENSORS]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "weights.npz", **{n: state[n].detach().float().numpy() for n in names})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["num_parameters"] = sum(p.numel() for p in model.parameters())
    (out / "config.json").write_text(json.dumps(config, default=str, indent=1))


def dump_tokenize(gguf: Path, texts_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = json.loads(texts_path.read_text())
    rows = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True)
        rows.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": tok.encode(text, add_special_tokens=False),
                "decoded": tok.decode(ids, skip_special_tokens=True),
                "decoded_with_special": tok.decode(ids, skip_special_tokens=False),
                "tokens": tok.convert_ids_to_tokens(ids),
            }
        )
    chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    result = {
        "rows": rows,
        "chat_text": chat_text,
        "chat_ids": tok.encode(chat_text, add_special_tokens=False),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "all_special_ids": sorted(tok.all_special_ids),
    }
    out.write_text(json.dumps(result, ensure_ascii=False, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    weights = sub.add_parser("weights")
    weights.add_argument("--gguf", type=Path, required=True)
    weights.add_argument("--out", type=Path, required=True)
    tokenize = sub.add_parser("tokenize")
    tokenize.add_argument("--gguf", type=Path, required=True)
    tokenize.add_argument("--texts", type=Path, required=True)
    tokenize.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "weights":
        dump_weights(args.gguf, args.out)
    else:
        dump_tokenize(args.gguf, args.texts, args.out)


if __name__ == "__main__":
    main()
