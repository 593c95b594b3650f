"""One engine, many waiting tasks: the thread that runs the engine's step loop for a worker.

Celery runs each task in a thread of its own; a task hands its request to the loop and waits on a
future. The loop adds whatever has arrived before each step, so a request submitted while others
run joins the very next step, and every in-flight request of the process advances in the same
batch. A crash of the engine is reported to the worker (with the ids it had in its batch), which
exits so its unacknowledged tasks are redelivered elsewhere. A worker that stops gracefully can
hand back what it holds: `give_back_all` aborts every request and fails its future with `GivenBack`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from engine import Engine, EngineStats, RequestOutput, SamplingParams
from workers.faults import InjectedFault, has_marker
from workers.path_timings import PathTimings

log = logging.getLogger(__name__)

OnDelta = Callable[[str, RequestOutput], None]  # (request id, output) for each step that changed it


class EngineCrashed(RuntimeError):
    """The engine's step raised: nothing it held can be trusted to finish."""


class GivenBack(Exception):
    """The worker is stopping and handed the request back (to the queue) unfinished."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int] | None
    messages: list[dict[str, Any]] | None
    params: SamplingParams | None
    priority: int
    future: Future
    on_delta: OnDelta | None
    submitted_at: float = 0.0  # time.monotonic() at submit (workers.path_timings: inbox)
    tenant: str | None = None  # fair share between tenants (engine.scheduler)
    weight: float = 1.0


@dataclass
class _Abort:
    request_id: str


class _GiveBack:
    """Abort everything held and fail its futures with GivenBack."""


class EngineLoop:
    """Owns an `engine.Engine` and steps it on a background thread."""

    def __init__(self, engine: Engine, *, on_stats: Callable[[EngineStats, float], None] | None = None,
                 on_crash: Callable[[BaseException, list[str]], None] | None = None,
                 stats_interval_s: float = 1.0, fault_marker: str = "",
                 timings: PathTimings | None = None) -> None:
        self.engine = engine
        self.timings = timings or PathTimings()
        self._inbox: queue.SimpleQueue[_Add | _Abort | _GiveBack | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[Future, OnDelta | None]] = {}
        self._on_stats = on_stats
        self._on_crash = on_crash
        self._stats_interval = stats_interval_s
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = False
        self._giving_back = False
        self._fault_marker = fault_marker  # test only (workers.faults)
        self._faulty: set[str] = set()
        self.crashed: BaseException | None = None
        self.tokens_per_s = 0.0

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the loop after the current step (requests still held are aborted)."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def give_back_all(self) -> None:
        """Aborts every request held now or submitted from now on; their futures raise GivenBack."""
        self._giving_back = True
        self._inbox.put(_GiveBack())

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def submit(self, request_id: str, *, prompt: str | list[int] | None = None,
               messages: list[dict[str, Any]] | None = None, params: SamplingParams | None = None,
               priority: int = 0, on_delta: OnDelta | None = None, tenant: str | None = None,
               weight: float = 1.0) -> Future:
        """Hands a request to the loop; the future resolves to its final RequestOutput, or raises
        ValueError (the engine rejected it), EngineCrashed or GivenBack."""
        fut: Future = Future()
        if self.crashed is not None:
            fut.set_exception(EngineCrashed(f"the engine crashed earlier: {self.crashed!r}"))
            return fut
        self._inbox.put(_Add(request_id, prompt, messages, params, priority, fut, on_delta, time.monotonic(),
                             tenant, weight))
        return fut

    def abort(self, request_id: str) -> None:
        """Stops a request at the next step; its future resolves with finish reason "abort"."""
        self._inbox.put(_Abort(request_id))

    # -- the loop ----------------------------------------------------------------------------
    def _take_inbox(self, block: bool) -> None:
        timings = self.timings
        try:
            if block:  # nothing to run: the GPU idles until something arrives
                start = time.monotonic()
                try:
                    item = self._inbox.get(timeout=0.5)
                finally:
                    timings.add("loop_idle", time.monotonic() - start)
            else:
                item = self._inbox.get_nowait()
        except queue.Empty:
            return
        start = time.monotonic()
        count = 0
        while True:
            self._apply(item)
            count += 1
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        timings.add("loop_inbox", time.monotonic() - start, count)

    def _apply(self, item: _Add | _Abort | _GiveBack | None) -> None:
        if item is None:
            return
        if isinstance(item, _GiveBack) or (isinstance(item, _Add) and self._giving_back):
            self._give_back([item] if isinstance(item, _Add) else [])
            return
        if isinstance(item, _Abort):
            out = self.engine.abort(item.request_id)
            if out is not None:
                self._resolve(out)
            return
        try:
            # Only a streamed job needs an output every step; the others get their final one.
            self.engine.add_request(item.request_id, item.prompt, item.params, messages=item.messages,
                                    priority=item.priority, stream=item.on_delta is not None,
                                    tenant=item.tenant, weight=item.weight)
        except ValueError as e:
            item.future.set_exception(e)
            return
        self._pending[item.request_id] = (item.future, item.on_delta)
        self.timings.add("inbox", time.monotonic() - item.submitted_at)
        if has_marker(item.prompt, item.messages, self._fault_marker):
            self._faulty.add(item.request_id)

    def _give_back(self, adds: list[_Add]) -> None:
        held = [fut for fut, _ in self._pending.values()] + [a.future for a in adds]
        for request_id in list(self._pending):
            self.engine.abort(request_id)  # frees its blocks; the output is dropped
        self._pending.clear()
        for fut in held:
            if not fut.done():
                fut.set_exception(GivenBack("the worker is stopping"))

    def _resolve(self, out: RequestOutput) -> None:
        fut, _ = self._pending.pop(out.request_id, (None, None))
        if fut is not None and not fut.done():
            fut.set_result(out)

    def _run(self) -> None:
        last_stats = time.monotonic()
        window_start = time.monotonic()
        window_base = self.engine.stats().generated_tokens_total
        try:
            while not self._stopping:
                self._take_inbox(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    start = time.monotonic()
                    outs = self.engine.step()
                    self.timings.add("loop_step", time.monotonic() - start)
                    if self._faulty:
                        raise InjectedFault(f"injected crash: prompt of {sorted(self._faulty)} has the marker")
                    for out in outs:
                        _, on_delta = self._pending.get(out.request_id, (None, None))
                        if on_delta is not None:
                            try:
                                on_delta(out.request_id, out)
                            except Exception:  # a streaming hiccup must not stop generation
                                log.exception("streaming callback failed for %s", out.request_id)
                        if out.finished:
                            self._resolve(out)
                now = time.monotonic()
                if now - last_stats >= self._stats_interval:
                    generated = self.engine.stats().generated_tokens_total
                    self.tokens_per_s = (generated - window_base) / max(now - window_start, 1e-9)
                    window_base, window_start = generated, now
                    last_stats = now
                    if self._on_stats is not None:
                        try:
                            self._on_stats(self.engine.stats(), self.tokens_per_s)
                        except Exception:
                            log.exception("publishing engine stats failed")
        except BaseException as e:  # noqa: BLE001 - everything held must learn of the crash
            log.critical("engine loop crashed: %r", e, exc_info=True)
            if self._on_crash is not None:
                # First, while the futures still wait and before `crashed` makes new submissions
                # fail: the worker records what was in the batch and exits. A task that saw the
                # crash first would exit the process before the record is written.
                self._on_crash(e, list(self._pending))
            self.crashed = e
            for fut, _ in list(self._pending.values()):
                if not fut.done():
                    fut.set_exception(EngineCrashed(repr(e)))
            self._pending.clear()
            self._fail_inbox(e)

    def _fail_inbox(self, e: BaseException) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Add) and not item.future.done():
                item.future.set_exception(EngineCrashed(repr(e)))
