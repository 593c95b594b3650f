"""Fixtures for whole-stack tests (helpers in stack_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stack_helpers import UpStack


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator:
    """Makes `UpStack`s in this test's tmp dir and stops any still running at the end."""
    made: list[UpStack] = []

    def make(name: str = "up", data_dir: Path | None = None, **kwargs: object) -> UpStack:
        stack = UpStack(data_dir or tmp_path / "data", tmp_path / f"{name}.log", **kwargs)  # type: ignore[arg-type]
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.kill()
