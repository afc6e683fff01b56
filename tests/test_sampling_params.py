"""Tests for jpaged/sampling_params.py (and the plain output dataclasses in jpaged/outputs.py)."""

from __future__ import annotations

import dataclasses

import pytest

from jpaged import sampler
from jpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jpaged.sampling_params import SAMPLING_EPS, SamplingParams


def test_defaults_are_vllms() -> None:
    assert dataclasses.asdict(SamplingParams()) == dict(
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        seed=None,
        stop=[],
        stop_token_ids=[],
        include_stop_str_in_output=False,
        ignore_eos=False,
        max_tokens=16,
        min_tokens=0,
        logprobs=None,
        prompt_logprobs=None,
        skip_special_tokens=True,
        spaces_between_special_tokens=True,
    )


def test_normalisation() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, 8), temperature=1, top_p=1)
    assert p.top_k == 0
    assert p.stop == ["###"] and p.stop_token_ids == [7, 8]
    assert type(p.temperature) is float and type(p.top_p) is float
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None
    edge = SamplingParams(
        temperature=0.0,
        top_p=1e-9,
        min_p=1.0,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=20,
        prompt_logprobs=0,
        min_tokens=16,
        seed=-5,
    )
    assert (edge.presence_penalty, edge.frequency_penalty, edge.seed) == (-2.0, 2.0, -5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=0), "n must be >= 1, got 0"),
        (dict(temperature=-1), "temperature must be >= 0, got -1"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-2), "top_k must be -1 .* got -2"),
        (dict(top_k=2.0), "top_k must be an int, got 2.0"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\], got -0.1"),
        (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\], got 2.5"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\], got -3"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
        (dict(max_tokens=0), "max_tokens must be >= 1 or None, got 0"),
        (dict(min_tokens=-1), "min_tokens must be >= 0, got -1"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens must be <= max_tokens=4, got 5"),
        (dict(logprobs=21), r"logprobs must be in \[0, 20\] or None, got 21"),
        (dict(logprobs=-1), r"logprobs must be in \[0, 20\]"),
        (dict(prompt_logprobs=100), r"prompt_logprobs must be in \[0, 20\]"),
        (dict(seed=1.5), "seed must be an int or None, got 1.5"),
        (dict(stop=[""]), "stop must contain only non-empty strings"),
        (dict(stop=["ok", 3]), "stop must contain only non-empty strings, got 3"),
        (dict(stop=""), "stop must contain only non-empty strings"),
        (dict(stop=5), "stop must be a str, a list of str or None"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must contain ints >= 0, got -1"),
        (dict(stop_token_ids=7), "stop_token_ids must be a list of int or None"),
        # bool is not an int, and not a number
        (dict(n=True), "n must be an int, got True"),
        (dict(max_tokens=False), "max_tokens must be an int or None, got False"),
        (dict(temperature=True), "temperature must be a finite number, got True"),
        (dict(stop_token_ids=[True]), "stop_token_ids must contain ints >= 0, got True"),
        (dict(ignore_eos=1), "ignore_eos must be a bool, got 1"),
        (dict(skip_special_tokens=None), "skip_special_tokens must be a bool, got None"),
        (dict(temperature="0.5"), "temperature must be a finite number, got '0.5'"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_is_greedy_uses_the_samplers_threshold() -> None:
    assert sampler.SAMPLING_EPS is SAMPLING_EPS == 1e-5
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    assert not SamplingParams().is_greedy


def test_clone_copies_lists() -> None:
    p = SamplingParams(stop=["x"], stop_token_ids=[3], seed=4, top_k=-1)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(9)
    assert p.stop == ["x"] and p.stop_token_ids == [3]


def test_slots_reject_unknown_attributes() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().best_of = 2  # type: ignore[attr-defined]


def test_outputs_are_plain_dataclasses() -> None:
    running = CompletionOutput(
        0, "Hi", [5, 6], -1.5, [{5: Logprob(-1.0, 1, "Hi")}, {6: Logprob(-0.5)}]
    )
    assert not running.finished()
    done = dataclasses.replace(running, finish_reason="stop", stop_reason="###")
    assert done.finished()
    metrics = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.25)
    assert (metrics.time_in_queue, metrics.time_to_first_token) == (0.5, 1.25)
    assert RequestMetrics(arrival_time=1.0).time_to_first_token is None
    out = RequestOutput("req-1", "Hello", [1, 2], None, [done], finished=True, metrics=metrics)
    assert repr(out).startswith(
        "RequestOutput(request_id='req-1', prompt='Hello', prompt_token_ids=[1, 2]"
    )
    assert "finish_reason='stop', stop_reason='###'" in repr(out)
    assert repr(Logprob(-0.25, 2)) == "Logprob(logprob=-0.25, rank=2, decoded_token=None)"
