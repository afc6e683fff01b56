"""Tests for jpaged/tokenizer.py on the default model, against transformers' GGUF tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from jpaged.gguf_import import default_gguf_path
from jpaged.tokenizer import Tokenizer

REF_SCRIPT = Path(__file__).parent / "ref" / "ref_weights.py"
TEXTS = [
    "Hello world!",
    "  two leading spaces, and two trailing  ",
    "def square(x: int) -> int:\n    return x ** 2  # four-space indent\n",
    "日本語のテキスト、中文，한국어 and emoji 🤗🚀👩‍👩‍👧",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>jpaged<file_sep>main.py",
    "Numbers 1234567 and 3.14159; 'quotes' don't we've I'll",
    "\n\n\t tabs\tand\r\nwindows newlines\n",
    "Ünïcödé çàfé naïve résumé — “smart quotes” …",
    "",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def ref_tokens(ref_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on TEXTS and CHAT."""
    tmp = tmp_path_factory.mktemp("ref_tokenizer")
    (tmp / "texts.json").write_text(json.dumps(TEXTS, ensure_ascii=False))
    cmd = [str(ref_python), str(REF_SCRIPT), "tokenize", "--gguf", str(default_gguf_path())]
    cmd += ["--texts", str(tmp / "texts.json"), "--out", str(tmp / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"{REF_SCRIPT.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads((tmp / "out.json").read_text())


def test_known_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world!") == [19556, 905, 17]
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]  # special token stays whole
    assert tokenizer.convert_ids_to_tokens([19556, 905, 17]) == ["Hello", "Ġworld", "!"]
    assert tokenizer.decode([1, 4093, 2]) == "user"
    assert tokenizer.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (1, 2, 49152)
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2]


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_matches_transformers(tokenizer: Tokenizer, ref_tokens: dict, index: int) -> None:
    ref = ref_tokens["rows"][index]
    assert ref["text"] == TEXTS[index]
    ids = tokenizer.encode(TEXTS[index])
    assert ids == ref["ids"]
    assert tokenizer.encode(TEXTS[index], add_special_tokens=False) == ref["ids_no_special"]
    assert tokenizer.convert_ids_to_tokens(ids) == ref["tokens"]
    assert tokenizer.decode(ids) == ref["decoded"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == ref["decoded_with_special"]
    assert ref["decoded_with_special"] == TEXTS[index]  # byte-level BPE round-trips exactly


def test_special_tokens_match_transformers(tokenizer: Tokenizer, ref_tokens: dict) -> None:
    assert tokenizer.vocab_size == ref_tokens["vocab_size"]
    assert tokenizer.bos_token_id == ref_tokens["bos_token_id"]
    assert tokenizer.eos_token_id == ref_tokens["eos_token_id"]
    assert tokenizer.pad_token_id == ref_tokens["pad_token_id"]
    assert sorted(tokenizer.all_special_ids) == ref_tokens["all_special_ids"]


def test_chat_template_matches_transformers(tokenizer: Tokenizer, ref_tokens: dict) -> None:
    text = tokenizer.apply_chat_template(CHAT)
    assert text == ref_tokens["chat_text"] == CHATML
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert ids == ref_tokens["chat_ids"]
    suffix = tokenizer.encode("<|im_start|>assistant\n")
    assert ids[0] == 1 and ids[-len(suffix) :] == suffix and suffix[0] == 1


def test_chat_template_options(tokenizer: Tokenizer) -> None:
    without_prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert without_prompt == CHATML.removesuffix("<|im_start|>assistant\n")
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    assert tokenizer.apply_chat_template(CHAT, chat_template=custom) == (
        "[user] What is the capital of France?"
    )


def test_no_chat_template_raises(default_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(default_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CHAT)
    assert tok.apply_chat_template(CHAT, chat_template="{{ messages[0]['content'] }}") == (
        "What is the capital of France?"
    )


def test_background_load_matches(default_model_dir: Path, tokenizer: Tokenizer) -> None:
    """from_dir(background=True) returns at once; its first use waits and sees the same tokenizer."""
    tok = Tokenizer.from_dir(default_model_dir, background=True)
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text)
    assert tok.eos_token_id == tokenizer.eos_token_id
    assert tok.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)


def test_background_load_error_reaches_first_use(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    tok = Tokenizer.from_dir(tmp_path, background=True)  # no error yet: it loads on a thread
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever transformers raises
        tok.encode("hi")
    with pytest.raises(type(err.value)):  # and again on a later use
        tok.encode("hi")
