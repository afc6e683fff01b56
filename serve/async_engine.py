"""The async front over the synchronous LLMEngine: one worker thread steps, requests stream out.

Threading rule: only the worker thread touches the engine's request state. The event loop
sends it commands (add / abort / stop) through a thread-safe queue; the worker answers
with `loop.call_soon_threadsafe`, feeding each request's `asyncio.Queue` with the
cumulative `RequestOutput`s of every step. A stream reader that falls behind skips to the
newest output (they are cumulative, so nothing is lost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from jpaged.engine import LLMEngine, PromptType
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged.serve")


class QueueFullError(Exception):
    """The waiting queue holds max_queued_requests already (HTTP 429)."""


class EngineUnavailableError(Exception):
    """The engine is shutting down or has failed (HTTP 503)."""


class RequestAbortedError(Exception):
    """The request was aborted by the server (shutdown) before it finished."""


@dataclasses.dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """Engine counters as of the end of the worker's last step or command batch."""

    num_running: int = 0
    num_waiting: int = 0
    blocks_in_use: int = 0
    num_unfinished: int = 0


# Marker the worker puts on a stream when the server aborts its request.
_ABORTED = object()


class RequestStream:
    """Async iterator over one request's cumulative outputs; ends after the finished one.

    Raises RequestAbortedError if the server aborts the request, or the worker's exception
    if the engine fails.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty() and isinstance(item, RequestOutput) and not item.finished:
            item = self._queue.get_nowait()  # skip to the newest cumulative output
        if item is _ABORTED:
            self.finished = True
            raise RequestAbortedError(f"request {self.request_id} was aborted by the server")
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def put(self, item: Any) -> None:
        self._queue.put_nowait(item)


class AsyncEngine:
    """Runs `engine.step()` in one background thread; `add_request` returns a RequestStream.

    max_queued_requests bounds the requests waiting to be scheduled (None: unbounded).
    on_outputs / on_abort, if given, are called in the worker thread with each step's
    outputs (and the step's wall time) / each aborted request id (metrics hook).
    """

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_queued_requests: int | None = None,
        on_outputs: Callable[[list[RequestOutput], float], None] | None = None,
        on_abort: Callable[[str], None] | None = None,
    ) -> None:
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._on_outputs = on_outputs
        self._on_abort = on_abort
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # worker-owned: requests in the engine
        self._pending_adds = 0  # loop-owned: adds sent but not yet answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self.error: BaseException | None = None  # set when the worker died
        self.snapshot = EngineSnapshot()

    # ---- lifecycle (event loop) -----------------------------------------------------------

    def start(self) -> None:
        """Start the worker; call from the event loop that will read the streams."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_in_flight(self) -> int:
        return self.snapshot.num_unfinished + self._pending_adds

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests; let in-flight ones finish for up to drain_timeout_s, abort
        the rest (their streams raise RequestAbortedError), then stop the worker."""
        self._accepting = False
        if self._thread is None:
            return
        deadline = time.monotonic() + drain_timeout_s
        while self.num_in_flight and self.is_healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join, 10.0)
        if self._thread.is_alive():
            logger.warning("engine worker did not stop within 10 s")

    # ---- requests (event loop) ------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request once the engine has accepted it.

        Raises ValueError (the engine's message) for a request that can never run,
        QueueFullError when max_queued_requests are waiting, EngineUnavailableError when
        shutting down or failed.
        """
        if not self._accepting or not self.is_healthy:
            raise EngineUnavailableError(
                "the server is shutting down" if self.error is None else "the engine has failed"
            )
        limit = self.max_queued_requests
        if limit is not None and self.snapshot.num_waiting + self._pending_adds >= limit:
            raise QueueFullError(
                f"the server is busy: {limit} requests are already waiting; retry later"
            )
        assert self._loop is not None
        stream = RequestStream(request_id)
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._pending_adds += 1
        self._commands.put(("add", request_id, prompt, params, arrival_time, stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # the add may still land: commands run in order
            raise
        finally:
            self._pending_adds -= 1
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed before the next step). Safe from any thread."""
        self._commands.put(("abort", request_id))

    # ---- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                idle = not engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    break
                if not engine.has_unfinished_requests():
                    continue
                steps_before = engine.stats.num_steps
                t0 = time.perf_counter()
                outputs = engine.step()
                elapsed = time.perf_counter() - t0
                # snapshot and metrics first: a client that has seen a step's tokens must
                # see that step's counters on /metrics too
                self._publish()
                if outputs:
                    if self._on_outputs is not None:
                        self._on_outputs(outputs, elapsed)
                    self._deliver(outputs)
                elif engine.stats.num_steps == steps_before:
                    time.sleep(0.001)  # nothing schedulable: do not spin
        except BaseException as exc:  # the engine is broken: fail every stream, stay up
            logger.exception("engine worker failed")
            self.error = exc
            self._fail_all(exc)
            return
        self._abort_all()

    def _apply_commands(self, block: bool) -> bool:
        """Run queued commands (waiting for one when `block`); False once told to stop."""
        try:
            commands = [self._commands.get(timeout=0.5) if block else self._commands.get_nowait()]
        except queue.Empty:
            return True
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        keep_going = True
        for cmd in commands:
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort":
                self._abort(cmd[1], notify=False)
            elif cmd[0] == "stop":
                keep_going = False
        self._publish()
        return keep_going

    def _add(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None,
        stream: RequestStream,
        accepted: asyncio.Future[None],
    ) -> None:
        try:
            self.engine.add_request(request_id, prompt, params, arrival_time)
        except ValueError as exc:
            self._call_in_loop(_resolve, accepted, exc)
            return
        self._streams[request_id] = stream
        self._publish()  # before the caller learns of it, so num_waiting already counts it
        self._call_in_loop(_resolve, accepted, None)

    def _abort(self, request_id: str, notify: bool) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # finished already, or never added
        self.engine.abort_request(request_id)
        if self._on_abort is not None:
            self._on_abort(request_id)
        if notify:
            self._call_in_loop(stream.put, _ABORTED)

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._abort(request_id, notify=True)
        self._publish()

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._call_in_loop(stream.put, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batch = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batch.append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
        if batch:
            self._call_in_loop(_put_all, batch)

    def _publish(self) -> None:
        sched = self.engine.scheduler
        self.snapshot = EngineSnapshot(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            blocks_in_use=sched.block_manager.num_used_blocks,
            num_unfinished=self.engine.get_num_unfinished_requests(),
        )

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def _put_all(batch: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in batch:
        stream.put(out)
