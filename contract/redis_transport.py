"""kombu's Redis transport, with one reusable client per channel for its plain commands.

kombu builds a new `redis.Redis` object for every command it sends outside the consumer loop (each
publish, and each task-sent event): a construction that fills a dict of about 170 response
callbacks, the largest cost of sending a task after the network round trip itself. A `redis.Redis`
object is thread-safe and only borrows connections from the channel's pool, so one per channel
serves every such command. Everything else is kombu's.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that keeps its synchronous client."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client(asynchronous=False)
        return self._sync_client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel` above."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
