"""Tests for jpaged/sampler.py: greedy, filters, seeded draws, penalties, logprobs, padding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import sampler
from jpaged.sampler import apply_penalties, compute_logprobs, sample, sampling_weights
from jpaged.sampling_params import SamplingParams
from jpaged.sampling_tensors import SamplingRow, SamplingTensors, build_sampling_tensors

_sample = jax.jit(sample, static_argnums=2)
_weights = jax.jit(sampling_weights)
_penalties = jax.jit(apply_penalties)


def tensors(rows: list[SamplingRow], num_rows: int | None = None) -> SamplingTensors:
    return build_sampling_tensors(rows, len(rows) if num_rows is None else num_rows)


def row(seed: int = 0, step: int = 0, prompt=(), output=(), eos=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, step, list(prompt), list(output), list(eos))


def draw(logits: np.ndarray, rows: list[SamplingRow], num_logprobs: int = 0, pad: int = 8):
    """Sample rows of `logits`, padded to `pad` rows (few distinct shapes -> few compilations)."""
    t = tensors(rows, max(pad, len(rows)))
    padded = np.zeros((t.temperature.shape[0], logits.shape[1]), np.float32)
    padded[: len(logits)] = logits
    return _sample(jnp.asarray(padded), t, num_logprobs)


def random_logits(num_rows: int, vocab: int, seed: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((num_rows, vocab)) * scale).astype(
        np.float32
    )


# ---------- numpy reference of the filters (float64) ----------


def ref_distribution(logits: np.ndarray, temperature: float, top_k=0, top_p=1.0, min_p=0.0):
    s = logits.astype(np.float64) / temperature
    p = np.exp(s - s.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k:
        keep &= s >= np.sort(s)[::-1][top_k - 1]
    if top_p < 1.0:
        pk = np.where(keep, p, 0.0)
        pk /= pk.sum()
        above = np.array([pk[s > v].sum() for v in s])  # mass strictly above each token
        keep &= above < top_p
    if min_p:
        keep &= p >= min_p * p.max()
    w = np.where(keep, p, 0.0)
    return w / w.sum()


# Upper 0.1% points of chi-square by the Wilson-Hilferty approximation, within 1.5% of the
# exact values for df >= 4: df=4 -> 18.72 (exact 18.47), df=9 -> 28.0 (27.88), df=31 -> 61.1 (61.10).
def chi2_critical_999(df: int) -> float:
    z = 3.0902  # standard normal upper 0.1% point
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Statistic and degrees of freedom over the tokens with probs > 0; tokens expected
    fewer than 5 times are pooled into one bin."""
    n = counts.sum()
    support = probs > 0
    expected, observed = n * probs[support], counts[support].astype(np.float64)
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    stat = float(((observed - expected) ** 2 / expected).sum())
    return stat, len(expected) - 1


def test_chi2_critical_values() -> None:
    assert chi2_critical_999(4) == pytest.approx(18.467, rel=0.015)
    assert chi2_critical_999(9) == pytest.approx(27.877, rel=0.015)
    assert chi2_critical_999(31) == pytest.approx(61.098, rel=0.015)


# ---------- greedy ----------


def test_greedy_is_first_argmax() -> None:
    logits = random_logits(8, 1000, seed=1)
    logits[3, [10, 500, 999]] = 50.0  # ties: the lowest id wins
    logits[5, :] = 0.0  # all equal -> 0
    out = draw(logits, [row(temperature=0.0, seed=i) for i in range(8)])
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(logits, axis=1))
    assert int(out.token_ids[3]) == 10 and int(out.token_ids[5]) == 0


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_top_k_1_is_greedy(temperature: float) -> None:
    logits = random_logits(8, 1000, seed=2)
    rows = [row(temperature=temperature, top_k=1, seed=i, step=i) for i in range(8)]
    np.testing.assert_array_equal(np.asarray(draw(logits, rows).token_ids), logits.argmax(1))


# ---------- seeded draws do not depend on the batch ----------

MIXED = [
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_k=300),  # k > 128 candidates -> bisection path
    dict(temperature=0.0),
    dict(temperature=1.3, min_p=0.05, top_k=20),
    dict(temperature=2.0, top_p=0.99),  # flat nucleus -> bisection path
    dict(temperature=1.0),
]


