"""Fixtures for the store tests: every test runs once on SQLite and once on PostgreSQL.

PostgreSQL: one throwaway database per test session (``tokenmill_test_<random>``) and one schema
per test, dropped afterwards, on the session's server (the ``postgres_admin_url`` fixture: a cluster
of the session's own unless ``TOKENMILL_TEST_POSTGRES_URL`` names one).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from store import Store

def _autocommit_engine(url: URL | str):  # type: ignore[no-untyped-def]
    return create_engine(
        make_url(url).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
    )


@pytest.fixture(scope="session")
def pg_database(postgres_admin_url: str) -> Iterator[URL]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    admin = _autocommit_engine(postgres_admin_url)
    name = f"tokenmill_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_admin_url).set(drivername="postgresql+psycopg", database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend of this run of the test."""
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path, request: pytest.FixtureRequest) -> Iterator[URL]:  # type: ignore[no-untyped-def]
    """An empty database: a SQLite file, or a PostgreSQL schema of its own (dropped afterwards)."""
    if backend == "sqlite":
        yield make_url(f"sqlite:///{tmp_path / 'store.db'}")
        return
    database: URL = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _autocommit_engine(database)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield database.update_query_dict({"options": f"-csearch_path={schema}"})
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(db_url: URL) -> Iterator[Store]:
    """A store over an empty database with every table created."""
    s = Store.open(db_url)
    s.create_all()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def tenant_id(store: Store) -> str:
    """A tenant named 'acme'."""
    return store.keys.create_tenant("acme").id


@pytest.fixture
def other_tenant_id(store: Store) -> str:
    """A second tenant, 'globex', who must never see acme's rows."""
    return store.keys.create_tenant("globex").id
