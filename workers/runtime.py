"""Everything one worker process holds: the engine loop, the result writer, the store, the Redis
side channels (token streaming, cancellation, live engine figures), and the worker-wide state of its
tasks: which jobs it holds, the lane where suspects run alone, and the graceful hand-back."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis

from contract.liveness import Heartbeat, live_instances, new_instance_id
from contract.redis_keys import (CANCEL_CHANNEL, STREAM_CHANNEL, WORKER_METRICS_KEY, WORKER_STATS_KEY,
                                 WORKER_STATS_TTL_S)
from engine import Engine, EngineStats, RequestOutput
from store import Store
from store.types import JobClaim
from workers.claim_batcher import ClaimBatcher
from workers.engine_loop import EngineLoop, GivenBack
from workers.metrics import WorkerMetrics
from workers.path_timings import PathTimings
from workers.result_writer import ResultWriter
from workers.store_retry import store_retrying
from workers.suspects import SuspectLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """A worker's settings, from `tokenmill.settings` via the CLI."""

    served_model: str
    hostname: str
    device_label: str
    redis_url: str
    instance: str = ""  # this process's instance id (contract.liveness); new on every start
    max_attempts: int = 3  # see workers.suspects
    fault_crash_marker: str = ""  # test only (workers.faults)


@dataclass
class Holding:
    """The jobs of one task: those it runs (``mine``) and those another task of this process is
    already running (a redelivered copy of a task still in hand: it must not run them twice)."""

    mine: list[str]
    others: list["_Held"]
    given_back: set[str] = field(default_factory=set)


@dataclass
class _Held:
    job_id: str
    done: threading.Event = field(default_factory=threading.Event)
    given_back: bool = False


