"""The settler: replaces finished jobs' token reservations by what they spent (`api.limits`).

Each pass (every ``interval_s``, in one API process at a time: a renewable Redis lock) reads from
the store the jobs with a reservation that finished since the last pass and settles them in Redis.
The mark it resumes from is the latest ``finished_at`` it has seen (kept in Redis, so another
process takes over where this one stopped), less ``OVERLAP``: a job whose finishing transaction
committed a little after a later one is still seen. Settling is idempotent (a job's reservation
record is consumed by the settlement that uses it), so reading a job twice is harmless.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from api.limits import PREFIX, Limiter
from api.periodic import Periodic
from api.queue import Dispatcher
from store import Store
from store.sql import utcnow

LOCK = "limits-settler"
MARK = f"{PREFIX}:settled-until"  # ISO time: jobs finished before (this - OVERLAP) are settled
OVERLAP = timedelta(seconds=10)
FIRST_LOOK_BACK = timedelta(days=1)  # no mark yet: settle what finished in the last day
PAGE = 5000


class Settler(Periodic):
    """Settles the reservations of finished jobs, one API process at a time."""

    thread_name = "limits-settler"
    what = "settling token reservations"

    def __init__(self, store: Store, dispatcher: Dispatcher, limiter: Limiter, *, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self._store = store
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._token = uuid.uuid4().hex

    def run_once(self) -> int:
        """One pass if this process holds the lock; returns how many jobs it settled."""
        if not self._dispatcher.hold(LOCK, self._token, max(5.0, 5 * self.interval_s)):
            return 0
        raw = self._dispatcher.redis.get(MARK)
        mark = datetime.fromisoformat(raw.decode()) if raw else utcnow() - FIRST_LOOK_BACK
        settled = 0
        while not self._stop.is_set():
            done = self._store.limits.finished_since(mark - OVERLAP, limit=PAGE)
            settled += self._limiter.settle(done)
            if done:
                newest = max(s.finished_at for s in done)
                if newest > mark:
                    mark = newest
                    self._dispatcher.redis.set(MARK, mark.isoformat())
            if len(done) < PAGE or done[-1].finished_at - OVERLAP <= done[0].finished_at:
                break
        return settled
