"""The worker's engine figures (running and waiting requests, KV use, tokens/s) as Celery sees
them, so that Flower shows what each GPU is doing:

- a worker bootstep whose `info()` adds `engine.*` entries to the worker's `stats` (what
  `celery inspect stats` answers and Flower's worker page lists under "Other");
- a `worker-engine` event every few seconds, carrying the same figures, for anything that follows
  the event stream (Flower keeps them on its worker state; `celery events` prints them).

The figures come from `WorkerRuntime.last_figures`, which the runtime refreshes every second.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

log = logging.getLogger(__name__)

EVENT_TYPE = "worker-engine"
_SHOWN = ("model", "device", "running", "waiting", "pending", "kv_blocks_used", "kv_blocks_total",
          "tokens_per_s", "last_batch_size", "peak_batch_size", "generated_tokens_total",
          "prompt_tokens_total", "prefix_cache_hit_tokens", "preemptions", "steps")


def engine_fields(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures worth showing, as JSON-friendly values (numbers stay numbers)."""
    out: dict[str, Any] = {}
    for key, value in figures.items():
        if key == "updated_at":
            continue
        if isinstance(value, str):
            try:
                value = float(value) if "." in value else int(value)
            except ValueError:
                pass
        out[key] = value
    ordered = {k: out[k] for k in _SHOWN if k in out}
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    return ordered


def install_engine_figures(app: Celery, runtime: Any, interval_s: float = 2.0) -> None:
    """Adds the engine-figures bootstep to ``app``'s workers (call before `app.Worker(...)`)."""

    class EngineFigures(bootsteps.StartStopStep):
        """Publishes the engine's figures through worker stats and `worker-engine` events."""

        label = "engine figures"

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self._stop = threading.Event()
            self._thread: threading.Thread | None = None

        def info(self, worker: Any) -> dict[str, Any]:
            return {f"engine.{k}": v for k, v in engine_fields(dict(runtime.last_figures)).items()}

        def start(self, worker: Any) -> None:
            self._thread = threading.Thread(target=self._send_loop, args=(worker.hostname,),
                                            name="engine-events", daemon=True)
            self._thread.start()

        def stop(self, worker: Any) -> None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)

        terminate = stop

        def _send_loop(self, hostname: str) -> None:
            # Its own connection and dispatcher: the consumer's dispatcher belongs to its thread.
            while not self._stop.is_set():
                try:
                    with app.connection_for_write() as conn:
                        dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True)
                        try:
                            while not self._stop.wait(interval_s):
                                figures = engine_fields(dict(runtime.last_figures))
                                if figures:
                                    dispatcher.send(EVENT_TYPE, **figures)
                        finally:
                            dispatcher.close()
                except Exception as exc:  # noqa: BLE001 - figures are best effort; jobs go on
                    log.warning("could not send engine events (%r); retrying", exc)
                    self._stop.wait(interval_s)

    app.steps["worker"].add(EngineFigures)