def test_seeded_row_independent_of_position_and_batch() -> None:
    vocab = 1000
    logits = random_logits(1 + len(MIXED), vocab, seed=3, scale=1.0)
    bisected = dict(temperature=1.5, top_p=0.95, top_k=200, min_p=0.01)
    from_candidates = dict(temperature=0.5, top_p=0.5, top_k=20)  # alone: no bisection at all
    for target, seed, step in [
        (bisected, 7, 0),
        (bisected, 7, 1),
        (bisected, 123456789, 42),
        (from_candidates, 2**32 - 1, 5),
        (from_candidates, 3, 1000),
    ]:
        alone = int(draw(logits[:1], [row(seed, step, **target)]).token_ids[0])
        for pad in (1, 8, 16):
            assert int(draw(logits[:1], [row(seed, step, **target)], pad=pad).token_ids[0]) == alone
        for position in (0, 3, 6):
            rows = [row(100 + i, i, **p) for i, p in enumerate(MIXED)]
            batch = list(logits[1:])
            rows.insert(position, row(seed, step, **target))
            batch.insert(position, logits[0])
            for pad in (8, 16):
                out = draw(np.stack(batch), rows, pad=pad)
                assert int(out.token_ids[position]) == alone, (seed, step, position, pad)


def test_seed_and_step_change_the_draw() -> None:
    logits = np.zeros((16, 1000), np.float32)  # uniform
    same = [row(5, 3, temperature=1.0) for _ in range(16)]
    ids = np.asarray(draw(logits, same, pad=16).token_ids)
    assert (ids == ids[0]).all()
    by_seed = draw(logits, [row(i, 3, temperature=1.0) for i in range(16)], pad=16).token_ids
    by_step = draw(logits, [row(5, i, temperature=1.0) for i in range(16)], pad=16).token_ids
    # 16 uniform draws from 1000 ids: >= 14 distinct with probability > 0.99.
    assert len(set(np.asarray(by_seed).tolist())) >= 14
    assert len(set(np.asarray(by_step).tolist())) >= 14


# ---------- empirical distributions ----------

NUM_DRAWS = 20_000
CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.4, top_k=12, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_empirical_distribution_matches_filtered_softmax(case: dict) -> None:
    vocab = 32
    logits = random_logits(1, vocab, seed=4, scale=1.0)[0]
    expected = ref_distribution(logits, **case)
    # No token sits on a top-p boundary (else float32 vs float64 could disagree).
    if case.get("top_p", 1.0) < 1.0:
        cum = np.cumsum(
            np.sort(ref_distribution(logits, case["temperature"], case.get("top_k", 0)))[::-1]
        )
        assert np.abs(cum - case["top_p"]).min() > 1e-3
    rows = [row(seed, 0, **case) for seed in range(NUM_DRAWS)]
    out = draw(np.broadcast_to(logits, (NUM_DRAWS, vocab)), rows, pad=NUM_DRAWS)
    counts = np.bincount(np.asarray(out.token_ids), minlength=vocab)
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    stat, df = chi2(counts, expected)
    assert stat < chi2_critical_999(df), (stat, df)
    if case == dict(temperature=0.6):  # the test has power: T=1 is rejected
        wrong, _ = chi2(counts, ref_distribution(logits, 1.0))
        assert wrong > 10 * chi2_critical_999(df)


def test_multi_block_inverse_cdf() -> None:
    """V spans several 256-wide CDF blocks (the last partial); support spread over them."""
    vocab = 600
    logits = np.full(vocab, -np.inf, np.float32)
    support = np.array([0, 1, 255, 256, 300, 511, 512, 599])
    logits[support] = np.log(np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32))
    expected = np.zeros(vocab)
    expected[support] = np.arange(1, 9) / 36
    num_draws = NUM_DRAWS // 2
    rows = [row(seed, 9, temperature=1.0) for seed in range(num_draws)]
    out = draw(np.broadcast_to(logits, (num_draws, vocab)), rows, pad=num_draws)
    counts = np.bincount(np.asarray(out.token_ids), minlength=vocab)
    assert counts[expected == 0].sum() == 0
    stat, df = chi2(counts, expected)
    assert stat < chi2_critical_999(df), stat


