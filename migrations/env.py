"""Alembic environment: runs the migrations over ``store.models`` for the URL that
``store.migrate`` passes in (or ``sqlalchemy.url`` if Alembic is driven by an ini file)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from store.db import make_engine
from store.models import Base

config = context.config
target_metadata = Base.metadata


def _url():  # type: ignore[no-untyped-def]
    return config.attributes.get("url") or config.get_main_option("sqlalchemy.url")


def _configure(**kwargs) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=True,  # SQLite alters tables by copying them; PostgreSQL ignores this
        **kwargs,
    )


def run_offline() -> None:
    """Writes the SQL instead of running it (``alembic upgrade --sql``)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Runs the migrations on a live connection (one passed in, or a fresh engine)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
