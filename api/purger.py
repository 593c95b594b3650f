"""The periodic purge: finished work past each tenant's retention is removed (`store.retention`),
in one API process at a time (a renewable Redis lock), every ``interval_s``. The first pass runs a
minute after the process starts, so a fleet restarting together does not purge at once.
`tokenmill purge` does the same on demand."""

from __future__ import annotations

import logging
import uuid

from api.periodic import Periodic
from api.queue import Dispatcher
from store import Store
from store.retention import PurgeReport

log = logging.getLogger(__name__)

LOCK = "retention-purge"
FIRST_PASS_S = 60.0


class Purger(Periodic):
    """Runs the retention purge periodically in one API process."""

    thread_name = "retention-purge"
    what = "retention purge"

    def __init__(self, store: Store, dispatcher: Dispatcher, *, default_days: int, interval_s: float) -> None:
        super().__init__(interval_s, first_wait_s=min(FIRST_PASS_S, interval_s))
        self._store = store
        self._dispatcher = dispatcher
        self.default_days = default_days
        self._token = uuid.uuid4().hex

    def run_once(self) -> PurgeReport | None:
        """One purge if this process holds the lock (None: another process does it)."""
        # The lock outlives a long purge: it is held for the whole interval.
        if not self._dispatcher.hold(LOCK, self._token, max(self.interval_s, 600.0)):
            return None
        report = self._store.retention.purge(self.default_days)
        if report.jobs or report.batches or report.files:
            log.info("retention purge: %d jobs, %d batches, %d files removed; %d usage rows folded per hour",
                     report.jobs, report.batches, report.files, report.usage_rows_folded)
        return report
