"""kombu's Redis transport, with one reusable client per channel for its plain commands, and each
delivered task recorded against the worker instance that holds it.

kombu builds a new `redis.Redis` object for every command it sends outside the consumer loop (each
publish, and each task-sent event): a construction that fills a dict of about 170 response
callbacks, the largest cost of sending a task after the network round trip itself. A `redis.Redis`
object is thread-safe and only borrows connections from the channel's pool, so one per channel
serves every such command.

A worker's channel is given its instance id (transport option ``worker_instance``, see
`contract.liveness`). Then every task delivered to it is written to ``UNACKED_OWNER_KEY`` in the
same transaction that writes kombu's ``unacked`` hash, and removed with it (acknowledged, rejected
or restored to the queue), so a dead instance's tasks can be found and restored without waiting for
the visibility timeout. While the consumer lives it also pushes the delivery time of the tasks it
holds forward (``unacked_index``), so that the visibility timeout never hands a task that a live
worker still runs to a second one: the timeout is only a backstop for deliveries nobody owns.
Everything else is kombu's.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from contract.redis_keys import UNACKED_OWNER_KEY

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """kombu's acknowledgement emulation, plus the owner of each delivery."""

    def append(self, message: Any, delivery_tag: str) -> None:
        instance = self.channel.worker_instance
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
            pipe.hset(self.unacked_key, delivery_tag,
                      dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            if instance:
                pipe.hset(UNACKED_OWNER_KEY, delivery_tag, instance)
            pipe.execute()
        # kombu's in-memory bookkeeping of the delivery (the virtual QoS, below the Redis one).
        super(kombu_redis.QoS, self).append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        return pipe.hdel(UNACKED_OWNER_KEY, delivery_tag)

    def held_tags(self) -> list[str]:
        """The deliveries this channel holds now (delivered, not yet acknowledged)."""
        return list(self._delivered)

    def extend_held(self) -> int:
        """Moves the delivery time of every task this channel holds to now (only where kombu still
        has it as unacknowledged); returns how many."""
        tags = self.held_tags()
        if not tags:
            return 0
        now = time()
        with self.channel.conn_or_acquire() as client:
            client.zadd(self.unacked_index_key, {tag: now for tag in tags}, xx=True)
        return len(tags)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> Any:
        # Called by the consumer every `unacked_restore_interval` seconds: first keep what this
        # worker still holds out of the backstop's reach, then let kombu restore the rest.
        if self.channel.worker_instance:
            try:
                self.extend_held()
            except Exception:  # noqa: BLE001 - kombu's restore must still run
                log.exception("could not extend the held deliveries")
        return super().restore_visible(start=start, num=num, interval=interval)


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that keeps its synchronous client and records delivery owners."""

    QoS = QoS
    worker_instance: str = ""  # this worker process's instance id; empty: a sender, holds nothing
    from_transport_options = kombu_redis.Channel.from_transport_options + ("worker_instance",)
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
