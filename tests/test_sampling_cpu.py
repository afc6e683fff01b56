"""pallas_kernels.sampling_cpu (the sampler's C++ row reductions) against the XLA path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.paths import kernels_cache_dir
from jpaged.sampler import _argmax, compute_logprobs, sample
from jpaged.sampling_params import SamplingParams
from jpaged.sampling_tensors import SamplingRow, build_sampling_tensors
from pallas_kernels import sampling_cpu

pytestmark = pytest.mark.skipif(
    not sampling_cpu.load(kernels_cache_dir()),
    reason="no C++ compiler / AVX-512 or AVX2 + FMA here",
)


def logits_with_edges(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """Random rows, plus ties at the max, -inf entries, a one-hot and an all -inf row."""
    x = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    x[1, [min(3, vocab - 1), vocab - 1]] = 50.0  # a tie: the first index wins
    x[2, ::3] = -np.inf
    x[3] = -np.inf
    x[3, vocab // 2] = 0.0
    x[4] = -np.inf
    x[5] = np.round(x[5])  # many equal values: ranks count ties
    return x


@pytest.mark.parametrize("vocab", [1, 15, 16, 37, 1000, 49152])
def test_row_argmax_is_first_max(vocab):
    x = logits_with_edges(np.random.default_rng(vocab), 8, vocab)
    got = np.asarray(jax.jit(sampling_cpu.row_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=1))
    np.testing.assert_array_equal(got, np.asarray(_argmax(jnp.asarray(x))))


def test_row_argmax_nan_row_gives_vocab_like_the_xla_path():
    x = np.zeros((3, 40), np.float32)
    x[1, 7] = np.nan
    got = np.asarray(sampling_cpu.row_argmax(jnp.asarray(x)))
    assert got.tolist() == [0, 40, 0] == np.asarray(_argmax(jnp.asarray(x))).tolist()


@pytest.mark.parametrize("vocab", [1, 15, 37, 1000, 49152])
def test_row_logprob_matches_logsumexp_and_rank(vocab):
    rng = np.random.default_rng(vocab)
    x = logits_with_edges(rng, 8, vocab)
    ids = rng.integers(0, vocab, 8).astype(np.int32)
    ids[0] = -5  # clipped to 0, as take_along_axis would clamp
    lse, rank = jax.jit(sampling_cpu.row_logprob)(jnp.asarray(x), jnp.asarray(ids))
    want_lse = np.asarray(jax.nn.logsumexp(jnp.asarray(x), axis=1))
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=2e-6, atol=2e-6)
    chosen = x[np.arange(8), np.clip(ids, 0, vocab - 1)]
    np.testing.assert_array_equal(np.asarray(rank), (x >= chosen[:, None]).sum(axis=1))


def test_row_logprob_nan_row():
    x = np.zeros((2, 20), np.float32)
    x[0, 3] = np.nan
    lse, rank = sampling_cpu.row_logprob(jnp.asarray(x), jnp.asarray([3, 3], jnp.int32))
    assert np.isnan(float(lse[0])) and int(rank[0]) == 0  # NaN compares false, as jnp does
    assert float(lse[1]) == pytest.approx(np.log(20.0)) and int(rank[1]) == 20


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="float32"):
        sampling_cpu.row_argmax(jnp.zeros((2, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"\[S, V > 0\]"):
        sampling_cpu.row_argmax(jnp.zeros((2, 0), jnp.float32))
    with pytest.raises(ValueError, match="ids"):
        sampling_cpu.row_logprob(jnp.zeros((2, 3), jnp.float32), jnp.zeros((3,), jnp.int32))


def test_sample_with_kernels_equals_xla_path():
    """Greedy, penalised, banned and sampled rows: the same ids and ranks, logprobs to ~1e-6."""
    rng = np.random.default_rng(0)
    vocab = 4099
    logits = jnp.asarray(rng.standard_normal((12, vocab)).astype(np.float32) * 4)
    params = [
        SamplingParams(temperature=0, max_tokens=4, logprobs=0),  # the step computes logprobs
        SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=4, seed=3),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4, seed=4),
        SamplingParams(temperature=0, max_tokens=4, min_tokens=2),
    ]
    rows = [
        SamplingRow(params[i % len(params)], seed=i, step=1, prompt_token_ids=[1, 2, 3],
                    output_token_ids=[5, 5, 9], eos_token_ids=[int(np.argmax(logits[i]))])
        for i in range(12)
    ]  # fmt: skip
    t = build_sampling_tensors(rows, 16)
    pad = jnp.concatenate([logits, jnp.zeros((4, vocab), jnp.float32)])
    for num_logprobs in (0, 3):
        xla = jax.jit(lambda x, t, k=num_logprobs: sample(x, t, k, False))(pad, t)
        cpu = jax.jit(lambda x, t, k=num_logprobs: sample(x, t, k, True))(pad, t)
        np.testing.assert_array_equal(np.asarray(cpu.token_ids), np.asarray(xla.token_ids))
        np.testing.assert_array_equal(np.asarray(cpu.rank), np.asarray(xla.rank))
        np.testing.assert_array_equal(np.asarray(cpu.top_token_ids), np.asarray(xla.top_token_ids))
        np.testing.assert_allclose(np.asarray(cpu.logprob), np.asarray(xla.logprob), atol=2e-5)
        np.testing.assert_allclose(
            np.asarray(cpu.top_logprobs), np.asarray(xla.top_logprobs), atol=2e-5
        )
    prompt = compute_logprobs(pad, jnp.arange(16, dtype=jnp.int32), 2, cpu_kernels=True)
    want = compute_logprobs(pad, jnp.arange(16, dtype=jnp.int32), 2)
    np.testing.assert_array_equal(np.asarray(prompt.rank), np.asarray(want.rank))
    np.testing.assert_allclose(np.asarray(prompt.logprob), np.asarray(want.logprob), atol=2e-5)


CONCURRENT_CALLS = """
import jax, jax.numpy as jnp, numpy as np
from jpaged.paths import kernels_cache_dir
from pallas_kernels import sampling_cpu
assert sampling_cpu.load(kernels_cache_dir())

@jax.jit
def many(a, ids):
    # 16 independent chains, so XLA's thunk executor runs custom calls side by side on its pool
    xs = [jnp.sin(a * (j + 1)) for j in range(16)]
    return [sampling_cpu.row_argmax(x) for x in xs], [sampling_cpu.row_logprob(x, ids)[1] for x in xs]

a = np.random.default_rng(0).standard_normal((64, 8192)).astype(np.float32)
ids = np.arange(64, dtype=np.int32)
for _ in range(5):
    got, ranks = jax.block_until_ready(many(a, ids))
for j, (g, r) in enumerate(zip(got, ranks)):
    x = np.sin(a * np.float32(j + 1))
    assert (np.asarray(g) == np.argmax(x, axis=1)).all()
    assert (np.asarray(r) == (x >= x[np.arange(64), ids][:, None]).sum(1)).all()
print("done")
"""


def test_concurrent_custom_calls_do_not_deadlock():
    """Custom calls XLA runs at once on its pool threads each finish: a kernel's calling thread
    runs the worker slots no pool thread has started (pallas_kernels/cpu_kernels.h run_workers).
    The old version waited for its queued tasks and hung here on the first call. In a
    subprocess, so a hang fails the test instead of the suite."""
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-c", CONCURRENT_CALLS],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "done"
