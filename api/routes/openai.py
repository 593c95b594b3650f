"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions and /v1/models.

A request becomes a job like any other (same queue, same store, same accounting); the call then
waits for it, or streams its text as server-sent events in OpenAI's chunk format.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.auth import Principal, authenticate, tenant
from api.convert import Prepared, prepare_chat, prepare_completion, served_model
from api.errors import ApiError, error_body
from api.formats import chat_completion, chunk, completion, finish_reason, openai_usage, usage_chunk
from api.routes.jobs import admit, enqueue_failed, reserve, submit_reserved, submit_span
from api.schemas.common import (
    AUTH,
    BAD,
    BUSY,
    CONFLICT,
    MEDIA,
    MISSING,
    TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    WORKER_FAILED,
    responses,
    sse_schema,
)
from api.schemas.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from api.state import ApiState, get_state
from api.waiting import ClientGone, Delta, Final, JobFollower, cancel_job, failure_error, wait_final
from contract import tracing
from contract.log_context import set_log_fields
from store.sql import new_id
from store.types import JobSpec

router = APIRouter(tags=["openai"])

_STREAM = {"content": sse_schema(None, "data: a chunk (JSON), an error (JSON) or [DONE]"),
           "description": "the answer; with stream: true, server-sent events of chunks ending with `data: [DONE]`"}
_ERRORS = (BAD, AUTH, MISSING, CONFLICT, TOO_LARGE, MEDIA, BUSY, UNAVAILABLE, TIMEOUT, WORKER_FAILED)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _submit(request: Request, state: ApiState, tenant_id: str, spec: JobSpec, started: float,
                  admission: Any) -> Any:
    """Stores and sends the job, traced from ``started`` when this process traces."""
    span = submit_span(request, started, spec, tenant_id)
    try:
        return await submit_reserved(state, tenant_id, spec, admission, trace=tracing.carrier(span) if span else None)
    finally:
        if span is not None:
            tracing.end(span)


async def _run(request: Request, response: Response, state: ApiState, who: Principal, prepared: Prepared, *,
               chat: bool, stream: bool, include_usage: bool, priority: int, idempotency_key: str | None) -> Any:
    assert who.tenant_id is not None
    started = time.time()
    await admit(state, prepared.model)
    job_id = new_id("job_")
    admission = await reserve(state, who, job_id, prepared, idempotency_key)
    response.headers.update(admission.headers)
    spec = JobSpec(model=prepared.model, request=prepared.payload, priority=priority, api_key_id=who.key_id,
                   idempotency_key=idempotency_key, id=job_id, reserved_tokens=admission.reserved_tokens)
    if not stream:
        submitted = await _submit(request, state, who.tenant_id, spec, started, admission)
        if submitted.created and not submitted.enqueued:
            raise enqueue_failed(submitted.id)
        state.metrics.jobs_accepted.inc(int(submitted.created))
        set_log_fields(job_id=submitted.id)
        try:
            job = await wait_final(state, who.tenant_id, submitted.id, state.config.sync_timeout_s,
                                   request.is_disconnected)
        except ClientGone:
            return Response(status_code=499)
        if job.status != "succeeded":
            raise failure_error(job)
        result = await run_in_threadpool(state.store.jobs.get_result, who.tenant_id, job.id)
        usage = await run_in_threadpool(state.store.jobs.get_usage, who.tenant_id, job.id)
        if result is None:
            raise ApiError(502, f"job {job.id} succeeded but its result is missing", code="result_missing")
        return (chat_completion if chat else completion)(job, result, usage, state.registry)

    # Streaming: subscribe before the task is sent, so not a token is missed.
    follower = JobFollower(state, request.app.state.aioredis, who.tenant_id, job_id)
    await follower.subscribe()
    try:
        submitted = await _submit(request, state, who.tenant_id, spec, started, admission)
        if submitted.id != job_id:  # an idempotency key matched an earlier job: follow that one
            await follower.close()
            follower = JobFollower(state, request.app.state.aioredis, who.tenant_id, submitted.id)
            await follower.subscribe()
        if submitted.created and not submitted.enqueued:
            raise enqueue_failed(submitted.id)
    except BaseException:
        await follower.close()
        raise
    state.metrics.jobs_accepted.inc(int(submitted.created))
    set_log_fields(job_id=submitted.id)
    return StreamingResponse(_chunks(state, who.tenant_id, follower, prepared.model, chat, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "x-tokenmill-job-id": submitted.id, **admission.headers})


