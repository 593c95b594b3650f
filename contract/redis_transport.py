"""kombu's Redis transport, with one reusable client per channel for its plain commands, each task
delivered atomically (taken from its queue and recorded as unacknowledged in one Redis script), and
each delivered task recorded against the worker instance that holds it.

kombu builds a new `redis.Redis` object for every command it sends outside the consumer loop (each
publish, and each task-sent event): a construction that fills a dict of about 170 response
callbacks, the largest cost of sending a task after the network round trip itself. A `redis.Redis`
object is thread-safe and only borrows connections from the channel's pool, so one per channel
serves every such command.

kombu's consumer takes a task with BRPOP and records it as unacknowledged afterwards, from the
worker process: a process that dies in between takes the task with it. Here the consumer takes it
with `contract.redis_delivery.POP_SCRIPT` instead, which records it (kombu's ``unacked`` entry, its
index, and its owner) in the same atomic step, and waits on the queues' bells when they are empty;
every push into a queue (`Channel._put`, a restore) rings the queue's bell.

A worker's channel is given its instance id (transport option ``worker_instance``, see
`contract.liveness`). Then every task delivered to it is written to ``UNACKED_OWNER_KEY`` in the
same script that takes it from the queue, and removed with kombu's ``unacked`` entry
(acknowledged, rejected or restored to the queue), so a dead instance's tasks can be found and
restored without waiting for the visibility timeout, even one Redis was handing over when it died.
While the consumer lives it also pushes the delivery time of the tasks it holds forward
(``unacked_index``), so that the visibility timeout never hands a task that a live worker still
runs to a second one: the timeout is only a backstop for deliveries nobody owns.
Everything else is kombu's.
"""

from __future__ import annotations

import logging
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from contract.redis_delivery import POP_SCRIPT, Commands, bell_key, ring, ring_commands
from contract.redis_keys import UNACKED_OWNER_KEY

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """kombu's acknowledgement emulation, plus the owner of each delivery."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.take_recorded(delivery_tag):  # the pop script wrote it all already
            super(kombu_redis.QoS, self).append(message, delivery_tag)
            return
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
    """A kombu Redis channel that keeps its synchronous client, takes tasks atomically and records
    delivery owners."""

    QoS = QoS
    worker_instance: str = ""  # this worker process's instance id; empty: a sender, holds nothing
    from_transport_options = kombu_redis.Channel.from_transport_options + ("worker_instance",)
    _sync_client: Any = None
    _waiting_for: str | None = None  # the consumer's command in flight: "pop" (the script), "bell" (XREAD)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recorded: set[str] = set()  # delivery tags the pop script recorded, not yet appended
        self._pop_lists: list[tuple[str, str]] = []  # (queue, list) the pop in flight looks at
        self._pop_timeout: float = 1.0
        super().__init__(*args, **kwargs)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client(asynchronous=False)
        return self._sync_client

    # -- taking a task: the pop script, and the bells while there is none ----------------------

    def take_recorded(self, delivery_tag: str) -> bool:
        """Whether the pop script recorded this delivery (then forgets it)."""
        try:
            self._recorded.remove(delivery_tag)
        except KeyError:
            return False
        return True

    def _pop_command(self, lists: list[str], bells: list[str]) -> list[Any]:
        keys = [*lists, self.unacked_key, self.unacked_index_key, UNACKED_OWNER_KEY, *bells]
        return ["EVAL", POP_SCRIPT, len(keys), *keys, len(lists), len(bells), self.worker_instance, time()]

    def _popped(self, reply: list[Any]) -> Any:
        """The message in a pop script's reply {1, list index, message, recorded}."""
        payload = loads(bytes_to_str(reply[2]))
        if int(reply[3]):
            self._recorded.add(payload["properties"]["delivery_tag"])
        return payload

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self.global_keyprefix:  # kombu prefixes its own commands' keys, not a script's
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        # The lists in BRPOP's order: every queue's highest priority first.
        self._pop_lists = [(queue, self._q_for_pri(queue, pri)) for pri in self.priority_steps for queue in queues]
        self._pop_timeout = self.brpop_timeout if timeout is None else timeout
        self._send("pop", self._pop_command([key for _, key in self._pop_lists], [bell_key(q) for q in queues]))
        return None

    def _send(self, kind: str, command: list[Any]) -> None:
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # kombu's health check drops a reply overdue past this
        self._waiting_for = kind
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> Any:
        kind, self._waiting_for = self._waiting_for, None
        if kind is None:
            return super()._brpop_read(**options)
        waiting = False
        try:
            try:
                reply = self.client.parse_response(self.client.connection, f"tokenmill-{kind}", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if kind == "bell" or not reply:
                raise Empty()  # a bell rang, or the wait timed out: the next poll pops again
            if int(reply[0]) == 1:
                queue = self._pop_lists[int(reply[1]) - 1][0]
                payload = self._popped(reply)
                self._queue_cycle.rotate(queue)
                self.connection._deliver(payload, queue)
                return True
            if not self._closing:  # nothing waiting: wait for a push, taking nothing
                queues = list(dict.fromkeys(queue for queue, _ in self._pop_lists))
                self._send("bell", ["XREAD", "BLOCK", int(self._pop_timeout * 1000), "STREAMS",
                                    *[bell_key(q) for q in queues], *reply[1:]])
                waiting = True
            raise Empty()
        finally:
            if not waiting:
                self._in_poll = None
                self._flush_brpop_reauth()  # the connection is idle: kombu's moment for it

    def _on_connection_disconnect(self, connection: Any) -> None:
        if self._in_poll is connection:
            self._waiting_for = None
        super()._on_connection_disconnect(connection)

    def _get(self, queue: str) -> Any:
        if self.global_keyprefix:
            return super()._get(queue)
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            reply = client.execute_command(*self._pop_command(lists, []))
            self._maybe_update_queues_expire(client, queue)
        if int(reply[0]) != 1:
            raise Empty()
        return self._popped(reply)

    # -- every push rings the queue's bell -------------------------------------------------------

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        batch = kwargs.pop("_publish_batch", None)
        commands = batch if batch is not None else Commands()
        super()._put(queue, message, _publish_batch=commands, **kwargs)  # kombu's push, collected
        for name, args in ring_commands(queue):
            commands.add(name, *args)
        if batch is None:
            with self.conn_or_acquire() as client:
                commands.run(client)  # the push and the ring in one round trip

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        try:
            queues = self._lookup(exchange, routing_key)
        except self.connection_errors:
            raise
        except Exception:  # noqa: BLE001 - kombu logged it; the message waits for the bell's timeout
            return
        for queue in queues:
            ring(pipe, queue)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel` above."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
