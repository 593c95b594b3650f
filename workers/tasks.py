"""The Celery tasks of a worker: claim jobs in the store, run them in the shared engine loop,
record results, and only then return (late acknowledgement).

A task hands its jobs back instead (its message returns to the queue, its jobs to `queued`) when
the worker stops and its grace period runs out. Jobs suspected of crashing workers run alone
(`workers.suspects`); a copy of a task that this process is already running waits for the original
instead of running its jobs twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout, wait as futures_wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from celery import Celery
from celery.exceptions import Reject

from contract import tracing
from contract.log_context import log_fields, set_log_fields
from contract.queues import TASK_GENERATE, TASK_GENERATE_BULK
from contract.redis_keys import STREAM_CHANNEL
from engine import SamplingParams
from store.types import FinishedJob, JobClaim, JobFailure
from workers.engine_loop import EngineCrashed, GivenBack
from workers.job_trace import job_trace, trace_engine, trace_headers, trace_write
from workers.metrics import JobTimes, job_times
from workers.path_timings import timed_request_class
from workers.result_writer import ResultRejected
from workers.runtime import Holding, WorkerRuntime
from workers.store_retry import store_retrying
from workers.suspects import ALONE, CLEAR, EXHAUSTED, exhausted_message, verdict

log = logging.getLogger(__name__)

BULK_PRIORITY_OFFSET = 1000  # bulk jobs queue behind every interactive job inside the engine


def register_tasks(app: Celery, rt: WorkerRuntime) -> None:
    """Binds the generate tasks to this process's runtime."""
    timed = timed_request_class(rt.timings)  # the acknowledgement's time (workers.path_timings)

    @app.task(name=TASK_GENERATE, bind=True, acks_late=True, Request=timed)
    def generate(self: Any, job_id: str, enqueued_at: float) -> dict[str, int]:
        return run_jobs(rt, [job_id], enqueued_at, trace=trace_headers(self.request))

    @app.task(name=TASK_GENERATE_BULK, bind=True, acks_late=True, Request=timed)
    def generate_bulk(self: Any, job_ids: list[str], enqueued_at: float) -> dict[str, int]:
        return run_jobs(rt, list(job_ids), enqueued_at)


def run_jobs(rt: WorkerRuntime, job_ids: list[str], enqueued_at: float,
             trace: dict[str, str] | None = None) -> dict[str, int]:
    """Runs the given jobs to a final state in the store. Returns counts by outcome; raises
    `Reject(requeue=True)` when some jobs went back to the queue unfinished (the worker stops).
    ``trace``: the trace context the task carried (workers.job_trace)."""
    with job_trace(trace, job_ids, enqueued_at, rt.config.hostname):
        return _run_jobs(rt, job_ids, enqueued_at)


def _run_jobs(rt: WorkerRuntime, job_ids: list[str], enqueued_at: float) -> dict[str, int]:
    started = time.monotonic()
    rt.timings.add("delivery", max(0.0, time.time() - enqueued_at))
    if rt.stopping:  # received as the worker was told to stop: another worker will run it
        raise Reject("the worker is stopping: the task goes back to the queue", requeue=True)
    run = _TaskRun(rt, rt.hold(job_ids), enqueued_at)
    try:
        with log_fields(job_id=job_ids[0] if len(job_ids) == 1 else None):
            run.run()
    finally:
        rt.release(run.holding)
        rt.timings.add("task", time.monotonic() - started)
    requeue = bool(run.holding.given_back)
    for held in run.holding.others:  # a copy of a task this process runs: the original finishes it
        held.done.wait()
        requeue |= held.given_back
    if run.holding.others and not requeue:
        # Claimed again rather than assumed done: the original's result may not have counted
        # (fenced: the job was taken over while this worker was cut off from Redis, then put back).
        again = _TaskRun(rt, rt.hold([h.job_id for h in run.holding.others]), enqueued_at)
        try:
            again.run()
        finally:
            rt.release(again.holding)
        requeue |= bool(again.holding.given_back)
        run.counts["duplicate"] += again.counts["skipped"]
        for key in ("succeeded", "failed", "expired", "prompt_tokens", "completion_tokens"):
            run.counts[key] += again.counts[key]
    if requeue:
        raise Reject("the worker is stopping: unfinished jobs go back to the queue", requeue=True)
    return run.counts


@dataclass
class _Job:
    claim: JobClaim
    params: SamplingParams
    stream: bool
    queue_ms: float
    future: Future | None = None


