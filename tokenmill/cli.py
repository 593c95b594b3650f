"""The `tokenmill` command. Each command group lives in its own module and imports its heavy
dependencies (torch, SQLAlchemy, Celery) only when a command of it runs."""

from __future__ import annotations

import typer

from tokenmill.cli_db import db_app
from tokenmill.cli_fetch import fetch_command
from tokenmill.cli_generate import generate_command
from tokenmill.cli_worker import worker_command
from tokenmill.cli_api import api_command
from tokenmill.cli_keys import keys_app
from tokenmill.cli_tenants import tenants_app
from tokenmill.cli_purge import purge_command
from tokenmill.cli_up import down_command, up_command
from tokenmill.cli_flower import flower_command
from tokenmill.cli_batch import batch_app
from tokenmill.cli_jobs import jobs_app
from tokenmill.cli_submit import submit_command
from tokenmill.cli_usage import usage_command

app = typer.Typer(
    name="tokenmill",
    help="tokenmill: LLM generation jobs on your own GPUs (or CPU).",
    no_args_is_help=True,
    add_completion=False,
    # Help texts are plain text: as Rich markup, "[default: TOKENMILL_MODEL]" would be read as a
    # style tag and vanish, leaving "Model directory or built-in name ." behind.
    rich_markup_mode=None,
)
app.command("fetch")(fetch_command)
app.command("generate")(generate_command)
app.command("worker")(worker_command)
app.command("api")(api_command)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.command("purge")(purge_command)
app.add_typer(db_app, name="db")
app.command("up")(up_command)
app.command("down")(down_command)
app.command("flower")(flower_command)
app.command("submit")(submit_command)
app.add_typer(jobs_app, name="jobs")
app.add_typer(batch_app, name="batch")
app.command("usage")(usage_command)


@app.callback()
def _root() -> None:
    """tokenmill: LLM generation jobs on your own GPUs (or CPU)."""


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
