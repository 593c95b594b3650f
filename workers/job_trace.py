"""A traced job's spans in the worker, under the context its task carried (`contract.tracing`):

    tokenmill.submit (API)
    └─ tokenmill.enqueue (API: the store write and the send to Redis)
       ├─ tokenmill.queue         the send to the task starting here (Redis and delivery)
       └─ tokenmill.run           the task in this worker, to its results stored
          ├─ tokenmill.claim      the claim transaction
          ├─ tokenmill.engine     engine admission to the last token
          │  └─ tokenmill.first_token   engine admission to the first token
          └─ tokenmill.result_write     the result handed to the writer, to stored

Only tasks that carry a trace context make spans (interactive jobs submitted while the API
traces); a bulk task makes none, rather than a root trace per batch chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from contract import tracing
from workers.metrics import JobTimes

_HEADERS = ("traceparent", "tracestate")


def trace_headers(request: Any) -> dict[str, str] | None:
    """The W3C trace headers of a Celery task request, if it carries any."""
    extra = getattr(request, "headers", None) or {}
    out = {h: v for h in _HEADERS if (v := getattr(request, h, None) or extra.get(h))}
    return out if "traceparent" in out else None


@contextmanager
def job_trace(trace: dict[str, str] | None, job_ids: list[str], enqueued_at: float, worker: str) -> Iterator[None]:
    """The task's run span (current for the body), and the queue span before it."""
    if trace is None or not tracing.enabled():
        yield
        return
    now = time.time()
    attributes = {"tokenmill.job_id": job_ids[0], "tokenmill.jobs": len(job_ids), "tokenmill.worker": worker}
    tracing.end(tracing.start_span("tokenmill.queue", trace, start_s=min(enqueued_at, now), attributes=attributes),
                now)
    run = tracing.start_span("tokenmill.run", trace, kind=tracing.SpanKind.CONSUMER, start_s=now,
                             attributes=attributes)
    with tracing.current(run):
        yield


def trace_engine(t: JobTimes) -> None:
    """The job's time in the engine, from admission, with the first token (when traced)."""
    engine = tracing.past_span("tokenmill.engine", t.admitted_at, t.finished_at,
                               **{"tokenmill.prompt_tokens": t.prompt_tokens,
                                  "tokenmill.completion_tokens": t.completion_tokens})
    if engine is not None and t.first_token_at is not None:
        tracing.past_span("tokenmill.first_token", t.admitted_at, t.first_token_at, parent=engine)


def trace_write(handed_at: float) -> None:
    """The result's write, from its hand-over to the writer to now (stored; when traced)."""
    tracing.past_span("tokenmill.result_write", handed_at, time.time())
