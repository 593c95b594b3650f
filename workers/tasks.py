"""The Celery tasks of a worker: claim jobs in the store, run them in the shared engine loop,
record results, and only then return (late acknowledgement)."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from datetime import datetime, timezone
from typing import Any

from celery import Celery

from engine import SamplingParams
from store.types import FinishedJob, JobFailure
from workers.app import STREAM_CHANNEL, TASK_GENERATE, TASK_GENERATE_BULK
from workers.engine_loop import EngineCrashed
from workers.result_writer import ResultRejected
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

BULK_PRIORITY_OFFSET = 1000  # bulk jobs queue behind every interactive job inside the engine


def register_tasks(app: Celery, rt: WorkerRuntime) -> None:
    """Binds the generate tasks to this process's runtime."""

    @app.task(name=TASK_GENERATE, bind=True, acks_late=True)
    def generate(self: Any, job_id: str, enqueued_at: float) -> dict[str, int]:
        return run_jobs(rt, [job_id], enqueued_at)

    @app.task(name=TASK_GENERATE_BULK, bind=True, acks_late=True)
    def generate_bulk(self: Any, job_ids: list[str], enqueued_at: float) -> dict[str, int]:
        return run_jobs(rt, list(job_ids), enqueued_at)


def run_jobs(rt: WorkerRuntime, job_ids: list[str], enqueued_at: float) -> dict[str, int]:
    """Runs the given jobs to a final state in the store. Returns counts by outcome."""
    counts = {"succeeded": 0, "failed": 0, "skipped": 0, "expired": 0, "duplicate": 0,
              "prompt_tokens": 0, "completion_tokens": 0}  # token totals: shown by Flower
    claims = rt.store.jobs.mark_running(job_ids, rt.config.hostname)
    counts["skipped"] = len(set(job_ids)) - len(claims)  # cancelled, finished, expired or unknown
    failures: list[JobFailure] = []
    running: list[tuple[Any, Future, bool, float]] = []
    for claim in claims:
        if claim.attempts > rt.config.max_attempts:
            failures.append(JobFailure(claim.id, "attempts_exhausted",
                                       f"the job was started {claim.attempts - 1} times without finishing "
                                       f"(its worker was lost each time); giving up after "
                                       f"{rt.config.max_attempts} attempts"))
            continue
        request = claim.request or {}
        try:
            params = SamplingParams.from_dict(dict(request.get("params") or {}))
        except (ValueError, TypeError) as e:
            failures.append(JobFailure(claim.id, "invalid_request", str(e)))
            continue
        stream = bool(request.get("stream"))
        # Queue time: from the send to the moment the engine gets the request.
        queue_ms = max(0.0, (time.time() - enqueued_at) * 1000.0)
        priority = claim.priority + (BULK_PRIORITY_OFFSET if claim.kind == "bulk" else 0)
        fut = rt.loop.submit(claim.id, prompt=request.get("prompt"), messages=request.get("messages"),
                             params=params, priority=priority,
                             on_delta=rt.publish_delta if stream else None)
        running.append((claim, fut, stream, queue_ms))

    writes: list[tuple[str, Future]] = []
    for claim, fut, stream, queue_ms in running:
        try:
            out = _wait(rt, claim, fut)
        except ValueError as e:  # the engine rejected the request: it fails alone
            failures.append(JobFailure(claim.id, "invalid_request", str(e)))
            if stream:
                _publish_end(rt, claim.id, "error")
            continue
        except EngineCrashed:
            # Never acknowledge: the process exits and the broker redelivers these tasks.
            log.critical("engine crashed while running %s", claim.id)
            os._exit(70)
        if out.finish_reason == "abort" and _expired(claim):
            rt.store.jobs.expire([claim.id])
            counts["expired"] += 1
        ttft = (out.first_token_time - out.arrival_time) * 1000.0 if out.first_token_time else 0.0
        total = ((out.finish_time or time.monotonic()) - out.arrival_time) * 1000.0
        params = claim.request.get("params") or {}
        finished = FinishedJob(
            job_id=claim.id, output_text=out.text, finish_reason=out.finish_reason or "stop",
            prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            cached_prompt_tokens=out.cached_tokens, queue_ms=queue_ms, ttft_ms=ttft, total_ms=total,
            worker=rt.config.hostname, device=rt.config.device_label,
            token_ids=list(out.token_ids) if claim.request.get("return_token_ids") else None,
            logprobs=_logprobs(out) if params.get("logprobs") is not None else None)
        writes.append((claim.id, rt.writer.submit(finished)))
        counts["prompt_tokens"] += out.prompt_tokens
        counts["completion_tokens"] += out.completion_tokens

    if failures:
        _store_retrying(lambda: rt.store.jobs.mark_failed(failures))
        counts["failed"] += len(failures)
    rejected: list[JobFailure] = []
    for job_id, fut in writes:
        try:
            stored = fut.result()
        except ResultRejected as e:
            rejected.append(JobFailure(job_id, "result_rejected", str(e)))
            continue
        counts["succeeded" if stored else "duplicate"] += 1
    if rejected:
        _store_retrying(lambda: rt.store.jobs.mark_failed(rejected))
        counts["failed"] += len(rejected)
    return counts


def _wait(rt: WorkerRuntime, claim: Any, fut: Future) -> Any:
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


def _logprobs(out: Any) -> list[dict[str, Any]] | None:
    if out.logprobs is None:
        return None
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
            for lp in out.logprobs]


def _publish_end(rt: WorkerRuntime, job_id: str, reason: str) -> None:
    try:
        rt.redis.publish(STREAM_CHANNEL.format(job_id=job_id),
                         json.dumps({"text": "", "token_ids": [], "finished": True, "finish_reason": reason}))
    except Exception:  # noqa: BLE001 - streaming is best effort
        pass


def _store_retrying(work: Any, attempts: int = 30) -> Any:
    backoff = 0.1
    for i in range(attempts):
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - the database may be restarting
            if i == attempts - 1:
                raise
            log.warning("store write failed (%r); retrying in %.1fs", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
