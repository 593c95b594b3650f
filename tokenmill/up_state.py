"""What a running `tokenmill up` leaves for others to find, read by `tokenmill up` itself, by its
terminal view (`tokenmill.up_view`) and by the command-line clients: its state file (pid, URLs) and
the keys it made in the data directory, and the address its local servers answer on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenmill.settings import Settings

STATE_FILE = "up.json"
LOCAL_TENANT = "local"


def secrets_dir(settings: Settings) -> Path:
    """Where `tokenmill up` keeps the keys it made (mode 0700, files 0600)."""
    return settings.data_dir / "secrets"


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The running `tokenmill up`'s state file (pid, URLs), or None when none runs."""
    try:
        state = json.loads((settings.data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_address(host: str) -> str:
    """Where a server bound to ``host`` is reached from this machine: one bound to every
    interface is reached on the loopback address."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
