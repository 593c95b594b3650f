"""Prometheus text exposition, written by hand (a few families; no client library needed).

Request counters are per process; job, queue, token and engine figures come from the store,
Redis and the workers' stats hashes, so every API process reports the same values for those.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class RequestMetrics:
    """Requests served by this process, by method, route template and status, with latency sums."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[tuple[str, str, int], int] = defaultdict(int)
        self._seconds: dict[tuple[str, str, int], float] = defaultdict(float)
        self.jobs_accepted = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Counts one request."""
        key = (method, route, status)
        with self._lock:
            self._count[key] += 1
            self._seconds[key] += seconds

    def lines(self) -> list[str]:
        """The request families in exposition format."""
        with self._lock:
            counts = dict(self._count)
            seconds = dict(self._seconds)
            accepted = self.jobs_accepted
        out = ["# HELP tokenmill_api_requests_total HTTP requests served by this API process.",
               "# TYPE tokenmill_api_requests_total counter"]
        for (m, r, s), n in sorted(counts.items()):
            out.append(f"tokenmill_api_requests_total{_labels({'method': m, 'route': r, 'status': str(s)})} {n}")
        out += ["# HELP tokenmill_api_request_seconds_total Time spent serving requests, by route.",
                "# TYPE tokenmill_api_request_seconds_total counter"]
        for (m, r, s), v in sorted(seconds.items()):
            out.append(f"tokenmill_api_request_seconds_total{_labels({'method': m, 'route': r, 'status': str(s)})} {v:.6f}")
        out += ["# HELP tokenmill_api_jobs_accepted_total Jobs stored by this API process.",
                "# TYPE tokenmill_api_jobs_accepted_total counter",
                f"tokenmill_api_jobs_accepted_total {accepted}"]
        return out


def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    """One metric family: its HELP and TYPE lines and its samples."""
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        out.append(f"{name}{_labels(labels)} {value:g}")
    return out
