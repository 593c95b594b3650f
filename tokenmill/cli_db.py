"""`tokenmill db`: create and migrate the SQL store.

SQLAlchemy and Alembic are imported inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import typer

from tokenmill.settings import Settings

db_app = typer.Typer(
    name="db",
    help="Create and migrate the SQL store (TOKENMILL_DATABASE_URL; default a SQLite file in the data directory).",
    no_args_is_help=True,
    add_completion=False,
)


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def upgrade_command(
    revision: str = typer.Argument("head", help="Revision to migrate to (default: the newest)."),
) -> None:
    """Create the database or migrate it to the newest schema (safe to run again)."""
    from store.migrate import current, upgrade

    url = Settings.from_env().database_url
    try:
        upgrade(url, revision)
    except ValueError as exc:  # an unsupported URL says what is allowed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - report any connection failure plainly
        typer.echo(
            f"error: could not migrate {_shown(url)}: {exc.__class__.__name__}: {exc}\n"
            "Check TOKENMILL_DATABASE_URL and that the database server is running.",
            err=True,
        )
        raise typer.Exit(1) from None
    typer.echo(f"{_shown(url)} is at revision {current(url)}")


@db_app.command("current")
def current_command() -> None:
    """Show the revision the database is at, and the newest one available."""
    from store.migrate import current, head

    url = Settings.from_env().database_url
    try:
        revision = current(url)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"error: could not read {_shown(url)}: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    from tokenmill.command import tokenmill_command

    newest = head()
    upgrade_hint = f"run `{tokenmill_command()} db upgrade`"
    if revision is None:
        typer.echo(f"{_shown(url)} has no schema yet (newest revision {newest}); {upgrade_hint}")
    elif revision != newest:
        typer.echo(f"{_shown(url)} is at revision {revision}; newest is {newest}: {upgrade_hint}")
    else:
        typer.echo(f"{_shown(url)} is at revision {revision} (up to date)")
