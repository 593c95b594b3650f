"""Alembic migrations and the `tokenmill db` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import URL
from typer.testing import CliRunner

from store import JobSpec, Store
from store.migrate import current, differences, downgrade, head, upgrade
from tokenmill.cli_db import db_app


def test_migrations_and_models_agree(db_url: URL) -> None:
    assert current(db_url) is None
    upgrade(db_url)
    assert current(db_url) == head() == "0004"
    assert differences(db_url) == [], "models and migrations disagree: add a migration"


def test_downgrade_and_upgrade_round_trip(db_url: URL) -> None:
    upgrade(db_url)
    downgrade(db_url, "base")
    assert current(db_url) is None
    upgrade(db_url)
    store = Store.open(db_url)
    try:
        tenant = store.keys.create_tenant("t").id
        assert store.jobs.create_job(tenant, JobSpec(model="m", request={})).created
    finally:
        store.close()


def test_cli_upgrade_then_current(db_url: URL) -> None:
    runner = CliRunner()
    env = {"TOKENMILL_DATABASE_URL": db_url.render_as_string(hide_password=False)}
    before = runner.invoke(db_app, ["current"], env=env)
    assert before.exit_code == 0 and "no schema yet" in before.output
    result = runner.invoke(db_app, ["upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert "at revision 0004" in result.output
    again = runner.invoke(db_app, ["upgrade"], env=env)  # safe to run twice
    assert again.exit_code == 0
    now = runner.invoke(db_app, ["current"], env=env)
    assert now.exit_code == 0 and "0004 (up to date)" in now.output


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cli_default_database_lives_in_the_data_dir(tmp_path: Path, backend: str) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    env = {"TOKENMILL_DATABASE_URL": None, "TOKENMILL_DATA_DIR": str(data_dir)}
    result = CliRunner().invoke(db_app, ["upgrade"], env=env)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert (data_dir / "tokenmill.db").is_file()
    assert current(f"sqlite:///{data_dir / 'tokenmill.db'}") == "0004"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cli_explains_an_unsupported_url(backend: str) -> None:
    result = CliRunner().invoke(db_app, ["upgrade"], env={"TOKENMILL_DATABASE_URL": "mysql://db/x"})
    assert result.exit_code == 2
    assert "unsupported database URL" in result.output and "postgresql+psycopg://" in result.output
