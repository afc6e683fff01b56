"""Several hosts: `jax.distributed` start-up and the step stream from process 0 to followers.

Every process owns its local devices' shards of one global mesh, so every process must run
the same jitted step, with the same inputs, in the same order. Process 0 schedules (and
serves HTTP); before each step it sends that step's host inputs — the padded numpy batch,
block copies and sampling tensors, a few KB — to every follower over one TCP connection
each; a follower turns them into global arrays and runs the step (`ModelRunner.run_inputs`).
A socket rather than a device broadcast: the inputs' shapes change from step to step (a
collective would need the shapes agreed first, a second round trip), they already sit in
host memory on process 0, and followers need nothing back (outputs are replicated).

Wire format: per step a little-endian u64 length, then an `np.savez` archive of the
input leaves in `jax.tree` order plus `num_logprobs` (no pickle); length 0 means stop.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator

import jax
import numpy as np

from jpaged.sampling_tensors import SamplingTensors
from models.forward import ModelBatch

logger = logging.getLogger(__name__)

STEP_PORT_OFFSET = 1  # the step stream listens on the coordinator's port + 1
_LENGTH = struct.Struct("<Q")


def distributed_options(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int, int]:
    """Flags, else $JPAGED_COORDINATOR_ADDRESS / $JPAGED_NUM_PROCESSES / $JPAGED_PROCESS_ID
    (or jax's JAX_COORDINATOR_ADDRESS); (None, 1, 0) for one process.

    Raises ValueError naming the missing or bad option.
    """
    env = os.environ
    address = (
        coordinator_address
        or env.get("JPAGED_COORDINATOR_ADDRESS")
        or env.get("JAX_COORDINATOR_ADDRESS")
    )
    count = num_processes if num_processes is not None else int(env.get("JPAGED_NUM_PROCESSES", 1))
    index = process_id if process_id is not None else int(env.get("JPAGED_PROCESS_ID", 0))
    if count < 1:
        raise ValueError(f"num_processes must be >= 1, got {count}")
    if count > 1 and not address:
        raise ValueError("num_processes > 1 needs coordinator_address (host:port)")
    if not 0 <= index < count:
        raise ValueError(f"process_id must be in [0, {count}), got {index}")
    return address, count, index


def initialize_distributed(address: str | None, num_processes: int, process_id: int) -> bool:
    """`jax.distributed.initialize` when num_processes > 1 (before any jax computation)."""
    if num_processes == 1:
        return False
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    logger.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def step_address(coordinator_address: str) -> tuple[str, int]:
    host, _, port = coordinator_address.rpartition(":")
    return host or "127.0.0.1", int(port) + STEP_PORT_OFFSET


def _encode(inputs: tuple) -> bytes:
    *arrays, num_logprobs = inputs
    leaves = jax.tree.leaves(arrays)
    buffer = io.BytesIO()
    named = {f"arr_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    np.savez(buffer, num_logprobs=np.int64(num_logprobs), **named)
    return buffer.getvalue()


def _input_structure() -> jax.tree_util.PyTreeDef:
    """The tree of (batch, copies, sampling, (prompt_index, prompt_next)): fixed field lists."""
    batch = ModelBatch(*[0] * len(ModelBatch.__dataclass_fields__))
    sampling = SamplingTensors(*[0] * len(SamplingTensors.__dataclass_fields__))
    return jax.tree.structure([batch, 0, sampling, (0, 0)])


class StepBroadcaster:
    """Process 0's end: accepts every follower, then sends each step's inputs to all."""

    def __init__(self, address: tuple[str, int], num_followers: int, timeout: float = 3600.0):
        self._server = socket.create_server(address, reuse_port=False)
        self._server.settimeout(timeout)
        self._conns = []
        for _ in range(num_followers):
            conn, peer = self._server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            logger.info("step follower connected from %s", peer)

    def __call__(self, inputs: tuple) -> None:
        data = _encode(inputs)
        for conn in self._conns:
            conn.sendall(_LENGTH.pack(len(data)) + data)

    def close(self) -> None:
        """Tell followers to stop, then close."""
        for conn in self._conns:
            try:
                conn.sendall(_LENGTH.pack(0))
            finally:
                conn.close()
        self._server.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("process 0 closed the step stream mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive_steps(address: tuple[str, int], timeout: float = 3600.0) -> Iterator[tuple]:
    """A follower's end: yields each step's inputs until process 0 says stop (or goes away)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection(address, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.settimeout(None)
    structure = _input_structure()
    with conn:
        while True:
            header = conn.recv(_LENGTH.size, socket.MSG_WAITALL)
            if len(header) < _LENGTH.size:
                return
            (size,) = _LENGTH.unpack(header)
            if size == 0:
                return
            with np.load(io.BytesIO(_recv_exact(conn, size)), allow_pickle=False) as archive:
                num_logprobs = int(archive["num_logprobs"])
                leaves = [archive[f"arr_{i}"] for i in range(len(archive.files) - 1)]
            yield (*jax.tree.unflatten(structure, leaves), num_logprobs)


def follow(runner: object, steps: Iterator[tuple]) -> int:
    """Run every received step on `runner` (a ModelRunner); returns the number of steps."""
    count = 0
    for inputs in steps:
        runner.run_inputs(inputs)
        count += 1
    return count
