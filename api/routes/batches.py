"""/v1/batches: OpenAI's Batch API over bulk jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from api.auth import Principal, tenant
from api.errors import ApiError
from api.formats import unix, webhook_view
from api.routes.jobs import checked_webhook
from api.schemas.batches import Batch, BatchCreate, BatchList
from api.schemas.common import AUTH, BAD, MEDIA, MISSING, TOO_LARGE, UNAVAILABLE, responses
from api.state import ApiState, get_state
from store import Store
from store.errors import NotFound

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def batch_object(state: ApiState, b: Any) -> dict[str, Any]:
    """A stored batch in OpenAI's shape, with live request counts, token usage and webhook state."""
    out = batch_json(state.store, b)
    if b.webhook_url:
        out["webhook"] = webhook_view(state.store.webhooks.delivery_of(b.tenant_id, batch_id=b.id), b.webhook_url,
                                      b.webhook_status)
    return out


def batch_json(store: Store, b: Any) -> dict[str, Any]:
    """A stored batch in OpenAI's shape, with live request counts and token usage."""
    counts = store.batches.counts(b.tenant_id, b.id)
    prompt, cached, completion = store.batches.token_totals(b.tenant_id, b.id)
    errors = None
    if b.errors:
        errors = {"object": "list", "data": [{"code": e.get("code"), "message": e.get("message"), "param": None,
                                              "line": e.get("line")} for e in b.errors]}
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": errors, "input_file_id": b.input_file_id,
        "completion_window": b.completion_window, "status": b.status, "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id, "created_at": unix(b.created_at), "in_progress_at": unix(b.in_progress_at),
        "expires_at": unix(b.expires_at), "finalizing_at": unix(b.finalizing_at), "completed_at": unix(b.completed_at),
        "failed_at": unix(b.failed_at), "expired_at": unix(b.expired_at), "cancelling_at": unix(b.cancelling_at),
        "cancelled_at": unix(b.cancelled_at),
        "request_counts": {"total": counts.total if counts else b.total,
                           "completed": counts.completed if counts else b.completed,
                           "failed": counts.failed if counts else b.failed},
        "metadata": b.metadata_,
        "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                  "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": prompt + completion},
        "webhook": webhook_view(None, b.webhook_url, b.webhook_status),
    }


@router.post("", response_model=Batch, summary="Create a batch",
             responses=responses(BAD, AUTH, MISSING, TOO_LARGE, MEDIA, UNAVAILABLE))
def create_batch(body: BatchCreate, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """Creates a batch over an uploaded ``batch`` file. It answers at once (``validating``); the
    file is ingested into jobs in the background and the batch moves to ``in_progress`` (or to
    ``failed``, with per-line ``errors``)."""
    assert who.tenant_id is not None
    webhook_url = checked_webhook(state, body.webhook_url, who)
    try:
        batch = state.store.batches.create(who.tenant_id, input_file_id=body.input_file_id, endpoint=body.endpoint,
                                           completion_window=body.completion_window, metadata=body.metadata,
                                           api_key_id=who.key_id, webhook_url=webhook_url)
    except NotFound as exc:
        raise ApiError(404, str(exc), param="input_file_id", code="file_not_found") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param="input_file_id", code="invalid_value") from None
    state.batches.schedule_ingest(who.tenant_id, batch.id)
    return batch_object(state, batch)


@router.get("/{batch_id}", response_model=Batch, summary="Read a batch", responses=responses(AUTH, MISSING))
def get_batch(batch_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """The batch with live counts; reading it also moves it along (e.g. to ``finalizing``)."""
    assert who.tenant_id is not None
    batch = state.batches.refresh(who.tenant_id, batch_id)
    if batch is None:
        raise ApiError(404, f"no batch {batch_id!r}", code="batch_not_found")
    return batch_object(state, batch)


@router.get("", response_model=BatchList, summary="List batches", responses=responses(BAD, AUTH, MISSING))
def list_batches(who: Principal = Depends(tenant), state: ApiState = Depends(get_state),
                 after: Annotated[str | None, Query(max_length=64)] = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
    """The tenant's batches, newest first; pass the last id as ``after`` for the next page."""
    assert who.tenant_id is not None
    try:
        batches = state.store.batches.list_batches(who.tenant_id, limit=limit + 1, after=after)
    except NotFound:
        raise ApiError(404, f"no batch {after!r} to list after", param="after", code="batch_not_found") from None
    page = batches[:limit]
    return {"object": "list", "data": [batch_object(state, b) for b in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(batches) > limit}


@router.post("/{batch_id}/cancel", response_model=Batch, summary="Cancel a batch", responses=responses(AUTH, MISSING))
def cancel_batch(batch_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """Cancels the batch: requests not yet started are cancelled, running ones finish and are kept;
    the batch is ``cancelling`` until none runs, then ``cancelled`` with what ran in its output file."""
    assert who.tenant_id is not None
    try:
        batch = state.store.batches.cancel(who.tenant_id, batch_id)
    except NotFound:
        raise ApiError(404, f"no batch {batch_id!r}", code="batch_not_found") from None
    if state.batches.needs_files(batch):
        state.batches.schedule_finalize(who.tenant_id, batch_id)
    return batch_object(state, batch)
