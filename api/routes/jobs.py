"""/v1/jobs: submit, read, list, cancel, and follow jobs (server-sent events)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from api.auth import Principal, tenant
from api.convert import Prepared, prepare_job
from api.errors import ApiError
from api.formats import job_full, job_summary
from api.limits import Admission, reservation, scopes_of
from api.webhooks import WebhookUrlError, check_webhook_url
from api.schemas.common import (
    AUTH,
    BAD,
    BUSY,
    MEDIA,
    MISSING,
    TOO_LARGE,
    UNAVAILABLE,
    IsoDateTime,
    responses,
    sse_schema,
)
from api.schemas.jobs import Job, JobCreate, JobList, JobStatus
from api.state import ApiState, get_state
from api.submit import Submitted
from api.waiting import FINAL, Delta, Final, JobFollower, cancel_job
from contract import tracing
from contract.log_context import set_log_fields
from store.sql import new_id
from store.types import JobSpec

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SSE = {200: {"description": "server-sent events: `status`, `delta` and a final `done` with the job",
             "content": sse_schema(["status", "delta", "done"], "data: a JSON object")}}


def check_backpressure(state: ApiState, model: str) -> None:
    """429 with Retry-After when the model's queue holds more interactive tasks than its limit.

    If Redis cannot be asked, the job is admitted: it is stored, and the failed send that follows
    answers 503 while the job waits in the store for the reconciler.
    """
    try:
        depth = state.dispatcher.depth(model)
    except Exception as exc:
        log.warning("queue depth of %s unknown (%r); admitting", model, exc)
        return
    if depth.interactive > state.config.queue_limit:
        raise ApiError(429, f"the queue of {model!r} holds {depth.interactive} jobs (limit "
                            f"{state.config.queue_limit}); retry later", code="queue_full",
                       headers={"Retry-After": "2"})


async def admit(state: ApiState, model: str) -> None:
    """Backpressure check; Redis is asked (off the event loop) only when the cached figure is stale."""
    depth = state.dispatcher.cached_depth(model)
    if depth is None:
        await run_in_threadpool(check_backpressure, state, model)
    elif depth.interactive > state.config.queue_limit:
        check_backpressure(state, model)


def submit_span(request: Request, started: float, spec: JobSpec, tenant_id: str) -> Any:
    """The root of a job's trace (under the client's own ``traceparent`` if it sent one), from the
    request's arrival to the job stored and sent; None when this process does not trace."""
    if not tracing.enabled():
        return None
    return tracing.start_span("tokenmill.submit", request.headers, kind=tracing.SpanKind.SERVER, start_s=started,
                              attributes={"tokenmill.job_id": spec.id, "tokenmill.tenant_id": tenant_id,
                                          "tokenmill.model": spec.model, "tokenmill.kind": spec.kind})


async def reserve(state: ApiState, who: Principal, job_id: str, prepared: Prepared,
                  idempotency_key: str | None) -> Admission:
    """Counts a request against its tenant's and key's limits (api.limits), or raises their 429.
    A request repeating an earlier job's idempotency key gets that job back, so it counts nothing."""
    assert who.tenant_id is not None
    scopes = scopes_of(who.tenant_id, who.key_id, who.tenant_limits, who.key_limits)
    if not scopes:
        return Admission(None)
    if idempotency_key is not None and await run_in_threadpool(
            state.store.jobs.id_for_idempotency_key, who.tenant_id, idempotency_key):
        return Admission(None)
    tokens = reservation(prepared.payload, prepared.prompt_tokens, prepared.max_tokens)
    return await run_in_threadpool(state.limiter.admit, scopes, [(job_id, tokens)])


async def submit_reserved(state: ApiState, tenant_id: str, spec: JobSpec, admission: Admission,
                          trace: dict[str, str] | None = None) -> Submitted:
    """Submits a job whose reservation is made; the reservation is given back if no new job was
    stored (an idempotency key matched an earlier job, or the store failed)."""
    try:
        submitted = await state.submitter.submit(tenant_id, spec, trace=trace)
    except BaseException:
        if admission.reserved_tokens is not None:
            await run_in_threadpool(state.limiter.release, [spec.id])
        raise
    if not submitted.created and admission.reserved_tokens is not None:
        await run_in_threadpool(state.limiter.release, [spec.id])
    return submitted


