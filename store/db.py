"""Engine and session factory: one engine per database URL, short transactions, retried writes.

SQLite gets WAL mode, foreign keys, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions
(so two writers queue on the lock instead of failing when one upgrades from read to write).
PostgreSQL goes through psycopg 3; deadlocks and serialization failures are retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "tokenmill_write"
# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
_RETRY_SQLSTATES = {"40001", "40P01"}


def normalize_url(url: str | URL) -> URL:
    """Parses a database URL; any ``postgresql`` URL is pointed at psycopg 3 (the driver installed).

    Raises ValueError for a backend other than SQLite or PostgreSQL.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend != "sqlite":
        raise ValueError(
            f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
            "use sqlite:///path/to/file.db or postgresql+psycopg://user@host/dbname"
        )
    return parsed


def make_engine(url: str | URL, **kwargs: object) -> Engine:
    """Creates an engine for ``url`` with tokenmill's connection settings.

    For a SQLite file, the parent directory is created if missing.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def _sqlite_engine(url: URL, **kwargs: object) -> Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = dict(kwargs.pop("connect_args", {}) or {})  # type: ignore[arg-type]
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Take transaction control away from the sqlite3 module; "begin" below emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _retryable(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRY_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


class Database:
    """An engine plus session scopes. Reads and writes are short transactions of their own.

    ``write`` transactions are retried (a fresh transaction each time) when the backend reports a
    deadlock, a serialization failure or a locked SQLite file, so callers never see those.
    """

    def __init__(self, url: str | URL, *, engine: Engine | None = None, **engine_kwargs: object) -> None:
        self.url = normalize_url(url)
        self.engine = engine if engine is not None else make_engine(self.url, **engine_kwargs)
        self.dialect = self.engine.dialect.name
        self._read_factory = sessionmaker(self.engine, expire_on_commit=False)
        self._write_factory = sessionmaker(
            self.engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; its transaction is rolled back at the end."""
        with self._read_factory() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction is committed at the end (rolled back on error). No retry."""
        with self._write_factory() as session, session.begin():
            yield session

    def transact(self, work: Callable[[Session], T], *, attempts: int = 8) -> T:
        """Runs ``work(session)`` in a write transaction, retrying it on deadlock or lock timeout."""
        for attempt in range(attempts):
            try:
                with self.write() as session:
                    return work(session)
            except DBAPIError as exc:
                if attempt == attempts - 1 or not _retryable(exc):
                    raise
                time.sleep(min(0.5, 0.01 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        """Closes every pooled connection."""
        self.engine.dispose()