# ---------- exact filter sets (candidate path and bisection fallback) ----------


@pytest.mark.parametrize(
    ("params", "scale", "path"),
    [
        (dict(top_k=50), 3.0, "candidates"),
        (dict(top_k=400), 0.7, "bisection"),  # k > 128 candidates
        (dict(top_p=0.3), 3.0, "candidates"),  # nuclei of 2..15 tokens
        (dict(top_p=0.9), 0.7, "bisection"),  # nuclei of 700+ tokens
        (dict(top_p=0.9), 3.0, "mixed"),  # 64 tokens in row 0, 184+ in the others
        (dict(top_k=400, top_p=0.5), 3.0, "bisection"),  # top-k bisected, top-p candidates
        (dict(min_p=0.3), 0.7, "no search"),
        (dict(top_k=30, top_p=0.7, min_p=0.2), 3.0, "candidates"),
    ],
)
def test_filtered_set_is_exact(params: dict, scale: float, path: str) -> None:
    vocab, num_rows = 1000, 4
    logits = random_logits(num_rows, vocab, seed=5, scale=scale)
    rows = [row(i, temperature=1.0 + 0.25 * i, **params) for i in range(num_rows)]
    weights = np.asarray(_weights(jnp.asarray(logits), tensors(rows)))
    fits = []  # per row: can the candidate set alone decide its filters?
    for i in range(num_rows):
        temperature = 1.0 + 0.25 * i
        expected = ref_distribution(logits[i], temperature, **params)
        np.testing.assert_array_equal(weights[i] > 0, expected > 0)
        np.testing.assert_allclose(weights[i] / weights[i].sum(), expected, atol=1e-6)
        top_k, top_p = params.get("top_k", 0), params.get("top_p", 1.0)
        nucleus = (ref_distribution(logits[i], temperature, top_k, top_p) > 0).sum()
        fits.append(
            top_k <= sampler._NUM_CANDIDATES and (top_p == 1.0 or nucleus < sampler._NUM_CANDIDATES)
        )
    if "top_k" not in params and "top_p" not in params:
        assert path == "no search"
    else:
        assert path == ("candidates" if all(fits) else "bisection" if not any(fits) else "mixed")


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = np.array([[0.0, 3.0, 1.0, 3.0, 1.0, 1.0, 2.0, -1.0]], np.float32)
    weights = np.asarray(_weights(jnp.asarray(logits), tensors([row(temperature=1.0, top_k=4)])))
    np.testing.assert_array_equal(weights[0] > 0, [0, 1, 1, 1, 1, 1, 1, 0])


def test_bisections_are_exact() -> None:
    logits = random_logits(8, 1000, seed=6)
    logits[0, :500] = logits[0, 500:]  # every value twice: ties are counted
    logits[1, 10:] = -np.inf
    k = np.array([1, 7, 9, 300, 999, 1000, 64, 0], np.int32)
    got = np.asarray(jax.jit(sampler._bisect_top_k)(jnp.asarray(logits), jnp.asarray(k)))
    expected = np.sort(logits, axis=1)[:, ::-1][np.arange(8), np.maximum(k - 1, 0)]
    np.testing.assert_array_equal(got[:7], expected[:7])
    assert got[7] == -np.inf
    probs = np.exp(logits - logits.max(1, keepdims=True))
    mass = np.float32(0.7) * probs.sum(1)
    got_p = np.asarray(jax.jit(sampler._bisect_top_p)(jnp.asarray(probs), jnp.asarray(mass)))
    for i in range(8):
        above = np.array([probs[i][probs[i] > v].sum() for v in probs[i]])
        assert got_p[i] == probs[i][above < mass[i]].min()


def test_order_key_is_monotone() -> None:
    values = np.array(
        [-np.inf, -3e38, -1.5, -1e-30, 0.0, 1e-45, 1e-30, 2.0, 3e38, np.inf], np.float32
    )
    keys = np.asarray(sampler._order_key(jnp.asarray(values)))
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    np.testing.assert_array_equal(np.asarray(sampler._key_value(jnp.asarray(keys))), values)


