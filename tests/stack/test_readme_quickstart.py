"""The README's quick start, run exactly as written, in a fresh copy of the repository (so a fresh
`.venv`, installed by `scripts/install.sh`), with a fresh data directory and model cache: the
first job must succeed. Expensive (it installs everything, torch from the local wheel included)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stack_helpers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MARKER = "<!-- quickstart:"
ANSWER_MARKER = "<!-- quickstart-answer:"


def quickstart_commands(readme: str) -> str:
    """The bash block right after the quick-start marker in the README."""
    at = readme.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", readme[at:], re.S)
    assert block, "no bash block after the quick-start marker"
    return block.group(1)


def quickstart_answer(readme: str) -> str:
    """The answer the README shows for the quick start's job (the text block after its marker)."""
    at = readme.index(ANSWER_MARKER)
    block = re.search(r"```text\n(.*?)```", readme[at:], re.S)
    assert block, "no text block after the quick-start answer marker"
    return block.group(1).strip()


def copy_worktree(dest: Path) -> None:
    """The files a fresh clone would have, plus work not yet committed (untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def test_readme_quickstart_runs_a_first_job_in_a_fresh_environment(tmp_path: Path):
    readme = (REPO / "README.md").read_text()
    commands = quickstart_commands(readme)
    assert "tokenmill up" in commands and "tokenmill submit" in commands
    checkout = tmp_path / "tokenmill"
    copy_worktree(checkout)
    assert not (checkout / ".venv").exists()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOKENMILL_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p)
    # Fresh state for a new user; ports of our own so nothing else on this machine is in the way.
    env.update({"TOKENMILL_DATA_DIR": str(tmp_path / "data"), "TOKENMILL_CACHE_DIR": str(tmp_path / "cache"),
                "TOKENMILL_API_PORT": str(free_port()), "TOKENMILL_FLOWER_PORT": str(free_port())})
    try:
        run = subprocess.run(["bash", "-c", "set -e\n" + commands], cwd=checkout, env=env, capture_output=True,
                             text=True, timeout=2100)
        assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
        assert "tokenmill is up" in run.stdout
        # The hints name the command that works in this shell (no environment activated).
        assert "stop it with: .venv/bin/tokenmill down" in run.stdout, run.stdout
        assert "source .venv/bin/activate" in run.stdout, run.stdout
        answer = run.stdout.split("source .venv/bin/activate)", 1)[-1].strip()
        assert answer == quickstart_answer(readme), run.stdout
        assert " succeeded · " in run.stderr and "completion tokens" in run.stderr, run.stderr
    finally:
        down = subprocess.run([str(checkout / ".venv/bin/tokenmill"), "down"], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=300) if (checkout / ".venv/bin/tokenmill").exists() else None
    assert down is not None and down.returncode == 0, down and down.stderr