@dataclass
class _TaskRun:
    """One task's jobs, from claim to stored result."""

    rt: WorkerRuntime
    holding: Holding
    enqueued_at: float
    counts: dict[str, int] = field(default_factory=lambda: {
        "succeeded": 0, "failed": 0, "skipped": 0, "expired": 0, "duplicate": 0,
        "prompt_tokens": 0, "completion_tokens": 0})  # token totals: shown by Flower
    failures: list[JobFailure] = field(default_factory=list)
    writes: list[tuple[str, Future]] = field(default_factory=list)
    claims: dict[str, JobClaim] = field(default_factory=dict)  # for the metrics of failures
    times: dict[str, tuple[JobTimes, str]] = field(default_factory=dict)  # job -> figures, status if stored
    handed: dict[str, float] = field(default_factory=dict)  # job -> when its result went to the writer

    def run(self) -> None:
        rt, mine = self.rt, self.holding.mine
        if not mine:
            return
        start = time.monotonic()
        with tracing.child("tokenmill.claim"):
            claims = _claim(rt, mine)
        rt.timings.add("claim", time.monotonic() - start)
        if rt.stopping and claims:  # claimed as the stop signal came: back to the queue, not started
            self.holding.given_back.update(c.id for c in claims)
            self._store()
            return
        self.counts["skipped"] = len(mine) - len(claims)  # cancelled, finished, expired or unknown
        rt.metrics.claimed(claims)
        if len({c.tenant_id for c in claims}) == 1:
            set_log_fields(tenant_id=claims[0].tenant_id)
        self.claims = {c.id: c for c in claims}
        evidence = rt.suspects.lookup([c.id for c in claims if c.attempts > 1])
        batch: list[_Job] = []
        alone: list[_Job] = []
        for claim in claims:
            suspicion = evidence.get(claim.id, CLEAR)
            how = verdict(claim.attempts, suspicion, rt.config.max_attempts)
            if how == EXHAUSTED:
                self.failures.append(JobFailure(claim.id, "attempts_exhausted", exhausted_message(
                    claim.attempts, suspicion, rt.config.max_attempts)))
                continue
            try:
                job = self._prepare(claim)
            except (ValueError, TypeError) as e:
                self.failures.append(JobFailure(claim.id, "invalid_request", str(e)))
                continue
            if how == ALONE:
                alone.append(job)
            else:
                job.future = self._submit(job)
                batch.append(job)
        for job in batch:
            self._finish(job, lambda job=job: _wait(rt, job))
        for job in alone:
            self._run_alone(job)
        self._store()

    def _prepare(self, claim: JobClaim) -> _Job:
        request = claim.request or {}
        params = SamplingParams.from_dict(dict(request.get("params") or {}))
        # Queue time: from the send to the moment the engine gets the request.
        queue_ms = max(0.0, (time.time() - self.enqueued_at) * 1000.0)
        return _Job(claim, params, bool(request.get("stream")), queue_ms)

    def _submit(self, job: _Job) -> Future:
        claim, request = job.claim, job.claim.request or {}
        priority = claim.priority + (BULK_PRIORITY_OFFSET if claim.kind == "bulk" else 0)
        if self.rt.prefixes is not None:  # its prefixes are in this engine's cache from now on
            self.rt.prefixes.publish(request)
        return self.rt.loop.submit(claim.id, prompt=request.get("prompt"), messages=request.get("messages"),
                                   params=job.params, priority=priority,
                                   on_delta=self.rt.publish_delta if job.stream else None,
                                   tenant=claim.tenant_id, weight=claim.tenant_weight)

    def _run_alone(self, job: _Job) -> None:
        """A suspect's solo run: it holds the lane until its result is stored, so that a crash
        after it (another suspect's) is never charged to it."""
        rt = self.rt
        try:
            with rt.alone(job.claim.id):
                rt.suspects.start_solo_run(job.claim.id)
                log.warning("job %s runs alone: it was in the batch of a crashed engine, or lost its "
                            "worker %d times", job.claim.id, job.claim.attempts - 1)
                job.future = self._submit(job)
                written = len(self.writes)
                self._finish(job, lambda: _wait(rt, job))
                futures_wait([fut for _, fut in self.writes[written:]])
        except GivenBack:  # the worker stopped while the job waited for the lane
            self.holding.given_back.add(job.claim.id)

    def _finish(self, job: _Job, get_output: Callable[[], Any]) -> None:
        rt, claim = self.rt, job.claim
        try:
            out = get_output()
        except ValueError as e:  # the engine rejected the request: it fails alone
            self.failures.append(JobFailure(claim.id, "invalid_request", str(e)))
            if job.stream:
                _publish_end(rt, claim.id, "error")
            return
        except GivenBack:
            self.holding.given_back.add(claim.id)
            return
        except EngineCrashed:
            # Never acknowledge: the process exits and the broker redelivers these tasks.
            log.critical("engine crashed while running %s", claim.id)
            os._exit(70)
        # Stopped at its deadline: stored as `expired` with its result and usage, one transaction.
        expired = out.finish_reason == "abort" and _expired(claim)
        if expired:
            self.counts["expired"] += 1
        ttft = (out.first_token_time - out.arrival_time) * 1000.0 if out.first_token_time else 0.0
        now = time.monotonic()
        total = ((out.finish_time or now) - out.arrival_time) * 1000.0
        rt.timings.add("engine", total / 1000.0)
        rt.timings.add("handoff", max(0.0, now - (out.finish_time or now)))
        params = claim.request.get("params") or {}
        with_ids, with_logprobs = bool(claim.request.get("return_token_ids")), params.get("logprobs") is not None
        choices = [_choice(o, with_ids, with_logprobs) for o in out.outputs] if len(out.outputs) > 1 else None
        finished = FinishedJob(
            job_id=claim.id, output_text=out.text, finish_reason=out.finish_reason or "stop",
            prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            cached_prompt_tokens=out.cached_tokens, queue_ms=job.queue_ms, ttft_ms=ttft, total_ms=total,
            worker=rt.config.hostname, device=rt.config.device_label, worker_instance=rt.config.instance,
            token_ids=list(out.token_ids) if with_ids else None,
            logprobs=_logprobs(out.logprobs) if with_logprobs else None, expired=expired, choices=choices)
        self.writes.append((claim.id, rt.writer.submit(finished)))
        self.times[claim.id] = (job_times(claim.model, claim.kind, self.enqueued_at, out),
                                "expired" if expired else "succeeded")
        trace_engine(self.times[claim.id][0])
        self.handed[claim.id] = time.time()
        self.counts["prompt_tokens"] += out.prompt_tokens
        self.counts["completion_tokens"] += out.completion_tokens

    def _store(self) -> None:
        rt = self.rt
        if self.failures:
            store_retrying(lambda: rt.store.jobs.mark_failed(self.failures))
            self.counts["failed"] += len(self.failures)
            self._count_failed(self.failures)
        rejected: list[JobFailure] = []
        for job_id, fut in self.writes:
            try:
                stored = fut.result()
            except ResultRejected as e:
                rejected.append(JobFailure(job_id, "result_rejected", str(e)))
                continue
            self.counts["succeeded" if stored else "duplicate"] += 1
            if stored and job_id in self.times:
                trace_write(self.handed[job_id])
                rt.metrics.stored(*self.times[job_id])
                _log_finished(job_id, self.claims.get(job_id), *self.times[job_id])
        if rejected:
            store_retrying(lambda: rt.store.jobs.mark_failed(rejected))
            self.counts["failed"] += len(rejected)
            self._count_failed(rejected)
        if self.holding.given_back:
            back = sorted(self.holding.given_back)
            store_retrying(lambda: rt.store.jobs.give_back(back, rt.config.hostname, rt.config.instance))
            log.info("handed %d unfinished job(s) back to the queue", len(back))


    def _count_failed(self, failures: list[JobFailure]) -> None:
        for f in failures:
            claim = self.claims.get(f.job_id)
            if claim is not None:
                self.rt.metrics.failed(claim.model, claim.kind, f.code)
            with log_fields(job_id=f.job_id, tenant_id=claim.tenant_id if claim else None):
                log.warning("job failed: %s", f.code)  # the code only: a message may quote the request


