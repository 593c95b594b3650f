"""Small helpers shared by the query modules: ids, clock, dialect-specific insert."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import ColumnElement, Select, Table, any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

if TYPE_CHECKING:
    from store.db import Database

T = TypeVar("T")


def new_id(prefix: str) -> str:
    """A fresh random id such as ``job_3f2a...`` (prefix, then 32 hex digits)."""
    return prefix + uuid.uuid4().hex


def batch_job_id(batch_id: str, line: int) -> str:
    """The id of the job of input line ``line`` of a batch: ``job_``, 16 hex digits of the batch's
    id, the line number (8 hex digits), 8 random hex digits. The ids of one batch sort in the
    order of its input lines, so everything read in id order (the output and error files, the
    tasks sent) follows the input file; users diff those files."""
    return f"job_{batch_id.removeprefix('batch_')[:16]}{line:08x}{uuid.uuid4().hex[:8]}"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def insert_ignoring(dialect: str, table: Table, conflict_columns: Sequence[str]) -> Insert:
    """``INSERT ... ON CONFLICT (conflict_columns) DO NOTHING`` for SQLite and PostgreSQL.

    Conflicts on any other unique constraint still raise.
    """
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing(index_elements=list(conflict_columns))


def among(column: ColumnElement[Any], values: Sequence[Any], dialect: str) -> ColumnElement[bool]:
    """``column IN values``. On PostgreSQL it is ``column = ANY(:array)``: one parameter instead
    of thousands, and the server hashes the array, so a scan never compares each row to each value."""
    if dialect == "postgresql":
        array = bindparam(None, list(values), type_=postgresql.ARRAY(column.type))
        return column == any_(array)
    return column.in_(list(values))


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Yields lists of at most ``size`` items."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def paged_ids(db: "Database", page_after: Callable[[str], Select], page_size: int) -> Iterator[str]:
    """Ids in id order, one read a page: ``page_after(last)`` selects at most ``page_size`` ids
    greater than ``last`` (keyset pagination, so rows added or changed meanwhile never shift it)."""
    last = ""
    while True:
        with db.read() as s:
            ids = list(s.scalars(page_after(last)))
        yield from ids
        if len(ids) < page_size:
            return
        last = ids[-1]
