"""A worker's task slots: bulk tasks may hold only some of them, the rest stay free for interactive
tasks (docs/tenancy.md, "Fair share between tenants").

A worker holds up to `--concurrency` tasks (Celery's thread pool and prefetch window), and a bulk
task keeps its slot until all of its jobs are done. Left alone, a bulk backlog fills every slot and
an interactive task waits in Redis for one to free, however high its priority. So the worker's
channel stops asking Redis for bulk work while it holds `bulk_slots` bulk deliveries: its BRPOP then
names only the interactive priority steps of its queues, and a free slot can only take an
interactive task. When a bulk task is acknowledged (or handed back), the next BRPOP (at most
kombu's one-second poll later) names the bulk steps again.

Nothing about delivery changes: what is fetched is recorded, extended, acknowledged, rejected and
restored exactly as by `contract.redis_transport`, so late acknowledgement, crash recovery
(`workers.recovery`) and the graceful stop see ordinary deliveries.
"""

from __future__ import annotations

import threading
from typing import Any

from contract import redis_transport
from contract.queues import PRIORITY_BULK, PRIORITY_STEPS


def is_bulk(message: Any) -> bool:
    """Whether a delivered message was sent at a bulk priority step."""
    return (message.properties.get("priority") or 0) >= PRIORITY_BULK


class Channel(redis_transport.Channel):
    """`contract.redis_transport`'s channel, asking for bulk work only while it holds fewer than
    ``bulk_slots`` bulk deliveries (transport option; 0: no limit)."""

    bulk_slots: int = 0
    from_transport_options = redis_transport.Channel.from_transport_options + ("bulk_slots",)

    def bulk_held(self) -> int:
        """The bulk deliveries this channel holds now (delivered, not yet acknowledged)."""
        qos = self.qos
        dirty = set(qos._dirty)  # acknowledged, not yet flushed from kombu's bookkeeping
        return sum(1 for tag, message in list(qos._delivered.items()) if tag not in dirty and is_bulk(message))

    def bulk_open(self) -> bool:
        return not self.bulk_slots or self.bulk_held() < self.bulk_slots

    # kombu's BRPOP names a list for each of `priority_steps` in each consumed queue. While the
    # bulk slots are full, the steps read *by that BRPOP* are the interactive ones; every other
    # reader (a publish, a message restored from another thread) sees all of them.
    _all_steps: list[int] = list(PRIORITY_STEPS)
    _gate = threading.local()  # per thread: only the thread sending the BRPOP sees it closed

    @property
    def priority_steps(self) -> list[int]:
        if getattr(self._gate, "closed", False):
            return [p for p in self._all_steps if p < PRIORITY_BULK]
        return self._all_steps

    @priority_steps.setter
    def priority_steps(self, steps: list[int]) -> None:
        self._all_steps = list(steps)

    def _brpop_start(self, timeout: Any = None) -> None:
        if self.bulk_open():
            return super()._brpop_start(timeout)
        self._gate.closed = True
        try:
            return super()._brpop_start(timeout)
        finally:
            self._gate.closed = False


class Transport(redis_transport.Transport):
    """`contract.redis_transport`'s transport with `Channel` above."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
