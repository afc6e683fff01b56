"""The KV pool's prefault thread: it changes no byte, even against concurrent writes; it stays
within its lead and pauses while steps run; the engine starts it and stops it with itself."""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.paths import kernels_cache_dir
from jpaged.pool_prefault import IDLE_S, PoolPrefaulter, lead_bytes_from_env
from jpaged.tokenizer import Tokenizer
from pallas_kernels import paged_attention_cpu
from tests.test_engine import VOCAB, make_llm, token_ids, workload
from tests.util import tiny_random_llama

pytestmark = pytest.mark.skipif(
    not paged_attention_cpu.load(kernels_cache_dir()), reason="no C++ compiler on this machine"
)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_random_llama(VOCAB)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def wait_for(condition, timeout_s: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefault_changes_no_byte_stays_within_its_lead_and_pauses_in_steps():
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.standard_normal((3, 40, 2, 8, 2, 16)).astype(np.float32))
    before = np.asarray(pool).copy()
    per_block = pool.nbytes // pool.shape[1]  # all layers
    pf = PoolPrefaulter(pool, 5 * per_block, paged_attention_cpu.prefault_function())
    wait_for(lambda: pf.done_blocks == 6)  # blocks 1-5: the lead past high water 0
    time.sleep(3 * IDLE_S)
    assert pf.done_blocks == 6
    pf.step_started()
    pf.demand = 20  # blocks went out, but a step runs: no faulting
    time.sleep(3 * IDLE_S)
    assert pf.done_blocks == 6
    pf.step_ended(20)
    wait_for(lambda: pf.done_blocks == 26)
    pf.step_ended(pool.shape[1] - 1)
    wait_for(lambda: not pf._thread.is_alive())  # the whole pool done: the thread ends
    assert pf.done_blocks == pool.shape[1]
    np.testing.assert_array_equal(np.asarray(pool), before)
    pf.close()


def test_prefault_racing_writes_loses_none():
    """Block i gets value i, one donated step a block, while the thread faults the same pages
    in (an uninitialized pool: its pages are fresh); every write survives."""
    shape = (4, 1024, 2, 16, 2, 64)  # 64 MiB, 16 KiB a block and layer
    pool = paged_attention_cpu.uninitialized(shape, jnp.dtype(jnp.float32))
    pf = PoolPrefaulter(pool, pool.nbytes, paged_attention_cpu.prefault_function())
    write = jax.jit(lambda p, i: p.at[:, i].set(i.astype(p.dtype)), donate_argnums=0)
    pointer = pool.unsafe_buffer_pointer()
    for i in range(1, shape[1]):
        pool = write(pool, jnp.int32(i))
    assert pool.unsafe_buffer_pointer() == pointer  # donation keeps the pool where it was
    pf.close()
    got = np.asarray(pool)[:, 1:]
    want = np.broadcast_to(np.arange(1, shape[1], dtype=np.float32)[None, :, None, None, None, None], got.shape)  # fmt: skip
    np.testing.assert_array_equal(got, want)


def test_engine_prefaults_its_pool_and_stops_the_thread_when_it_goes(
    tiny_model, tokenizer, monkeypatch
):
    monkeypatch.setenv("JPAGED_POOL_PREFAULT_MIB", "1")  # less than the pool
    prompts, params = workload(6, seed=5)
    llm = make_llm(tiny_model, tokenizer, attention_backend="cpu", num_blocks=1024)
    pf = llm.engine._prefaulter
    assert pf is not None
    outs = token_ids(llm.generate(prompts, params, use_tqdm=False))
    high_water = llm.engine.scheduler.block_manager.high_water
    assert high_water > 1 and pf.demand == high_water
    assert high_water < pf.target_blocks() < pf.num_blocks
    wait_for(lambda: pf.done_blocks == pf.target_blocks())
    thread = pf._thread
    assert thread.is_alive()  # waiting for more blocks to go out
    del llm
    gc.collect()
    assert not thread.is_alive()
    monkeypatch.setenv("JPAGED_POOL_PREFAULT_MIB", "0")
    plain = make_llm(tiny_model, tokenizer, attention_backend="cpu", num_blocks=1024)
    assert plain.engine._prefaulter is None
    assert token_ids(plain.generate(prompts, params, use_tqdm=False)) == outs


@pytest.mark.parametrize("text", ["-1", "1.5", "lots"])
def test_bad_lead_names_the_variable(text, monkeypatch):
    monkeypatch.setenv("JPAGED_POOL_PREFAULT_MIB", text)
    with pytest.raises(ValueError, match="JPAGED_POOL_PREFAULT_MIB"):
        lead_bytes_from_env()