async def _chunks(state: ApiState, tenant_id: str, follower: JobFollower, model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[bytes]:
    job_id = follower.job_id
    created = int(time.time())
    sent = ""
    done = False
    try:
        if chat:
            yield _sse(chunk(job_id, model, created, chat=True, text="", role=True))
        async for ev in follower.events():
            if isinstance(ev, Delta):
                if ev.text:
                    sent += ev.text
                    yield _sse(chunk(job_id, model, created, chat=chat, text=ev.text))
                continue
            if not isinstance(ev, Final):
                continue
            job = ev.job
            if job.status != "succeeded":
                err = failure_error(job) if job.status in ("failed", "cancelled", "expired") else ApiError(
                    504, f"job {job_id} is {job.status}; poll GET /v1/jobs/{job_id}", code="timeout")
                yield _sse(error_body(err.status, err.message, err.param, err.code))
                done = True
                break
            result = await run_in_threadpool(state.store.jobs.get_result, tenant_id, job_id)
            reason = finish_reason(result.finish_reason if result is not None else ev.finish_reason)
            if result is not None and result.output_text.startswith(sent) and len(result.output_text) > len(sent):
                # text published before we listened (an idempotent replay) or lost on the way
                yield _sse(chunk(job_id, model, created, chat=chat, text=result.output_text[len(sent):]))
            yield _sse(chunk(job_id, model, created, chat=chat, text=None if chat else "", finish=reason))
            if include_usage:
                usage = await run_in_threadpool(state.store.jobs.get_usage, tenant_id, job_id)
                yield _sse(usage_chunk(job_id, model, created, chat=chat, usage=openai_usage(usage)))
            done = True
        yield b"data: [DONE]\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await follower.close()
            if not done:  # the client went away: stop spending tokens on it
                await cancel_job(state, tenant_id, job_id)


@router.post("/v1/completions", response_model=Completion, summary="Create a completion (OpenAI)",
             responses=responses({200: _STREAM}, *_ERRORS))
async def completions(body: CompletionRequest, request: Request, response: Response, who: Principal = Depends(tenant),
                      state: ApiState = Depends(get_state),
                      idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    """OpenAI's legacy completions: one prompt, one choice; ``stream: true`` streams chunks."""
    stream = bool(body.stream)
    prepared = prepare_completion(body, state.registry, stream=stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _run(request, response, state, who, prepared, chat=False, stream=stream, include_usage=include_usage,
                      priority=body.priority or 0, idempotency_key=idempotency_key)


@router.post("/v1/chat/completions", response_model=ChatCompletion, summary="Create a chat completion (OpenAI)",
             responses=responses({200: _STREAM}, *_ERRORS))
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response, who: Principal = Depends(tenant),
                           state: ApiState = Depends(get_state),
                           idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    """OpenAI's chat completions (text messages, one choice); ``stream: true`` streams chunks."""
    stream = bool(body.stream)
    prepared = prepare_chat(body, state.registry, default_max_tokens=state.config.default_max_tokens, stream=stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _run(request, response, state, who, prepared, chat=True, stream=stream, include_usage=include_usage,
                      priority=body.priority or 0, idempotency_key=idempotency_key)


def _card(state: ApiState, name: str) -> dict[str, Any]:
    m = served_model(state.registry, name)
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "tokenmill",
            "context_length": m.context_length}


@router.get("/v1/models", response_model=ModelList, summary="List served models", responses=responses(AUTH))
def list_models(who: Principal = Depends(authenticate), state: ApiState = Depends(get_state)) -> Any:
    """The models this API serves."""
    return {"object": "list", "data": [_card(state, n) for n in state.registry.names()]}


@router.get("/v1/models/{model}", response_model=ModelCard, summary="Read a served model",
            responses=responses(AUTH, MISSING))
def get_model(model: str, who: Principal = Depends(authenticate), state: ApiState = Depends(get_state)) -> Any:
    """One served model."""
    return _card(state, model)