def _log_finished(job_id: str, claim: JobClaim | None, t: JobTimes, status: str) -> None:
    with log_fields(job_id=job_id, tenant_id=claim.tenant_id if claim else None):
        log.info("job %s: %d prompt + %d completion tokens, %.3fs queued, %.3fs to the first token, %.3fs "
                 "in all", status, t.prompt_tokens, t.completion_tokens, max(0.0, t.admitted_at - t.enqueued_at),
                 max(0.0, (t.first_token_at or t.finished_at) - t.enqueued_at),
                 max(0.0, t.finished_at - t.enqueued_at))


def _claim(rt: WorkerRuntime, job_ids: list[str]) -> list[JobClaim]:
    """Marks the jobs running, with those of the other tasks claiming now (workers.claim_batcher,
    `WorkerRuntime.claim_now`); if the store stays away, the task goes back to the queue rather
    than being lost."""
    try:
        return rt.claims.claim(job_ids)
    except Exception as e:  # noqa: BLE001 - whatever it is, the task must not be acknowledged
        raise Reject(f"could not claim the jobs in the store ({e!r})", requeue=True) from e


def _wait(rt: WorkerRuntime, job: _Job) -> Any:
    claim, fut = job.claim, job.future
    assert fut is not None
    deadline = getattr(claim, "expires_at", None)
    if deadline is None:
        return fut.result()
    remaining = (deadline - datetime.now(timezone.utc)).total_seconds()
    try:
        return fut.result(timeout=max(remaining, 0.0))
    except FutureTimeout:
        rt.loop.abort(claim.id)  # stops at the next step and frees its blocks
        return fut.result()


def _expired(claim: Any) -> bool:
    deadline = getattr(claim, "expires_at", None)
    return deadline is not None and datetime.now(timezone.utc) >= deadline


def _logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    if logprobs is None:
        return None
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
            for lp in logprobs]


def _choice(completion: Any, with_ids: bool, with_logprobs: bool) -> dict[str, Any]:
    """One of a job's n completions, as the store keeps it (`FinishedJob.choices`)."""
    return {"index": completion.index, "text": completion.text,
            "finish_reason": completion.finish_reason or "stop",
            "token_ids": list(completion.token_ids) if with_ids else None,
            "logprobs": _logprobs(completion.logprobs) if with_logprobs else None}


def _publish_end(rt: WorkerRuntime, job_id: str, reason: str) -> None:
    try:
        rt.redis.publish(STREAM_CHANNEL.format(job_id=job_id),
                         json.dumps({"text": "", "token_ids": [], "finished": True, "finish_reason": reason}))
    except Exception:  # noqa: BLE001 - streaming is best effort
        pass
