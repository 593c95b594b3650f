"""Models of the Batches API (OpenAI's shape)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.schemas.common import WebhookState

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class BatchCreate(BaseModel):
    """POST /v1/batches."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="the id of an uploaded file with purpose 'batch'")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,3}h$")] = Field(
        "24h", description="hours, like '24h'")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    webhook_url: str | None = Field(
        None, min_length=1, max_length=2000,
        description="POSTed the batch (signed, Standard Webhooks) once it ends; default: the tenant's")


class BatchError(BaseModel):
    """One problem of the input file."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    """The input file's problems (the batch is then ``failed``)."""

    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    """Requests of the batch by outcome (live while it runs)."""

    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    """Prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """No reasoning tokens here; kept for OpenAI's shape."""

    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """Tokens spent by the batch so far."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class Batch(BaseModel):
    """A batch."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str | None
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: BatchUsage | None = None
    webhook: WebhookState | None = None


class BatchList(BaseModel):
    """The tenant's batches, newest first; ``last_id`` is the ``after`` of the next page."""

    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
