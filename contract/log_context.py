"""What a log line is about: the job, tenant and worker a piece of work concerns, carried in a
context variable so that every log call inside it names them (in JSON logs, see
docs/observability.md) without passing them around. Never a prompt or an output: ids only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

FIELDS = ("job_id", "tenant_id", "worker")
_current: ContextVar[dict[str, Any]] = ContextVar("tokenmill_log_fields", default={})


def set_log_fields(**fields: Any) -> None:
    """Adds fields for the rest of the current context (an asyncio task: one HTTP request)."""
    _current.set({**_current.get(), **{k: v for k, v in fields.items() if v is not None}})


@contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Adds fields for the body (a task's run in a worker thread), then restores the earlier ones."""
    token = _current.set({**_current.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _current.reset(token)


def current_log_fields() -> dict[str, Any]:
    """The fields of the current context."""
    return _current.get()


class LogFieldsFilter(logging.Filter):
    """Puts the context's fields, and the process's own (``worker``), on each record."""

    def __init__(self, **process_fields: Any) -> None:
        super().__init__()
        self.process_fields = {k: v for k, v in process_fields.items() if v is not None}

    def filter(self, record: logging.LogRecord) -> bool:
        record.tokenmill = {**self.process_fields, **_current.get()}
        return True
