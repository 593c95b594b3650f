"""`tokenmill generate` reads the same settings as every other command (TOKENMILL_MODEL,
TOKENMILL_CACHE_DIR / XDG_CACHE_HOME), writes its results in input order, and places a JSON error
at the end of a line where it is."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from tokenmill.cli import app


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str | None]:
    """No TOKENMILL_* setting from the calling shell; HOME an empty directory, so a command that
    ignored the settings would convert the built-in model under it (and be seen doing so)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TOKENMILL_") or k == "XDG_CACHE_HOME"}
    env.update({"HOME": str(tmp_path / "home"), **extra})
    return env


def test_generate_takes_the_model_and_its_cache_from_the_settings(tmp_path: Path, smollm2_dir: Path) -> None:
    # The built-in model already converted in the cache XDG_CACHE_HOME names: generate uses it.
    cached = tmp_path / "xdg" / "tokenmill" / "models" / "smollm2-135m-instruct"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(smollm2_dir)
    src = tmp_path / "in.jsonl"
    names = ["zeta", "alpha", "mid", "beta"]
    src.write_text("".join(json.dumps({"id": n, "prompt": f"Say {n}.", "max_tokens": 2 + 3 * i, "temperature": 0})
                           + "\n" for i, n in enumerate(names)))
    out = tmp_path / "results" / "out.jsonl"  # a folder that does not exist yet
    result = CliRunner().invoke(app, ["generate", str(src), "-o", str(out), "--no-progress"],
                                env=_clean_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg")))
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == names and [r["line"] for r in rows] == [1, 2, 3, 4]
    assert all(r["completion_tokens"] >= 1 for r in rows)
    assert not (tmp_path / "home" / ".cache").exists()

    # TOKENMILL_MODEL names the model when --model does not.
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(app, ["generate", str(src), "-o", str(out), "--no-progress"],
                                env=_clean_env(tmp_path, TOKENMILL_MODEL=str(missing),
                                               TOKENMILL_CACHE_DIR=str(tmp_path / "cache")))
    assert result.exit_code == 2 and str(missing) in result.output, result.output


def test_a_json_error_at_the_end_of_a_line_names_that_column(tmp_path: Path, tiny_model_dir) -> None:
    unfinished = '{"prompt": "hi", "max_tokens": 2'
    src = tmp_path / "in.jsonl"
    src.write_text(unfinished + "\n")
    out = tmp_path / "out.jsonl"
    CliRunner().invoke(app, ["generate", str(src), "-o", str(out), "--model", str(tiny_model_dir("llama")),
                             "--no-progress"])
    [row] = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["error"].endswith(f"(column {len(unfinished) + 1})"), row
