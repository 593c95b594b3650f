"""Alembic, configured in code: the migration scripts live in the ``migrations`` package, so
``tokenmill db upgrade`` works from any directory and from an installed package (no alembic.ini)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL


def migrations_dir() -> Path:
    """The directory of the ``migrations`` package (Alembic's script location)."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'migrations' package is not installed next to 'store'; reinstall tokenmill")
    return Path(next(iter(spec.submodule_search_locations)))


def alembic_config(url: str | URL) -> Any:
    """An Alembic ``Config`` for ``url`` (the URL travels as an attribute, never through an ini file)."""
    from alembic.config import Config

    from store.db import normalize_url

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["url"] = normalize_url(url)
    return config


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrates the database at ``url`` up to ``revision`` (creating it all on a fresh database)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrates the database at ``url`` down to ``revision`` (``base`` drops everything)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at, or None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    from store.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    """The newest revision among the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def differences(url: str | URL) -> list[Any]:
    """What autogenerate finds between the models and the database at ``url`` (empty: they agree)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from store.db import make_engine
    from store.models import Base

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()
