"""The `tokenmill` command. Each command group lives in its own module and imports its heavy
dependencies (torch, SQLAlchemy, Celery) only when a command of it runs."""

from __future__ import annotations

import typer

from tokenmill.cli_db import db_app
from tokenmill.cli_generate import generate_command
from tokenmill.cli_worker import worker_command

app = typer.Typer(
    name="tokenmill",
    help="tokenmill: LLM generation jobs on your own GPUs (or CPU).",
    no_args_is_help=True,
    add_completion=False,
)
app.command("generate")(generate_command)
app.command("worker")(worker_command)
app.add_typer(db_app, name="db")


@app.callback()
def _root() -> None:
    """tokenmill: LLM generation jobs on your own GPUs (or CPU)."""


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