# ---------- penalties ----------


def ref_penalties(logits, prompt, output, rep, freq, pres):
    out = logits.copy()
    counts = np.bincount(np.asarray(output, np.int64), minlength=logits.shape[0]).astype(np.float32)
    seen = counts > 0
    seen[list(prompt)] = True
    out = np.where(seen, np.where(out > 0, out / np.float32(rep), out * np.float32(rep)), out)
    out = out - np.float32(freq) * counts
    out = out - np.float32(pres) * (counts > 0).astype(np.float32)
    return out


def test_penalties_match_formulas() -> None:
    vocab = 64
    logits = random_logits(3, vocab, seed=7)
    specs = [
        dict(prompt=[1, 2, 2, 3], output=[3, 3, 3, 9, 60], rep=1.3, freq=0.5, pres=0.25),
        dict(prompt=[5], output=[], rep=0.7, freq=0.0, pres=0.0),
        dict(prompt=[], output=[0, 0, 63], rep=1.0, freq=-0.5, pres=1.5),
    ]
    rows = [
        row(
            prompt=s["prompt"],
            output=s["output"],
            repetition_penalty=s["rep"],
            frequency_penalty=s["freq"],
            presence_penalty=s["pres"],
        )
        for s in specs
    ]
    t = tensors(rows, 4)
    assert t.prompt_token_ids.shape == (4, 16) and t.output_token_ids.shape == (4, 16)
    got = np.asarray(
        _penalties(jnp.asarray(np.vstack([logits, np.zeros((1, vocab), np.float32)])), t)
    )
    for i, s in enumerate(specs):
        expected = ref_penalties(
            logits[i], s["prompt"], s["output"], s["rep"], s["freq"], s["pres"]
        )
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[3], 0.0)  # padding row untouched
    # A penalty really moved the values it should.
    assert got[0, 3] != logits[0, 3] and got[0, 4] == logits[0, 4]


def test_greedy_uses_penalised_logits() -> None:
    logits = np.zeros((1, 1000), np.float32)
    logits[0, :2] = [5.0, 4.0]
    out = draw(logits, [row(temperature=0.0, output=[0], presence_penalty=2.0, logprobs=0)])
    assert int(out.token_ids[0]) == 1
    assert float(out.logprob[0]) == pytest.approx(float(jax.nn.log_softmax(logits[0])[1]), abs=1e-6)


def test_logprob_computed_only_where_a_row_wants_it() -> None:
    """No row asks (logprobs None, n = 1): the ids alone, logprob 0 and rank 1; one row asking
    (logprobs=0, or n > 1) computes them for the step."""
    logits = random_logits(3, 1000, seed=4)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=1))
    plain = [row(0, temperature=0.0), row(1, temperature=0.9), row(2, temperature=0.0)]
    out = jax.tree.map(lambda x: np.asarray(x)[:3], draw(logits, plain))
    np.testing.assert_array_equal(out.logprob, 0.0)
    np.testing.assert_array_equal(out.rank, 1)
    for asking in (row(2, temperature=0.0, logprobs=0), row(2, temperature=0.0, n=2)):
        got = jax.tree.map(lambda x: np.asarray(x)[:3], draw(logits, [*plain[:2], asking]))
        np.testing.assert_array_equal(got.token_ids, out.token_ids)
        np.testing.assert_allclose(got.logprob, ref[np.arange(3), got.token_ids], atol=1e-5)


def test_min_tokens_bans_stop_ids() -> None:
    logits = np.zeros((1, 1000), np.float32)
    logits[0, :5] = [0.0, 9.0, 8.0, 1.0, 7.0]
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert int(draw(logits, [row(step=0, eos=[1], **params)]).token_ids[0]) == 4
    assert int(draw(logits, [row(step=1, eos=[1], ignore_eos=True, **params)]).token_ids[0]) == 1
    assert int(draw(logits, [row(step=2, eos=[1], **params)]).token_ids[0]) == 1
    t = tensors([row(step=0, eos=[1], **params), row(step=5, eos=[1], **params)])
    np.testing.assert_array_equal(t.banned_token_ids[:, :3], [[2, 1, -1], [-1, -1, -1]])


