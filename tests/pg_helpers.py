"""A throwaway PostgreSQL database for integration tests (shared by the worker and API tests), on
the session's server (the ``postgres_admin_url`` fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def migrated_postgres(admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database `<prefix>_<random>` on the server of ``admin_url``, migrated to
    head, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from store.migrate import upgrade

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
