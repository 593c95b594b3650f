"""Settings, read once at the edge from `TOKENMILL_*` environment variables, passed down as plain
objects. No other module reads the environment (except the CUDA pinning done before torch loads)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping


def _home_dir(env: Mapping[str, str], xdg_var: str, fallback: str) -> Path:
    base = env.get(xdg_var) or str(Path(env.get("HOME", str(Path.home()))) / fallback)
    return Path(base) / "tokenmill"


@dataclass(frozen=True)
class Settings:
    """Every setting of tokenmill. Each field is read from `TOKENMILL_<FIELD NAME IN CAPITALS>`."""

    data_dir: Path
    cache_dir: Path
    database_url: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    model: str = "smollm2-135m-instruct"

    @property
    def model_cache_dir(self) -> Path:
        """Where built-in models are converted to safetensors directories."""
        return self.cache_dir / "models"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Builds the settings from the environment (or the given mapping)."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("TOKENMILL_DATA_DIR") or _home_dir(env, "XDG_DATA_HOME", ".local/share"))
        cache_dir = Path(env.get("TOKENMILL_CACHE_DIR") or _home_dir(env, "XDG_CACHE_HOME", ".cache"))
        values: dict[str, object] = {
            "data_dir": data_dir,
            "cache_dir": cache_dir,
            "database_url": env.get("TOKENMILL_DATABASE_URL") or f"sqlite:///{data_dir / 'tokenmill.db'}",
        }
        for f in fields(cls):
            key = "TOKENMILL_" + f.name.upper()
            if f.name not in values and key in env:
                values[f.name] = env[key]
        return cls(**values)  # type: ignore[arg-type]
