"""A throwaway PostgreSQL database for integration tests (shared by the worker and API tests)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PG_ADMIN = os.environ.get("TOKENMILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextmanager
def migrated_postgres(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database `<prefix>_<random>`, migrated to head, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from store.migrate import upgrade

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
