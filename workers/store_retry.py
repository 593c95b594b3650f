"""Store calls from a worker, retried while the database is away (restarting, unreachable)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


def store_retrying(work: Callable[[], Any], attempts: int = 30) -> Any:
    """Runs ``work()``, retried with backoff (0.1 s doubling to 5 s) up to ``attempts`` times;
    the last failure is raised."""
    backoff = 0.1
    for i in range(attempts):
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - the database may be restarting
            if i == attempts - 1:
                raise
            log.warning("store call failed (%r); retrying in %.1fs", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
