"""Models shared by every area: the error body and the standard error responses for OpenAPI."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field


class ErrorDetail(BaseModel):
    """What went wrong: a message saying what to do, the error type, the field and a code."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the API answers has this shape (as OpenAI's do)."""

    error: ErrorDetail


class DeletedObject(BaseModel):
    """The answer to a delete."""

    id: str
    object: str
    deleted: bool


class WebhookState(BaseModel):
    """Where a job's or batch's completion webhook goes and how its delivery stands: ``pending``
    (not final yet), ``queued``, ``retrying``, ``delivered`` or ``failed`` (gave up after 24 h)."""

    url: str
    status: str | None = None
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    next_attempt_at: datetime | None = None


def _err(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = headers
    return out


_RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}

AUTH = {401: _err("missing, wrong or revoked API key")}
BAD = {400: _err("invalid request: the message and `param` name the field")}
MISSING = {404: _err("no such object for this tenant")}
TOO_LARGE = {413: _err("request body over the size limit")}
MEDIA = {415: _err("wrong Content-Type")}
BUSY = {429: _err("the model's queue is full, or a rate, queue or token budget limit of the tenant or key is "
                  "reached (code says which; a budget answers 402 where the operator chose so); retry after "
                  "Retry-After seconds", _RETRY)}
UNAVAILABLE = {503: _err("database or Redis unavailable; the job, if any, was stored and will run", _RETRY)}
CONFLICT = {409: _err("the object is not in a state that allows this")}
TIMEOUT = {504: _err("the job did not finish within the synchronous wait; poll it with GET /v1/jobs/{id}")}
FORBIDDEN = {403: _err("the admin key is needed")}


def responses(*groups: dict[int, Any]) -> dict[int | str, Any]:
    """Merges the error response groups of one endpoint. Every endpoint may answer 400: a URL
    that holds a NUL character is refused before routing, whatever the endpoint."""
    out: dict[int | str, Any] = dict(BAD)
    for g in groups:
        out.update(g)
    return out


class ListMeta(BaseModel):
    """Pagination fields of a list."""

    object: str = Field("list", description="always 'list'")
    has_more: bool = False
WORKER_FAILED = {502: _err("the job failed on the worker")}


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def _iso_date(value: object) -> object:
    # pydantic would take a number as a Unix time; a query parameter documented as a date must
    # look like one.
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise ValueError("expected a date as YYYY-MM-DD")
    return value


def _iso_datetime(value: object) -> object:
    if isinstance(value, str) and not _ISO_DATETIME.match(value):
        raise ValueError("expected an ISO 8601 date and time, like 2026-11-28T12:00:00Z")
    return value


IsoDate = Annotated[date, BeforeValidator(_iso_date)]
IsoDateTime = Annotated[datetime, BeforeValidator(_iso_datetime)]


def no_nul(value: str | None) -> str | None:
    """A validator for text the store keeps in a text column (PostgreSQL takes no NUL there)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not hold a NUL character")
    return value


def sse_schema(events: list[str] | None = None, description: str = "") -> dict[str, Any]:
    """The OpenAPI content of a server-sent event stream: each event as an object with its name
    (``event``, absent for unnamed events) and its ``data`` (a JSON text, or ``[DONE]``)."""
    event: dict[str, Any] = {"type": "string"}
    if events:
        event["enum"] = events
    return {"text/event-stream": {"schema": {
        "type": "object", "description": description,
        "properties": {"event": event, "data": {"type": "string"}, "id": {"type": "string"},
                       "retry": {"type": "integer"}},
        "required": ["data"]}}}