class WorkerRuntime:
    """The long-lived parts of a worker, shared by all of its task threads."""

    def __init__(self, config: WorkerConfig, engine: Engine, store: Store) -> None:
        if not config.instance:
            config = replace(config, instance=new_instance_id())
        self.config = config
        self.store = store
        self.redis = redis.Redis.from_url(config.redis_url)
        self.timings = PathTimings()  # where the job path's time goes, published with the stats
        self.metrics = WorkerMetrics(config.served_model)  # Prometheus, published with the stats
        self.loop = EngineLoop(engine, on_stats=self._publish_stats, on_crash=self._die,
                               fault_marker=config.fault_crash_marker, timings=self.timings)
        self.writer = ResultWriter(store, timings=self.timings)
        # The claims of concurrent tasks, one transaction for all of them (workers.claim_batcher).
        self.claims = ClaimBatcher(self.claim_now)
        # Its own client, with timeouts: it also speaks on the way out of a crashed process.
        self.suspects = SuspectLedger(redis.Redis.from_url(config.redis_url, socket_timeout=5,
                                                           socket_connect_timeout=5))
        self._held: dict[str, _Held] = {}
        self._held_lock = threading.Lock()
        self._lane = threading.Lock()  # one suspect at a time in the engine
        self.alone_job: str | None = None  # the suspect running alone now
        self.stopping = False  # SIGTERM: tasks that start from now on go back to the queue at once
        self.giving_back = False  # the grace period is over: what is held goes back too
        self._grace_timer: threading.Timer | None = None
        self._cancel_thread = threading.Thread(target=self._listen_cancels, name="cancel-listener",
                                               daemon=True)
        self._stopping = False
        # Collecting and compressing the Prometheus registry takes milliseconds: not in the engine
        # loop's thread, which publishes the figures above.
        self._metrics_thread = threading.Thread(target=self._publish_metrics, name="metrics-publisher",
                                                daemon=True)
        self._metrics_stop = threading.Event()
        # Liveness (docs/reliability.md): renewed from its own thread; when renewals come back
        # after a lapse, the jobs that other workers took over meanwhile are dropped here.
        self.heartbeat = Heartbeat(config.redis_url, config.instance, config.hostname,
                                   on_restored=self.drop_taken_over)
        # Claims ask it whether a job's instance lives: bounded, so a hung Redis fails the claim
        # (retried, then the task goes back) instead of blocking it.
        self._liveness = redis.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.last_figures: dict[str, Any] = {}  # the latest engine figures (read by workers.engine_events)
        # Prefix routing (workers.prefix_index): set by workers.main; None where no worker queue is consumed.
        self.prefixes: Any = None

    def start(self) -> "WorkerRuntime":
        self.heartbeat.start()  # before any task can be delivered to this instance
        self.writer.start()
        self.claims.start()
        self.loop.start()
        self._cancel_thread.start()
        self._publish_stats(self.loop.engine.stats(), 0.0)
        self._metrics_thread.start()
        return self

    def stop(self) -> None:
        """Stops the loop, then drains the writer so every stored result is in."""
        self._stopping = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self.loop.stop()
        self.claims.stop()
        self.writer.stop()
        self._metrics_stop.set()
        if self._metrics_thread.is_alive():
            self._metrics_thread.join(5.0)  # its last write lands before the delete below
        self.heartbeat.stop(forget=True)
        try:
            self.redis.delete(WORKER_STATS_KEY.format(hostname=self.config.hostname),
                              WORKER_METRICS_KEY.format(hostname=self.config.hostname))
        except redis.RedisError:
            pass

    # -- the jobs held by this process ---------------------------------------------------------
    def hold(self, job_ids: list[str]) -> Holding:
        """Registers a task's jobs as held by it, except those another task already holds."""
        mine: list[str] = []
        others: list[_Held] = []
        with self._held_lock:
            for job_id in dict.fromkeys(job_ids):
                held = self._held.get(job_id)
                if held is None:
                    self._held[job_id] = _Held(job_id)
                    mine.append(job_id)
                else:
                    others.append(held)
        return Holding(mine, others)

    def held_ids(self) -> list[str]:
        """The jobs this process runs now."""
        with self._held_lock:
            return list(self._held)

    def claim_now(self, job_ids: list[str]) -> list[JobClaim]:
        """Marks the jobs running (counting the attempt), except those that another live worker
        process runs (a copy of their task is not a reason to start them twice); the store or Redis
        may be restarting: retried (`workers.store_retry`), then the last error is raised.

        First the jobs nobody runs (one transaction: the common case); only for what is left, the
        owners' liveness is read and the jobs of dead ones are taken over."""

        def claim() -> list[JobClaim]:
            jobs = self.store.jobs
            claims = jobs.mark_running(job_ids, self.config.hostname, self.config.instance, takeover=())
            rest = set(job_ids) - {c.id for c in claims}
            owners = jobs.running_instances(sorted(rest)) if rest else {}
            if not owners:
                return claims
            instances = {owner for owner in owners.values() if owner}
            dead = instances - self.live(instances)
            taken = jobs.mark_running(sorted(owners), self.config.hostname, self.config.instance, takeover=dead)
            return sorted(claims + taken, key=lambda c: c.id)

        return store_retrying(claim)

    def live(self, instances: set[str]) -> set[str]:
        """Which of the worker instances have a heartbeat (this one always counts as live)."""
        others = instances - {self.config.instance}
        return live_instances(self._liveness, others) | (instances & {self.config.instance})

    def drop_taken_over(self) -> None:
        """After a heartbeat lapse: stops the held jobs that the store no longer has as this
        instance's (another worker took them over); their results would not count anyway."""
        held = self.held_ids()
        if not held:
            return
        lost = set(held) - self.store.jobs.claimed_by(held, self.config.instance)
        for job_id in sorted(lost):
            self.loop.abort(job_id)
        if lost:
            log.warning("%d job(s) of this worker were taken over while it was cut off from Redis: stopped "
                        "here, they run on another worker", len(lost))

    def release(self, holding: Holding) -> None:
        """The task is done with its jobs; copies of it waiting on them may go on."""
        with self._held_lock:
            for job_id in holding.mine:
                held = self._held.pop(job_id, None)
                if held is not None:
                    held.given_back = job_id in holding.given_back
                    held.done.set()

    @contextmanager
    def alone(self, job_id: str) -> Iterator[None]:
        """Runs the body as the only suspect in this worker's engine (waiting for the lane);
        raises GivenBack if the worker starts handing its work back meanwhile."""
        while not self._lane.acquire(timeout=0.5):
            if self.giving_back:
                raise GivenBack("the worker is stopping")
        try:
            if self.giving_back:
                raise GivenBack("the worker is stopping")
            self.alone_job = job_id
            yield
        finally:
            self.alone_job = None
            self._lane.release()

    def begin_shutdown(self, grace_s: float) -> None:
        """Stopping (SIGTERM): the jobs held may finish for ``grace_s`` seconds; then whatever is
        left is handed back to the queue, unfinished and uncounted. Tasks that start from now on
        (received as the signal came) go back at once."""
        self.stopping = True
        if self._grace_timer is not None:
            if grace_s > 0:
                return
            self._grace_timer.cancel()  # a second, colder signal: now
        log.warning("stopping: %d request(s) held may finish for %.0fs, then go back to the queue",
                    self.loop.num_pending, grace_s)
        self._grace_timer = threading.Timer(grace_s, self.give_back)
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def give_back(self) -> None:
        """Hands every unfinished job back: its task goes back to the queue, its job to `queued`."""
        if not self.giving_back:
            log.warning("grace period over: handing %d unfinished request(s) back to the queue",
                        self.loop.num_pending)
        self.giving_back = True
        self.loop.give_back_all()

    # -- side channels -----------------------------------------------------------------------
    def publish_delta(self, job_id: str, out: RequestOutput) -> None:
        """Streams a job's new text on its channel (only for jobs that asked to stream)."""
        c = out.outputs[0]
        message = {"text": c.delta_text, "token_ids": c.delta_token_ids, "finished": out.finished,
                   "finish_reason": c.finish_reason}
        self.redis.publish(STREAM_CHANNEL.format(job_id=job_id), json.dumps(message))

    def _publish_stats(self, stats: EngineStats, tokens_per_s: float) -> None:
        key = WORKER_STATS_KEY.format(hostname=self.config.hostname)
        fields = {**asdict(stats), "tokens_per_s": round(tokens_per_s, 1),
                  "model": self.config.served_model, "device": self.config.device_label,
                  "pending": self.loop.num_pending, **self.timings.snapshot(), "updated_at": time.time()}
        self.last_figures = fields
        self.metrics.engine_figures(stats, tokens_per_s, self.loop.num_pending)
        try:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, WORKER_STATS_TTL_S)
            pipe.execute()
        except redis.RedisError as e:  # figures are best effort; generation goes on
            log.warning("could not publish engine stats: %r", e)

    def _publish_metrics(self) -> None:
        key = WORKER_METRICS_KEY.format(hostname=self.config.hostname)
        while not self._metrics_stop.wait(1.0):
            try:
                self.redis.set(key, self.metrics.encode(), ex=WORKER_STATS_TTL_S)
            except redis.RedisError as e:  # best effort, like the figures
                log.warning("could not publish metrics: %r", e)

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

    def _die(self, error: BaseException, in_flight: list[str]) -> None:
        # The engine is gone: exit without acknowledging anything, so the broker redelivers every
        # task this process held to another worker. First the evidence (workers.suspects): a
        # suspect running alone was charged when it started; otherwise the whole batch is suspect.
        try:
            log.critical("engine crashed (%r) with %d request(s) in its batch; worker %s exits for its "
                         "tasks to be redelivered", error, len(in_flight), self.config.hostname)
            if in_flight and self.alone_job not in in_flight:
                self.suspects.record_crash(in_flight)
            self.heartbeat.stop(forget=True)  # the other workers recover its tasks at once
        finally:
            os._exit(70)
