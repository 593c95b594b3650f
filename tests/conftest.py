"""Fixtures shared by every suite: the session's own Redis and PostgreSQL servers (tests/services.py),
the converted built-in model and tiny model directories."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services import (
    POSTGRES_URL_VAR,
    REDIS_URL_VAR,
    NamedRedis,
    PrivatePostgres,
    PrivateRedis,
    require_postgres_bindir,
)
from tiny_models import TINY_ARCHS, make_tiny_model
from tokenmill.builtin_model import fetch_builtin_model


@pytest.fixture(scope="session")
def test_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamedRedis | PrivateRedis]:
    """The session's Redis (``.db_url(n)``): the one ``TOKENMILL_TEST_REDIS_URL`` names, else a
    `redis-server` of our own on a free port in a temporary directory, killed at the end."""
    named = os.environ.get(REDIS_URL_VAR)
    if named:
        yield NamedRedis(named)
        return
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A superuser URL of the session's PostgreSQL: the one ``TOKENMILL_TEST_POSTGRES_URL`` names,
    else a cluster of our own (initdb in a temporary directory, a free port), removed at the end.
    Without server binaries the test fails under CI=true (there they are part of the set-up) and is
    skipped, with the reason, elsewhere."""
    named = os.environ.get(POSTGRES_URL_VAR)
    if named:
        yield named
        return
    cluster = PrivatePostgres(require_postgres_bindir())
    try:
        cluster.start()
        yield cluster.url()
    finally:
        cluster.destroy()


def models_cache_dir() -> Path:
    """Where built-in models are converted for tests: $TOKENMILL_CACHE_DIR or the user's cache, so
    the conversion is done once and reused across test runs."""
    return Path(os.environ.get("TOKENMILL_CACHE_DIR") or "~/.cache/tokenmill/models").expanduser()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct model directory (fetched and converted on first use, by
    tokenmill: the engine itself only loads what is in the cache)."""
    return fetch_builtin_model("smollm2-135m-instruct", models_cache_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Callable[[str], Path]:
    """Factory: `tiny_model_dir(arch)` -> a tiny random model directory of that architecture
    variant (llama, llama3, mistral, qwen2, qwen3), made once per session."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
        if arch not in made:
            made[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), smollm2_dir)
        return made[arch]

    return make

