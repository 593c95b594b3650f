"""tokenmill's SQL store: the one place that knows table shapes.

Open it with :class:`Store` (``Store.open(url)``); its parts are grouped by what they hold:
``store.tenants`` (tenants and API keys), ``store.jobs`` (jobs and results), ``store.usage``
(token accounting and aggregates), ``store.files`` and ``store.batches`` (the OpenAI-style
Files and Batches APIs). Every read that a client can trigger takes the tenant, so one tenant
never sees another's rows. Nothing here imports torch, Celery or FastAPI.
"""

from store.errors import Conflict, InvalidTransition, NotFound, StoreError
from store.facade import Store
from store.sql import batch_job_id
from store.types import (
    BatchCounts,
    FinishedJob,
    JobFailure,
    JobPage,
    JobSpec,
    RecordOutcome,
    UsageBucket,
)

__all__ = [
    "BatchCounts",
    "Conflict",
    "batch_job_id",
    "FinishedJob",
    "InvalidTransition",
    "JobFailure",
    "JobPage",
    "JobSpec",
    "NotFound",
    "RecordOutcome",
    "Store",
    "StoreError",
    "UsageBucket",
]
