"""Plain data passed into and out of the store (dataclasses, no SQL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from store.models import Job


@dataclass(frozen=True)
class JobSpec:
    """A job to create. ``request`` is the validated request body (prompt or messages, sampling).

    ``idempotency_key``: the same key from the same tenant returns the job created first.
    ``id`` may be given (e.g. to reuse a Celery task id); otherwise the store makes one.
    ``error`` (code, message): the job is created ``failed`` with that error and never runs (a
    batch line whose request was refused: it is counted with the batch's other requests).
    """

    model: str
    request: dict[str, Any]
    kind: str = "interactive"
    priority: int = 0
    api_key_id: str | None = None
    idempotency_key: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    expires_at: datetime | None = None
    id: str | None = None
    error: tuple[str, str] | None = None
    reserved_tokens: int | None = None
    webhook_url: str | None = None  # already checked; the job is POSTed there once it is final


@dataclass(frozen=True)
class Settlement:
    """A finished job whose token reservation is to be settled: what it held and what it spent
    (prompt plus completion tokens of its usage row; 0 when it produced no output)."""

    job_id: str
    tenant_id: str
    reserved_tokens: int
    spent_tokens: int
    finished_at: datetime


@dataclass(frozen=True)
class CreatedJob:
    """The outcome of creating one job: its id, and False when an idempotency key matched an old job."""

    id: str
    created: bool


@dataclass(frozen=True)
class JobClaim:
    """What a worker needs to run a job it has just marked running."""

    id: str
    tenant_id: str
    api_key_id: str | None
    model: str
    kind: str
    priority: int
    request: dict[str, Any]
    attempts: int
    created_at: datetime | None = None
    expires_at: datetime | None = None  # the job's deadline: past it, the worker stops it as expired
    tenant_weight: float = 1.0  # the tenant's fair-share weight (the engine shares by it)


@dataclass(frozen=True)
class OpenJob:
    """A job that has waited or run for a while, as the reconciler sees it: enough to tell whether
    its task is still in Redis and to send it again (``worker``, ``worker_instance``: who claimed
    it, when running)."""

    id: str
    model: str
    kind: str
    status: str
    worker: str | None
    worker_instance: str | None = None


@dataclass(frozen=True)
class FinishedJob:
    """A finished generation with its token accounting, as a worker reports it.

    Times are milliseconds: ``queue_ms`` from creation to start, ``ttft_ms`` to the first token,
    ``total_ms`` from start to finish.
    """

    job_id: str
    output_text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    worker: str = ""
    device: str = ""
    token_ids: list[int] | None = None
    logprobs: list[Any] | None = None
    expired: bool = False  # stopped at its deadline: status ``expired`` (result and usage kept)
    # n > 1: every completion as {"index", "text", "finish_reason", "token_ids", "logprobs"} (the
    # fields above are the first one's; the token counts are the job's, every completion's)
    choices: list[dict[str, Any]] | None = None
    # The worker process that ran it: when given, the result is recorded only while the job is
    # still claimed by that instance (a worker presumed dead, whose jobs were taken over, writes
    # nothing: docs/reliability.md, fencing). None: recorded whoever holds the job.
    worker_instance: str | None = None


@dataclass(frozen=True)
class RecordOutcome:
    """Which finished jobs were recorded now, which already had a result, which do not exist."""

    recorded: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    fenced: list[str] = field(default_factory=list)  # no longer claimed by the writer's instance


@dataclass(frozen=True)
class JobFailure:
    """A job that failed: a short machine-readable code and a message for the user."""

    job_id: str
    code: str
    message: str


@dataclass(frozen=True)
class JobPage:
    """One page of a job listing; pass ``next_cursor`` back to get the next (None: no more)."""

    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class UsageBucket:
    """Token totals for one group (the group fields not asked for are None)."""

    model: str | None
    api_key_id: str | None
    day: date | None
    hour: int | None
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    tenant_id: str | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class BatchCounts:
    """Request counts of a batch. ``failed`` includes expired requests; ``pending`` is queued or running."""

    total: int
    completed: int
    failed: int
    cancelled: int
    pending: int
