"""Tests for jpaged/detokenizer.py: incremental detokenization and stop strings."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from jpaged.detokenizer import IncrementalDetokenizer, check_stop, stop_holdback

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Ünïcödé çàfé naïve résumé — “smart quotes” … ½ € £",
    "日本語のテキスト、中文，한국어 and emoji 🤗🚀👩‍👩‍👧 ✓",
    "def square(x):\n    return x ** 2  # indent\n\ttab",
] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Hello world!",
    " leading space and trailing ",
    "日本語 🤗🚀 ½€ résumé",
    "<|im_start|>assistant\nThe capital is Paris.<|im_end|>",
    "👩‍👩‍👧 family, çàfé",
]


def save_hf_dir(tok: Tokenizer, directory: Path, extra: dict) -> object:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config | extra))
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A ~400-token byte-level BPE (like SmolLM2's): multi-byte characters span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    extra = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    return save_hf_dir(tok, tmp_path_factory.mktemp("byte_bpe"), extra)


@pytest.fixture(scope="module")
def sentencepiece_bpe(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Llama-2-style: Metaspace "▁" words, byte fallback, decoder strips the first space."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["a b c d e", "the capital is paris"], trainer)
    # Byte-fallback tokens are ordinary vocabulary entries (not special): add them by hand.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return save_hf_dir(Tokenizer.from_str(json.dumps(spec)), tmp_path_factory.mktemp("sp"), {})


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.append(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_streamed_text_equals_decode(byte_bpe, text: str, skip: bool) -> None:
    ids = byte_bpe.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_bpe, byte_bpe.encode("Prompt: ñ"), skip_special_tokens=skip)
    deltas = stream(detok, ids)
    assert "".join(deltas) == byte_bpe.decode(ids, skip_special_tokens=skip) == detok.output_text
    assert not any("\ufffd" in d for d in deltas)  # valid text: nothing half-decoded escapes
    assert deltas[-1] == ""  # nothing was pending at the end
    assert detok.output_token_ids == ids


def test_multibyte_character_waits_for_its_last_byte(byte_bpe) -> None:
    # "🤗" is 4 bytes; as single-byte tokens, the first three complete nothing.
    mapping = bytes_to_unicode()
    ids = [byte_bpe.convert_tokens_to_ids(mapping[b]) for b in "a🤗b".encode()]
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=True)
    assert [detok.append(i) for i in ids] == ["a", "", "", "", "🤗", "b"]
    assert detok.flush() == ""


def test_flush_releases_an_incomplete_character(byte_bpe) -> None:
    mapping = bytes_to_unicode()
    ids = [byte_bpe.convert_tokens_to_ids(mapping[b]) for b in "x€".encode()[:-1]]
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=True)
    assert [detok.append(i) for i in ids] == ["x", "", ""]
    assert detok.flush() == "\ufffd" == byte_bpe.decode(ids)[1:]


def test_prompt_ending_inside_a_character_is_not_completed(byte_bpe) -> None:
    mapping = bytes_to_unicode()
    euro = [byte_bpe.convert_tokens_to_ids(mapping[b]) for b in "€".encode()]
    detok = IncrementalDetokenizer(byte_bpe, euro[:2], skip_special_tokens=True)
    deltas = stream(detok, [euro[2], byte_bpe.convert_tokens_to_ids("a")])
    assert "".join(deltas) == byte_bpe.decode(euro[2:3] + [byte_bpe.convert_tokens_to_ids("a")])
    assert "".join(deltas) == "\ufffda"


def test_skipped_special_tokens_emit_nothing(byte_bpe) -> None:
    ids = byte_bpe.encode("Hi<|im_end|><|endoftext|> there", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=True)
    deltas = stream(detok, ids)
    assert "".join(deltas) == "Hi there"
    shown = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=False)
    assert "".join(stream(shown, ids)) == "Hi<|im_end|><|endoftext|> there"
    # ByteLevel puts no separator between special tokens, so the flag changes nothing.
    tight = IncrementalDetokenizer(byte_bpe, [], False, spaces_between_special_tokens=False)
    assert "".join(stream(tight, ids)) == "Hi<|im_end|><|endoftext|> there"


def test_spaces_between_special_tokens_false(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    hf = save_hf_dir(tok, tmp_path / "wp", {})
    ids = [3, 1, 2, 4, 5]
    assert hf.decode(ids, skip_special_tokens=False) == "hello [CLS] [SEP] worlds"
    spaced = IncrementalDetokenizer(hf, [4], skip_special_tokens=False)
    assert "".join(stream(spaced, ids)) == " hello [CLS] [SEP] worlds"
    tight = IncrementalDetokenizer(hf, [4], False, spaces_between_special_tokens=False)
    assert stream(tight, ids) == [" hello", " [CLS]", "[SEP]", " world", "s", ""]


def test_sentencepiece_first_token_keeps_its_space(sentencepiece_bpe) -> None:
    tok = sentencepiece_bpe
    prompt = tok.encode("the capital", add_special_tokens=False)
    out = tok.encode("is Paris ½€🤗", add_special_tokens=False)  # "▁is", ..., byte tokens
    assert "<0xF0>" in tok.convert_ids_to_tokens(out)  # 🤗 falls back to its 4 bytes
    full = tok.decode(prompt + out)
    assert full == "the capital is Paris ½€🤗"
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    deltas = stream(detok, out)
    assert "".join(deltas) == full[len(tok.decode(prompt)) :] == " is Paris ½€🤗"
    assert deltas[0] == " is"
    assert tok.decode(out) == "is Paris ½€🤗"  # what decoding the output alone would lose
    assert not any("\ufffd" in d for d in deltas)
    # No prompt: same as decoding the output alone.
    assert "".join(stream(IncrementalDetokenizer(tok, [], True), out)) == tok.decode(out)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_ids_stream_to_decode(byte_bpe, data: st.DataObject) -> None:
    """Any id sequence (lone continuation bytes, specials, ...): the stream is always a
    prefix of the final decode and ends equal to it."""
    vocab = len(byte_bpe)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8), label="prompt")
    skip = data.draw(st.booleans(), label="skip")
    prompt_text = byte_bpe.decode(prompt, skip_special_tokens=skip)
    expected = byte_bpe.decode(ids, skip_special_tokens=skip)
    if prompt_text and not prompt_text.endswith("\ufffd"):
        # The output continues a complete prompt: its bytes decode on their own.
        assert byte_bpe.decode(prompt + ids, skip_special_tokens=skip).startswith(prompt_text)
    detok = IncrementalDetokenizer(byte_bpe, prompt, skip_special_tokens=skip)
    text = ""
    for token_id in ids:
        text += detok.append(token_id)
        assert expected.startswith(text)
    text += detok.flush()
    assert text == expected


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.sampled_from("ab €½🤗日\n "), max_size=30))
def test_encoded_text_never_streams_replacement_chars(byte_bpe, text: str) -> None:
    ids = byte_bpe.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=True)
    deltas = stream(detok, ids)
    assert "".join(deltas) == text
    assert "\ufffd" not in "".join(deltas)


def test_window_stays_small(byte_bpe) -> None:
    """O(1) per token: the decoded window does not grow with the sequence."""
    ids = byte_bpe.encode("Hello world! " * 200, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=True)
    for token_id in ids:
        detok.append(token_id)
        assert len(detok._token_ids) - detok._prefix_offset <= 3
    assert detok.output_text == "Hello world! " * 200


@pytest.mark.skipif(
    not glob.glob(str(Path.home() / ".cache/jpaged/models/*/tokenizer.json")),
    reason="default model not converted (~/.cache/jpaged/models/*/tokenizer.json)",
)
def test_default_model_tokenizer() -> None:
    path = Path(glob.glob(str(Path.home() / ".cache/jpaged/models/*/tokenizer.json"))[0]).parent
    tok = AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, tok.encode("<|im_start|>assistant\n"), skip)
            assert "".join(stream(detok, ids)) == tok.decode(ids, skip_special_tokens=skip)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------- stop strings ----------


def test_check_stop_exact() -> None:
    # Stop string arrives within the new delta.
    assert check_stop("Hello###world", 8, ["###"], False) == (5, "###")
    assert check_stop("Hello###world", 8, ["###"], True) == (8, "###")
    # Straddles the old/new boundary: "He" + "llo".
    assert check_stop("Say Hello", 3, ["Hello"], False) == (4, "Hello")
    # Entirely inside old text: already checked before, not found again.
    assert check_stop("ab STOP cd", 2, ["STOP"], False) == (None, None)
    # Several stop strings: the one completed first wins, whatever the list order.
    assert check_stop("xxabcd", 4, ["abcd", "c"], False) == (4, "c")
    assert check_stop("xxabcd", 4, ["bc", "abc"], False) == (2, "abc")  # same end: earliest start
    assert check_stop("xxabcd", 4, ["bc", "abc"], True) == (5, "abc")
    assert check_stop("no match here", 4, ["zz"], False) == (None, None)
    assert check_stop("", 0, ["a"], False) == (None, None)
    assert check_stop("END", 3, ["END"], False) == (0, "END")


@given(
    text=st.text(alphabet="abc", max_size=25),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    splits=st.lists(st.integers(1, 5), max_size=30),
    include=st.booleans(),
)
def test_streaming_never_shows_a_cut_stop_string(
    text: str, stops: list[str], splits, include
) -> None:
    """Feed `text` in chunks: the result equals a one-shot scan, and what was shown while
    streaming (text minus holdback) is always a prefix of the final output."""
    # Reference: the earliest-ending match over the whole text.
    ref = None
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            longest = max(hits, key=len)
            ref = (end if include else end - len(longest), longest)
            break
    final, shown, pos = None, "", 0
    sizes = iter(splits)
    while pos < len(text):
        prev, pos = pos, min(len(text), pos + next(sizes, 3))
        cut, matched = check_stop(text[:pos], pos - prev, stops, include)
        if matched is not None:
            final = (cut, matched)
            break
        visible = text[: pos - stop_holdback(text[:pos], stops, include)]
        assert visible.startswith(shown)
        shown = visible
    assert final == ref
    output = text if final is None else text[: final[0]]
    assert output.startswith(shown)


def test_stop_holdback_exact() -> None:
    assert stop_holdback("Hello wor", ["world"], False) == 3
    assert stop_holdback("Hello wor", ["world"], True) == 0
    assert stop_holdback("Hello w", ["world", "w!"], False) == 1
    assert stop_holdback("abab", ["ababc"], False) == 4
    assert stop_holdback("xaba", ["abc", "bax"], False) == 2  # "ba" from "bax" beats "a" from "abc"
    assert stop_holdback("Hello", ["xyz"], False) == 0
    assert stop_holdback("", ["a"], False) == 0
    assert stop_holdback("STO", ["STOP"], False) == 3
