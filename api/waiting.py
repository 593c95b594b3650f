"""Waiting on jobs from a request: poll the store until a job is final (synchronous completions),
or follow its text on the Redis stream channel while checking the store (streaming and events)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi.concurrency import run_in_threadpool

from api.errors import ApiError
from api.state import ApiState
from contract.redis_keys import STREAM_CHANNEL
from store.models import Job as JobRow

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled", "expired")


class ClientGone(Exception):
    """The client went away while waiting; its job was cancelled."""


async def cancel_job(state: ApiState, tenant_id: str, job_id: str) -> JobRow | None:
    """Cancels the job in the store, then tells the worker running it to stop."""
    job = await run_in_threadpool(state.store.jobs.cancel, tenant_id, job_id)
    await run_in_threadpool(state.dispatcher.cancel, job_id)
    return job


async def wait_final(state: ApiState, tenant_id: str, job_id: str, timeout_s: float,
                     disconnected: Callable[[], Awaitable[bool]] | None = None) -> JobRow:
    """Polls the store until the job is final, starting fast and backing off to 100 ms.

    Raises ApiError 504 past ``timeout_s`` (the job goes on; the client may poll it), and
    ClientGone (after cancelling the job) when the client disconnects.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        job = await run_in_threadpool(state.store.jobs.get_job, tenant_id, job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
        if job.status in FINAL:
            return job
        if time.monotonic() >= deadline:
            raise ApiError(504, f"job {job_id} did not finish within {timeout_s:g} s; it goes on: poll "
                                f"GET /v1/jobs/{job_id}", code="timeout", headers={"x-tokenmill-job-id": job_id})
        if disconnected is not None and await disconnected():
            await cancel_job(state, tenant_id, job_id)
            raise ClientGone(job_id)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def failure_error(job: JobRow) -> ApiError:
    """The error a synchronous endpoint answers for a job that did not succeed."""
    message = job.error_message or f"the job ended {job.status}"
    if job.status == "cancelled":
        return ApiError(409, f"job {job.id} was cancelled", code="cancelled")
    if job.status == "expired":
        return ApiError(504, f"job {job.id} expired before it finished: {message}", code="expired")
    if job.error_code == "invalid_request":
        return ApiError(400, message, code="invalid_request")
    return ApiError(502, f"job {job.id} failed on the worker ({job.error_code}): {message}",
                    code=job.error_code or "worker_error")


@dataclass
class Delta:
    """New text of a streaming job."""

    text: str
    token_ids: list[int]


@dataclass
class Status:
    """The job's stored status, as read whenever the channel was quiet."""

    status: str


@dataclass
class Final:
    """The job is over: its row as stored (its result, when it succeeded, is in the store)."""

    job: JobRow
    finish_reason: str | None


class JobFollower:
    """Follows one job: subscribe first (before its task is sent, so no text is missed), then
    iterate its deltas; the store is checked whenever the channel is quiet, so a failure, a
    cancellation, a lost stream or a job that finished before subscribing all end the iteration."""

    def __init__(self, state: ApiState, client: aioredis.Redis, tenant_id: str, job_id: str,
                 quiet_check_s: float = 1.0) -> None:
        self._state = state
        self._client = client
        self._tenant = tenant_id
        self.job_id = job_id
        self._quiet = quiet_check_s
        self._pubsub: Any = None

    async def subscribe(self) -> None:
        """Subscribes to the job's stream channel."""
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(STREAM_CHANNEL.format(job_id=self.job_id))

    async def close(self) -> None:
        """Unsubscribes and gives the connection back."""
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
            self._pubsub = None

    async def _job(self) -> JobRow | None:
        return await run_in_threadpool(self._state.store.jobs.get_job, self._tenant, self.job_id)

    async def events(self) -> AsyncIterator[Delta | Status | Final]:
        """Deltas as they come (and the stored status whenever the channel is quiet), then one Final."""
        assert self._pubsub is not None, "subscribe() first"
        last_check = time.monotonic()
        finish: str | None = None
        while True:
            msg = None
            try:
                msg = await self._pubsub.get_message(timeout=min(self._quiet, 0.5))
            except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                log.warning("stream of %s lost Redis (%r); following the store", self.job_id, exc)
                await asyncio.sleep(0.5)
            if msg is not None and msg.get("type") == "message":
                data = json.loads(msg["data"])
                if data.get("text") or data.get("token_ids"):
                    yield Delta(data.get("text") or "", list(data.get("token_ids") or []))
                if data.get("finished"):
                    finish = data.get("finish_reason")
                    break
                continue
            if time.monotonic() - last_check >= self._quiet:
                last_check = time.monotonic()
                job = await self._job()
                if job is None or job.status in FINAL:
                    break
                yield Status(job.status)
        # The worker publishes the last text before the result is written: wait for the row.
        for _ in range(100):
            job = await self._job()
            if job is None or job.status in FINAL:
                break
            await asyncio.sleep(0.02)
        if job is None:
            raise ApiError(404, f"no job {self.job_id!r}", code="job_not_found")
        yield Final(job, finish)