# ---------- logprobs ----------


def test_logprobs_are_raw_log_softmax() -> None:
    logits = random_logits(4, 1000, seed=8)
    rows = [
        row(0, temperature=0.0),
        row(1, temperature=0.7, top_k=10),
        row(2, temperature=1.2, top_p=0.5, output=[1, 2, 3], repetition_penalty=1.5),
        row(3, temperature=1.0, presence_penalty=1.0, output=[5]),
    ]
    out = jax.tree.map(lambda x: np.asarray(x)[:4], draw(logits, rows, num_logprobs=5))
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=1))
    ids = out.token_ids
    np.testing.assert_allclose(out.logprob, ref[np.arange(4), ids], atol=1e-5)
    top_ids = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(out.top_token_ids, top_ids)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, top_ids, 1), atol=1e-5)
    ranks = (logits >= logits[np.arange(4), ids][:, None]).sum(1)
    np.testing.assert_array_equal(out.rank, ranks)
    assert out.rank[0] == 1 and (out.rank[1:] > 1).any()  # sampled rows are not all the argmax
    assert draw(logits, rows).top_logprobs.shape == (8, 0)


def test_compute_logprobs_for_prompt_tokens() -> None:
    logits = random_logits(6, 50, seed=9)
    next_ids = np.array([3, 0, 49, 7, 7, 20], np.int32)
    out = jax.jit(compute_logprobs, static_argnums=2)(jnp.asarray(logits), jnp.asarray(next_ids), 3)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=1))
    np.testing.assert_allclose(np.asarray(out.logprob), ref[np.arange(6), next_ids], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.token_ids), next_ids)
    np.testing.assert_array_equal(np.asarray(out.top_token_ids), np.argsort(-logits, 1)[:, :3])


# ---------- host tensors ----------


def test_build_sampling_tensors_padding() -> None:
    rows = [
        row(
            11,
            2,
            prompt=[4, 5],
            output=[6],
            temperature=0.7,
            top_p=0.9,
            top_k=-1,
            min_p=0.1,
            repetition_penalty=1.1,
            frequency_penalty=0.2,
            presence_penalty=0.3,
        ),
        row(2**32 + 3, 0, prompt=[1], output=[], temperature=0.0, top_k=5),
    ]
    t = build_sampling_tensors(rows, 4)
    np.testing.assert_allclose(t.temperature, [0.7, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(t.top_p, [0.9, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(t.top_k, [0, 0, 0, 0])  # greedy rows keep no filters
    np.testing.assert_allclose(t.min_p, [0.1, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(t.repetition_penalty, [1.1, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(t.frequency_penalty, [0.2, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(t.presence_penalty, [0.3, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(t.seed, [11, 3, 0, 0])
    assert t.seed.dtype == np.uint32 and t.step.dtype == np.int32
    np.testing.assert_array_equal(t.step, [2, 0, 0, 0])
    # Only the penalised row's ids are kept; width bucketed to 16.
    assert t.prompt_token_ids.shape == (4, 16) and t.output_token_ids.shape == (4, 16)
    np.testing.assert_array_equal(
        t.prompt_token_ids[:, :3], [[4, 5, -1], [-1] * 3, [-1] * 3, [-1] * 3]
    )
    np.testing.assert_array_equal(
        t.output_token_ids[:, :2], [[6, -1], [-1, -1], [-1, -1], [-1, -1]]
    )
    assert t.banned_token_ids.shape == (4, 0)
    plain = build_sampling_tensors([row(temperature=1.0, prompt=range(40), output=range(40))], 2)
    assert plain.prompt_token_ids.shape == (2, 0) and plain.output_token_ids.shape == (2, 0)
    long = build_sampling_tensors(
        [row(prompt=range(40), output=range(17), repetition_penalty=2.0)], 1
    )
    assert long.prompt_token_ids.shape == (1, 64) and long.output_token_ids.shape == (1, 32)
    with pytest.raises(ValueError, match="num_rows_padded"):
        build_sampling_tensors(rows, 1)
