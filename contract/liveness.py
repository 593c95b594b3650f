"""Worker liveness in Redis: each worker process's heartbeat, and who holds which delivered task.

A worker process takes an instance id that is new on every start (a restart under the same
hostname is a new instance) and renews ``INSTANCE_KEY`` with a short TTL from a thread of its own,
so that nothing the engine does can starve it. Its delivered-but-unacknowledged tasks are recorded
against that id (``UNACKED_OWNER_KEY``, kept by `contract.redis_transport`). An instance whose key
is gone is dead for good: its ids are never reused, so its tasks may go back to the queue.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import redis

from contract.redis_keys import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, INSTANCE_KEY, UNACKED_OWNER_KEY

log = logging.getLogger(__name__)


def new_instance_id() -> str:
    """A worker process's instance id (32 hex characters, never reused)."""
    return uuid.uuid4().hex


def live_instances(client: redis.Redis, instances: set[str]) -> set[str]:
    """Which of ``instances`` have a heartbeat now (one round trip)."""
    if not instances:
        return set()
    ordered = sorted(instances)
    pipe = client.pipeline(transaction=False)
    for instance in ordered:
        pipe.exists(INSTANCE_KEY.format(instance=instance))
    return {instance for instance, alive in zip(ordered, pipe.execute()) if alive}


def dead_holders(client: redis.Redis) -> dict[str, list[str]]:
    """The delivery tags held by instances whose heartbeat is gone, by instance."""
    owners = {tag.decode(): instance.decode() for tag, instance in client.hgetall(UNACKED_OWNER_KEY).items()}
    alive = live_instances(client, set(owners.values()))
    dead: dict[str, list[str]] = defaultdict(list)
    for tag, instance in owners.items():
        if instance not in alive:
            dead[instance].append(tag)
    return dict(dead)


class Heartbeat:
    """Keeps one worker instance's key alive from a daemon thread, on a client of its own with
    short timeouts (a hung Redis delays one renewal, never the thread for long).

    ``lapsed`` says whether the key may have expired since the last renewal that Redis
    acknowledged: the other workers may then have taken this instance's jobs over
    (docs/reliability.md, fencing). ``on_restored`` is called (from the thread) when renewals
    succeed again after such a lapse.
    """

    def __init__(self, redis_url: str, instance: str, hostname: str, *, ttl_s: float = HEARTBEAT_TTL_S,
                 interval_s: float = HEARTBEAT_INTERVAL_S,
                 on_restored: Callable[[], None] | None = None) -> None:
        timeout = max(0.2, min(interval_s, ttl_s / 4))
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.instance = instance
        self.key = INSTANCE_KEY.format(instance=instance)
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._value = json.dumps({"hostname": hostname, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started_at": time.time()})
        self._on_restored = on_restored
        self._last_ok = time.monotonic()
        self._was_lapsed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        """Writes the first beat (raises if Redis cannot be reached), then renews in the background."""
        self._redis.set(self.key, self._value, px=int(self.ttl_s * 1000))
        self._last_ok = time.monotonic()
        self._thread.start()
        return self

    @property
    def lapsed(self) -> bool:
        """True when no renewal has succeeded for a TTL: the key may be gone."""
        return time.monotonic() - self._last_ok >= self.ttl_s

    def beat(self) -> bool:
        """One renewal; True when Redis took it."""
        sent = time.monotonic()
        try:
            self._redis.set(self.key, self._value, px=int(self.ttl_s * 1000))
        except redis.RedisError as e:
            if not self._was_lapsed and self.lapsed:
                log.error("heartbeat of instance %s not renewed for %.0fs (%r): its jobs may be taken over "
                          "by other workers; its results will not count for jobs taken over", self.instance,
                          time.monotonic() - self._last_ok, e)
                self._was_lapsed = True
            return False
        self._last_ok = sent  # the key lives ttl_s from the moment the command was sent, at least
        if self._was_lapsed:
            self._was_lapsed = False
            log.warning("heartbeat of instance %s renewed again", self.instance)
            if self._on_restored is not None:
                try:
                    self._on_restored()
                except Exception:  # noqa: BLE001 - the heartbeat must go on
                    log.exception("after the heartbeat came back")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self, *, forget: bool = True) -> None:
        """Stops renewing; with ``forget``, deletes the key so the instance's remaining tasks are
        recovered at once instead of after the TTL."""
        self._stop.set()
        if forget:
            try:
                self._redis.delete(self.key)
            except redis.RedisError:
                pass
