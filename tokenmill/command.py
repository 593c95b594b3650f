"""How the person at the terminal runs tokenmill, for the hints the commands print ("stop it with:
... down"). A hint that names a bare `tokenmill` gives "command not found" when the environment it
was installed in is not activated, which is how the README's commands run it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def tokenmill_command() -> str:
    """`tokenmill` when that name on PATH is this installation's; else the path of this
    installation's script, relative to the working directory when it lies under it (as
    `.venv/bin/tokenmill`), absolute otherwise."""
    script = Path(sys.executable).parent / "tokenmill"
    if not script.exists():  # not an installed environment (e.g. a source tree's python -m)
        return "tokenmill"
    on_path = shutil.which("tokenmill")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "tokenmill"
    return _shown(script)


def activation_hint() -> str | None:
    """One line telling how to type just `tokenmill`, or None when that already works."""
    if tokenmill_command() == "tokenmill":
        return None
    activate = Path(sys.executable).parent / "activate"
    if not activate.exists():
        return None
    return f"to type just `tokenmill`, activate its environment in your shell: source {_shown(activate)}"


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)
