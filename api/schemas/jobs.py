"""Models of the async jobs API (/v1/jobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from api.schemas.common import WebhookState, no_nul
from api.schemas.messages import Messages
from api.schemas.sampling import SamplingParams, TokenId

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]


class JobCreate(BaseModel):
    """A generation job: exactly one of ``prompt`` (text or token ids) and ``messages``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="a served model (GET /v1/models)")
    prompt: Annotated[str, Field(min_length=1, max_length=10_000_000)] | TokenIds | None = None
    messages: Messages | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    priority: StrictInt = Field(0, ge=0, le=9, description="inside the engine, lower runs first")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200,
        description="the same key from the same tenant returns the job created first (also the Idempotency-Key header)",
    )
    deadline: AwareDatetime | None = Field(None, description="past this time the job is expired instead of run")
    timeout_s: float | None = Field(None, gt=0, le=30 * 86400, description="deadline as seconds from now")
    stream: bool = Field(False, description="publish the text as it is generated (GET /v1/jobs/{id}/events)")
    webhook_url: str | None = Field(
        None, min_length=1, max_length=2000,
        description="POSTed the job (signed, Standard Webhooks) once it is final; default: the tenant's")

    _storable_key = field_validator("idempotency_key")(no_nul)

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.deadline is not None and self.timeout_s is not None:
            raise ValueError("give at most one of deadline and timeout_s")
        return self


class JobUsage(BaseModel):
    """Tokens the job spent."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    total_tokens: int


class JobTimings(BaseModel):
    """Milliseconds: in the queue, to the first token, and from start to finish."""

    queue_ms: float
    ttft_ms: float
    total_ms: float


class JobChoice(BaseModel):
    """One of the n completions of a job (params.n > 1)."""

    index: int
    text: str
    finish_reason: str
    token_ids: list[int] | None = None
    logprobs: list[Any] | None = None


class JobResult(BaseModel):
    """The output of a succeeded job: its first completion, and with params.n > 1 every one in
    ``choices`` (each with its own finish reason and logprobs)."""

    output_text: str
    finish_reason: str
    token_ids: list[int] | None = None
    logprobs: list[Any] | None = None
    choices: list[JobChoice] | None = None


class JobError(BaseModel):
    """Why a job failed, expired or was cancelled."""

    code: str
    message: str


class JobSummary(BaseModel):
    """A job without its output (what lists return)."""

    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    kind: Literal["interactive", "bulk"]
    priority: int
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    idempotency_key: str | None = None
    error: JobError | None = None


class Job(JobSummary):
    """A job with its request, and once finished its result, usage and timings."""

    request: dict[str, Any]
    result: JobResult | None = None
    usage: JobUsage | None = None
    timings: JobTimings | None = None
    webhook: WebhookState | None = None


class JobList(BaseModel):
    """A page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    object: Literal["list"] = "list"
    data: list[JobSummary]
    has_more: bool
    next_cursor: str | None = None
