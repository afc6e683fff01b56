"""Fault in the CPU KV pool's pages ahead of the block allocator, from an idle-priority thread.

The `cpu` backend's pool is allocated, not written (kv_pool.allocate_kv_pool), so a block's
pages are first touched by the step that writes its first K/V: a page fault and a page clear
inside the step. In a VM whose host backs guest memory lazily, and takes freed memory back
(Firecracker's free page reporting, as on the benchmark machine), a first touch runs at
0.1-0.15 GB/s: 3-7 s of a W run. vLLM zeroes its whole pool at start-up instead.

Here a daemon thread at SCHED_IDLE touches the blocks the allocator hands out next (never-used
blocks go out in ascending id order, see block_manager), up to `lead_bytes` past the highest
block id taken so far, while the engine runs no steps: during start-up and whenever the
engine has been idle for IDLE_S. It pauses while steps run: SCHED_IDLE does not hide its
faults' host stalls from a busy engine (bf16 W + n-gram: 13.1-13.3 s with it faulting
alongside, 11.1-11.5 s with it paused, the first 2914 blocks faulted in before W both ways).
Each page gets a locked add of 0 (pallas_kernels.paged_attention_cpu.prefault_function): no
byte changes, so it may race the steps writing the pool. JPAGED_POOL_PREFAULT_MIB sets the
lead (default 1024; 0: no thread).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    from jpaged.block_manager import BlockManager

DEFAULT_LEAD_MIB = 1024
CHUNK_BYTES = 2 << 20  # per call and layer: one transparent huge page
POLL_S = 0.1  # how often a waiting thread looks again
IDLE_S = 0.1  # no step for this long: the engine is idle


def lead_bytes_from_env() -> int:
    """JPAGED_POOL_PREFAULT_MIB in bytes (ValueError naming it when not a whole number >= 0)."""
    text = os.environ.get("JPAGED_POOL_PREFAULT_MIB", str(DEFAULT_LEAD_MIB))
    try:
        mib = int(text)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"JPAGED_POOL_PREFAULT_MIB must be a whole number >= 0, got {text!r}")
    return mib << 20


class PoolPrefaulter:
    """Touches pool blocks [1, done_blocks) ahead of `demand` (the highest block id taken).

    The engine runs every step inside `during_step` and calls `close()` before the pool's
    memory goes (from a finalizer on the runner).
    """

    def __init__(
        self, pool: jax.Array, lead_bytes: int, prefault: Callable[[int, int], None]
    ) -> None:
        num_layers, num_blocks = pool.shape[0], pool.shape[1]
        self._base = pool.unsafe_buffer_pointer()  # stable: every step donates the pool
        self._layer_bytes = pool.nbytes // num_layers
        self._block_bytes = self._layer_bytes // num_blocks
        self._num_layers, self.num_blocks = num_layers, num_blocks
        self._lead_blocks = -(-lead_bytes // (self._block_bytes * num_layers))
        self._chunk_blocks = max(1, CHUNK_BYTES // self._block_bytes)
        self._prefault = prefault
        self.demand = 0
        self._in_step = False
        self._last_step = -float("inf")  # time.monotonic() at the last step's end
        self.done_blocks = 1  # block 0 is the null block, which warm-up writes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jpaged-pool-prefault", daemon=True)
        self._thread.start()

    def step_started(self) -> None:
        self._in_step = True

    def step_ended(self, high_water: int) -> None:
        """`high_water`: the highest block id taken so far."""
        self.demand = high_water
        self._last_step = time.monotonic()
        self._in_step = False

    @contextlib.contextmanager
    def during_step(self, block_manager: BlockManager) -> Iterator[None]:
        """Bracket one engine step; at its end, demand = the block manager's high water."""
        self.step_started()
        try:
            yield
        finally:
            self.step_ended(block_manager.high_water)

    def engine_idle(self) -> bool:
        return not self._in_step and time.monotonic() - self._last_step >= IDLE_S

    def target_blocks(self) -> int:
        """Blocks [1, target) are to be faulted in now."""
        return min(self.num_blocks, self.demand + 1 + self._lead_blocks)

    def _run(self) -> None:
        try:  # Linux: this thread runs only when a core would otherwise idle
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.nice(19)
        while not self._stop.is_set():
            done, target = self.done_blocks, self.target_blocks()
            if done >= self.num_blocks:
                return
            if done >= target or not self.engine_idle():
                self._stop.wait(POLL_S)
                continue
            n = min(self._chunk_blocks, target - done)
            for layer in range(self._num_layers):
                if self._stop.is_set():
                    return
                while not self.engine_idle():  # steps started meanwhile
                    if self._stop.wait(POLL_S):
                        return
                start = self._base + layer * self._layer_bytes + done * self._block_bytes
                self._prefault(start, n * self._block_bytes)
            self.done_blocks = done + n

    def close(self) -> None:
        """Stop the thread and wait for it (at most one chunk of one layer)."""
        self._stop.set()
        self._thread.join()
