"""The `tokenmill` command. Each command group lives in its own module and imports its heavy
dependencies (torch, SQLAlchemy, Celery) only when a command of it runs."""

from __future__ import annotations

import typer

from tokenmill.cli_generate import generate_command

app = typer.Typer(
    name="tokenmill",
    help="tokenmill: LLM generation jobs on your own GPUs (or CPU).",
    no_args_is_help=True,
    add_completion=False,
)
app.command("generate")(generate_command)



def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
