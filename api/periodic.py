"""A pass that an API process runs in the background every ``interval_s`` (the settler, the
retention purge): a daemon thread, started unless the interval is <= 0, stopped with a bounded
join; a pass that fails (Redis or the store away) is logged and the next one retries."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``run_once`` every ``interval_s`` (the first time after ``first_wait_s``)."""

    thread_name = "periodic"
    what = "a periodic pass"  # for the log line of a failed pass

    def __init__(self, interval_s: float, *, first_wait_s: float | None = None) -> None:
        self.interval_s = interval_s
        self._first_wait_s = interval_s if first_wait_s is None else first_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)

    def start(self) -> None:
        """Starts the loop (an interval <= 0: never)."""
        if self.interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        """Stops the loop (a pass in progress ends at its next check of ``_stop``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def run_once(self) -> object:
        raise NotImplementedError

    def _loop(self) -> None:
        wait = self._first_wait_s
        while not self._stop.wait(wait):
            wait = self.interval_s
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - Redis or the store down: the next pass retries
                log.warning("%s failed: %r", self.what, exc)