def checked_webhook(state: ApiState, url: str | None, who: Principal) -> str | None:
    """The webhook of a new job or batch: its own URL (checked: a 400 naming ``webhook_url`` if it
    may not be used) or its tenant's default."""
    if url is None:
        return who.webhook_url
    try:
        return check_webhook_url(url, allow_private=state.config.webhook_allow_private)
    except WebhookUrlError as exc:
        raise ApiError(400, str(exc), param="webhook_url", code="invalid_webhook_url") from None


def enqueue_failed(job_id: str) -> ApiError:
    """503 for a job that is stored but whose task Redis refused."""
    return ApiError(503, f"job {job_id} is stored (queued) but the queue is unavailable; it will be sent when "
                         "Redis is back. Retry with the same idempotency key to read it, or poll it.",
                    code="queue_unavailable", headers={"Retry-After": "5", "x-tokenmill-job-id": job_id})


@router.post("", status_code=202, response_model=Job, summary="Submit a job",
             responses=responses({200: {"model": Job, "description": "an earlier job with the same idempotency key"}},
                                 BAD, AUTH, MISSING, TOO_LARGE, MEDIA, BUSY, UNAVAILABLE))
async def create_job(body: JobCreate, request: Request, response: Response, who: Principal = Depends(tenant),
                     state: ApiState = Depends(get_state),
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    """Validates the job, stores it (``queued``), then sends its task: 202 with the job.

    The same idempotency key (field or ``Idempotency-Key`` header) from the same tenant answers 200
    with the job created first.
    """
    assert who.tenant_id is not None
    started = time.time()
    prepared = prepare_job(body, state.registry)
    webhook_url = await run_in_threadpool(checked_webhook, state, body.webhook_url, who)  # may resolve DNS
    await admit(state, prepared.model)
    deadline = body.deadline
    if body.timeout_s is not None:
        deadline = datetime.now(UTC) + timedelta(seconds=body.timeout_s)
    job_id = new_id("job_")
    idempotency_key = body.idempotency_key or idempotency_key or None
    admission = await reserve(state, who, job_id, prepared, idempotency_key)
    response.headers.update(admission.headers)
    spec = JobSpec(model=prepared.model, request=prepared.payload, priority=body.priority, api_key_id=who.key_id,
                   idempotency_key=idempotency_key, expires_at=deadline,
                   id=job_id, reserved_tokens=admission.reserved_tokens, webhook_url=webhook_url)
    received = datetime.now(UTC)
    span = submit_span(request, started, spec, who.tenant_id)
    try:
        submitted = await submit_reserved(state, who.tenant_id, spec, admission,
                                         trace=tracing.carrier(span) if span else None)
    finally:
        if span is not None:
            tracing.end(span)
    if submitted.created and not submitted.enqueued:
        raise enqueue_failed(submitted.id)
    response.headers["Location"] = f"/v1/jobs/{submitted.id}"
    if not submitted.created:
        job = await run_in_threadpool(state.store.jobs.get_job, who.tenant_id, submitted.id)
        if job is None:  # deleted between the write and the read: nothing sensible to show
            raise ApiError(404, f"no job {submitted.id!r}", code="job_not_found")
        return JSONResponse(await run_in_threadpool(_full_json, state, who.tenant_id, job), status_code=200,
                            headers=admission.headers)
    state.metrics.jobs_accepted.inc()
    set_log_fields(job_id=submitted.id)
    log.info("job accepted: model %s, %s", spec.model, spec.kind)
    # The new job as stored, without reading it back (the hot path): created_at is when the API
    # took the request, within a millisecond of the stored value; GET shows the stored one.
    # Serialized here rather than through the response model: this is the hot path, and the
    # fields are exactly Job's (a test checks the answer against the schema).
    body = {"id": submitted.id, "object": "job", "model": spec.model, "status": "queued", "kind": spec.kind,
            "priority": spec.priority, "attempts": 0, "created_at": received.isoformat(), "started_at": None,
            "finished_at": None, "expires_at": spec.expires_at.isoformat() if spec.expires_at else None,
            "batch_id": None, "custom_id": None, "idempotency_key": spec.idempotency_key, "error": None,
            "request": spec.request, "result": None, "usage": None, "timings": None,
            "webhook": None if webhook_url is None else {
                "url": webhook_url, "status": "pending", "attempts": 0, "last_status_code": None,
                "last_error": None, "delivered_at": None, "next_attempt_at": None}}
    return Response(json.dumps(body, separators=(",", ":")), status_code=202, media_type="application/json",
                    headers={"Location": f"/v1/jobs/{submitted.id}", **admission.headers})


def _full_json(state: ApiState, tenant_id: str, job: Any) -> Any:
    result = state.store.jobs.get_result(tenant_id, job.id) if job.status == "succeeded" else None
    usage = state.store.jobs.get_usage(tenant_id, job.id) if job.status in FINAL else None
    return json.loads(Job.model_validate(job_full(job, result, usage)).model_dump_json())


def _read(state: ApiState, tenant_id: str, job_id: str) -> dict[str, Any]:
    job = state.store.jobs.get_job(tenant_id, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
    result = state.store.jobs.get_result(tenant_id, job_id) if job.status in FINAL else None
    usage = state.store.jobs.get_usage(tenant_id, job_id) if job.status in FINAL else None
    delivery = state.store.webhooks.delivery_of(tenant_id, job_id=job_id) if job.webhook_status not in (
        None, "pending") else None
    return job_full(job, result, usage, delivery)


@router.get("/{job_id}", response_model=Job, summary="Read a job",
            responses=responses(AUTH, MISSING))
def get_job(job_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """The job's status, and once it is final its result, usage and timings."""
    assert who.tenant_id is not None
    return _read(state, who.tenant_id, job_id)


@router.get("", response_model=JobList, summary="List jobs", responses=responses(BAD, AUTH))
def list_jobs(
    who: Principal = Depends(tenant), state: ApiState = Depends(get_state),
    status: Annotated[list[JobStatus] | None, Query(description="repeat to ask for several")] = None,
    batch_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[IsoDateTime | None, Query(description="created at or after (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    """The tenant's jobs, newest first, filtered by status, batch and creation time."""
    assert who.tenant_id is not None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    try:
        page = state.store.jobs.list_jobs(who.tenant_id, status=status or None, batch_id=batch_id, since=since,
                                          limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="cursor", code="invalid_value") from None
    return {"object": "list", "data": [job_summary(j) for j in page.jobs], "has_more": page.next_cursor is not None,
            "next_cursor": page.next_cursor}


@router.delete("/{job_id}", response_model=Job, summary="Cancel a job", responses=responses(AUTH, MISSING))
async def cancel(job_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """Cancels a queued or running job (a running one stops at the engine's next step). A job that
    is already final is returned unchanged."""
    assert who.tenant_id is not None
    job = await cancel_job(state, who.tenant_id, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
    return await run_in_threadpool(_read, state, who.tenant_id, job_id)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@router.get("/{job_id}/events", summary="Follow a job (server-sent events)",
            responses=responses(SSE, AUTH, MISSING), response_class=StreamingResponse)
async def events(job_id: str, request: Request, who: Principal = Depends(tenant),
                 state: ApiState = Depends(get_state)) -> StreamingResponse:
    """Server-sent events: ``status`` on every status change, ``delta`` with new text (for jobs
    submitted with ``stream: true``), and ``done`` with the final job, after which the stream ends."""
    assert who.tenant_id is not None
    tenant_id = who.tenant_id
    job = await run_in_threadpool(state.store.jobs.get_job, tenant_id, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
    follower = JobFollower(state, request.app.state.aioredis, tenant_id, job_id, quiet_check_s=0.5)
    await follower.subscribe()

    async def stream() -> AsyncIterator[bytes]:
        try:
            last = job.status
            yield _sse("status", {"id": job_id, "status": last})
            if last not in FINAL:
                async for ev in _with_status(follower, state, tenant_id, job_id, last):
                    if isinstance(ev, tuple):
                        yield _sse("status", {"id": job_id, "status": ev[1]})
                    elif isinstance(ev, Delta):
                        yield _sse("delta", {"text": ev.text, "token_ids": ev.token_ids})
            full = await run_in_threadpool(_read, state, tenant_id, job_id)
            yield _sse("done", json.loads(Job.model_validate(full).model_dump_json()))
        finally:
            await follower.close()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _with_status(follower: JobFollower, state: ApiState, tenant_id: str, job_id: str,
                       last: str) -> AsyncIterator[Delta | tuple[str, str]]:
    """The follower's deltas, with a ("status", s) item whenever the stored status changes."""
    async for ev in follower.events():
        if isinstance(ev, Delta):
            if last == "queued":  # text flows: the job runs, whatever the last check said
                last = "running"
                yield ("status", last)
            yield ev
            continue
        status = ev.job.status if isinstance(ev, Final) else ev.status
        if status != last:
            last = status
            yield ("status", last)
        if isinstance(ev, Final):
            return
