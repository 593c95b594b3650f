"""Everything one worker process holds: the engine loop, the result writer, the store, and the
Redis side channels (token streaming, cancellation, live engine figures)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from workers.app import CANCEL_CHANNEL, STREAM_CHANNEL, WORKER_STATS_KEY, WORKER_STATS_TTL_S
from workers.engine_loop import EngineLoop
from workers.result_writer import ResultWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """A worker's settings, from `tokenmill.settings` via the CLI."""

    served_model: str
    hostname: str
    device_label: str
    redis_url: str
    max_attempts: int = 3


class WorkerRuntime:
    """The long-lived parts of a worker, shared by all of its task threads."""

    def __init__(self, config: WorkerConfig, engine: Any, store: Any) -> None:
        self.config = config
        self.store = store
        self.redis = redis.Redis.from_url(config.redis_url)
        self.loop = EngineLoop(engine, on_stats=self._publish_stats, on_crash=self._die)
        self.writer = ResultWriter(store)
        self._cancel_thread = threading.Thread(target=self._listen_cancels, name="cancel-listener",
                                               daemon=True)
        self._stopping = False
        self.last_figures: dict[str, Any] = {}  # the latest engine figures (read by workers.engine_events)

    def start(self) -> "WorkerRuntime":
        self.writer.start()
        self.loop.start()
        self._cancel_thread.start()
        self._publish_stats(self.loop.engine.stats(), 0.0)
        return self

    def stop(self) -> None:
        """Stops the loop, then drains the writer so every stored result is in."""
        self._stopping = True
        self.loop.stop()
        self.writer.stop()
        try:
            self.redis.delete(WORKER_STATS_KEY.format(hostname=self.config.hostname))
        except redis.RedisError:
            pass

    # -- side channels -----------------------------------------------------------------------
    def publish_delta(self, job_id: str, out: Any) -> None:
        """Streams a job's new text on its channel (only for jobs that asked to stream)."""
        c = out.outputs[0]
        message = {"text": c.delta_text, "token_ids": c.delta_token_ids, "finished": out.finished,
                   "finish_reason": c.finish_reason}
        self.redis.publish(STREAM_CHANNEL.format(job_id=job_id), json.dumps(message))

    def _publish_stats(self, stats: Any, tokens_per_s: float) -> None:
        key = WORKER_STATS_KEY.format(hostname=self.config.hostname)
        fields = {**asdict(stats), "tokens_per_s": round(tokens_per_s, 1),
                  "model": self.config.served_model, "device": self.config.device_label,
                  "pending": self.loop.num_pending, "updated_at": time.time()}
        self.last_figures = fields
        try:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, WORKER_STATS_TTL_S)
            pipe.execute()
        except redis.RedisError as e:  # figures are best effort; generation goes on
            log.warning("could not publish engine stats: %r", e)

    def _listen_cancels(self) -> None:
        while not self._stopping:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stopping:
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        self.loop.abort(msg["data"].decode())
            except redis.RedisError as e:
                log.warning("cancel listener lost Redis (%r); reconnecting", e)
                time.sleep(1.0)

    def _die(self, error: BaseException) -> None:
        # The engine is gone: exit without acknowledging anything, so the broker redelivers every
        # task this process held to another worker.
        log.critical("engine crashed (%r); worker %s exits for its tasks to be redelivered",
                     error, self.config.hostname)
        os._exit(70)
