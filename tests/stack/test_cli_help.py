"""Every command's --help reads whole: what a help text says in brackets ("[default: TOKENMILL_MODEL]")
is shown, not swallowed as a style tag leaving a dangling " ." behind."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.testing import CliRunner

from tokenmill.cli import app


def _command_paths(group: Any, prefix: list[str]) -> list[list[str]]:
    paths = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group of commands
            paths += _command_paths(command, [*prefix, name])
        else:
            paths.append([*prefix, name])
    return paths


def test_every_help_text_keeps_its_bracketed_defaults() -> None:
    root = typer.main.get_command(app)
    paths = _command_paths(root, [])
    assert ["submit"] in paths and ["batch", "submit"] in paths and ["up"] in paths
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        dangling = [line for line in result.output.splitlines() if re.search(r"\s\.(\s|$)", line)]
        assert not dangling, (path, dangling)
    submit = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output
    assert "[default: the local stack's]" in submit and "[default: TOKENMILL_API_URL" in submit
