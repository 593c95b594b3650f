"""A worker's Prometheus metrics: per-job histograms (queue time, time to first token, time per
output token, end-to-end latency, prompt and completion lengths), jobs by terminal status and
error code, redelivered jobs, and the engine's live figures. Names and buckets follow vLLM's
(``vllm:time_to_first_token_seconds`` is ``tokenmill_request_time_to_first_token_seconds`` here).

The registry is this process's own; `WorkerRuntime` writes it to Redis every second, from a thread
of its own
(`contract.worker_metrics`) and the API's `/metrics` merges every worker's entry.

Every job's times are measured from its *send*: the moment the API (or the reconciler) put its
task in Redis, the ``enqueued_at`` the task carries (wall clock, like vLLM's arrival time):

- queue time: send -> the engine takes the request in (Redis, delivery, claim, the engine's inbox);
- time to first token: send -> first token;
- time per output token: first token -> last token, over the tokens after the first;
- end-to-end latency: send -> result stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from contract.worker_metrics import encode_families
from engine import EngineStats

LABELS = ("model", "class")  # class: interactive or bulk

# vLLM's buckets, with longer tails for the queue and end to end: a bulk job may wait for hours.
_SECONDS_LONG = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0, 10240.0, 86400.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


def job_class(kind: str) -> str:
    """The priority class of a job's kind: batch lines are ``bulk``, everything else ``interactive``."""
    return "bulk" if kind == "bulk" else "interactive"


@dataclass(frozen=True)
class JobTimes:
    """One finished job's figures, kept by its task until its result is stored."""

    model: str
    cls: str
    enqueued_at: float  # wall clock of the send
    admitted_at: float  # wall clock: the engine took the request in
    first_token_at: float | None
    finished_at: float
    prompt_tokens: int
    completion_tokens: int


def job_times(model: str, kind: str, enqueued_at: float, out: Any) -> JobTimes:
    """The wall-clock figures of an engine output (whose times are monotonic) for one job."""
    offset = time.time() - time.monotonic()
    now = time.monotonic()
    arrival = out.arrival_time if out.arrival_time is not None else now
    return JobTimes(model=model, cls=job_class(kind), enqueued_at=enqueued_at, admitted_at=arrival + offset,
                    first_token_at=out.first_token_time + offset if out.first_token_time else None,
                    finished_at=(out.finish_time or now) + offset, prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens)


class WorkerMetrics:
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.queue_time = Histogram("tokenmill_request_queue_time_seconds",
                                    "From the send to the engine taking the request in.", LABELS,
                                    buckets=_SECONDS_LONG, registry=r)
        self.ttft = Histogram("tokenmill_request_time_to_first_token_seconds",
                              "From the send to the first token.", LABELS, buckets=_TTFT, registry=r)
        self.tpot = Histogram("tokenmill_request_time_per_output_token_seconds",
                              "Mean time per output token after the first, per job.", LABELS, buckets=_TPOT,
                              registry=r)
        self.e2e = Histogram("tokenmill_request_e2e_latency_seconds", "From the send to the result stored.",
                             LABELS, buckets=_SECONDS_LONG, registry=r)
        self.prompt_tokens = Histogram("tokenmill_request_prompt_tokens", "Prompt length of finished jobs.",
                                       LABELS, buckets=_TOKENS, registry=r)
        self.completion_tokens = Histogram("tokenmill_request_generation_tokens",
                                           "Completion length of finished jobs (every choice).", LABELS,
                                           buckets=_TOKENS, registry=r)
        self.finished = Counter("tokenmill_jobs_finished", "Jobs brought to a final state by this worker, by "
                                "status and error code (empty when succeeded).",
                                (*LABELS, "status", "error_code"), registry=r)
        self.recovered = Counter("tokenmill_jobs_recovered", "Jobs claimed again after an earlier attempt "
                                 "was lost (a redelivered task).", LABELS, registry=r)
        for cls in ("interactive", "bulk"):  # a zero, not a missing series, until the first redelivery
            self.recovered.labels(model, cls)
        self._engine = _EngineCollector(model)
        r.register(self._engine)

    def stored(self, t: JobTimes, status: str, stored_at: float | None = None) -> None:
        """A job's result is in the store (``status``: succeeded or expired)."""
        stored_at = time.time() if stored_at is None else stored_at
        labels = (t.model, t.cls)
        self.queue_time.labels(*labels).observe(max(0.0, t.admitted_at - t.enqueued_at))
        if t.first_token_at is not None:
            self.ttft.labels(*labels).observe(max(0.0, t.first_token_at - t.enqueued_at))
            if t.completion_tokens > 1:
                self.tpot.labels(*labels).observe(max(0.0, t.finished_at - t.first_token_at)
                                                  / (t.completion_tokens - 1))
        self.e2e.labels(*labels).observe(max(0.0, stored_at - t.enqueued_at))
        self.prompt_tokens.labels(*labels).observe(t.prompt_tokens)
        self.completion_tokens.labels(*labels).observe(t.completion_tokens)
        self.finished.labels(*labels, status, "").inc()

    def failed(self, model: str, kind: str, error_code: str) -> None:
        """A job ended failed with ``error_code``."""
        self.finished.labels(model, job_class(kind), "failed", error_code).inc()

    def claimed(self, claims: Iterable[Any]) -> None:
        """Counts the claimed jobs that are not on their first attempt (a redelivery)."""
        for c in claims:
            if c.attempts > 1:
                self.recovered.labels(c.model, job_class(c.kind)).inc()

    def engine_figures(self, stats: EngineStats, tokens_per_s: float, pending: int) -> None:
        """The engine's latest figures, exported at the next collection."""
        self._engine.update(stats, tokens_per_s, pending)

    def encode(self) -> bytes:
        """This registry as a `contract.worker_metrics` entry."""
        return encode_families(self.registry.collect())


_GAUGES = {
    "running": "Sequences running in the engine.",
    "waiting": "Sequences waiting in the engine.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_total": "KV cache blocks in all.",
}
_COUNTERS = {
    "preemptions": ("tokenmill_engine_preemptions", "Requests preempted (their KV blocks taken back)."),
    "prefix_cache_hit_tokens": ("tokenmill_engine_prefix_cache_hit_tokens",
                                "Prompt tokens found in the prefix cache (not computed)."),
    "prompt_tokens_total": ("tokenmill_engine_prompt_tokens", "Prompt tokens of the requests added."),
    "prefill_tokens_total": ("tokenmill_engine_prefill_tokens", "Prompt tokens the model computed."),
    "generated_tokens_total": ("tokenmill_engine_generation_tokens", "Tokens generated."),
    "steps": ("tokenmill_engine_steps", "Engine steps run."),
}


class _EngineCollector:
    """The engine's figures as gauges and counters (a custom collector: read, not incremented)."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._stats: EngineStats | None = None
        self._tokens_per_s = 0.0
        self._pending = 0

    def update(self, stats: EngineStats, tokens_per_s: float, pending: int) -> None:
        with self._lock:
            self._stats, self._tokens_per_s, self._pending = stats, tokens_per_s, pending

    def collect(self) -> Iterable[Any]:
        with self._lock:
            stats, tps, pending = self._stats, self._tokens_per_s, self._pending
        if stats is None:
            return
        for field, help_text in _GAUGES.items():
            g = GaugeMetricFamily(f"tokenmill_engine_{field}", help_text, labels=["model"])
            g.add_metric([self._model], float(getattr(stats, field)))
            yield g
        g = GaugeMetricFamily("tokenmill_engine_tokens_per_s", "Tokens generated per second (last second).",
                              labels=["model"])
        g.add_metric([self._model], round(tps, 1))
        yield g
        g = GaugeMetricFamily("tokenmill_engine_pending", "Requests handed to the engine loop and not yet "
                              "finished.", labels=["model"])
        g.add_metric([self._model], float(pending))
        yield g
        for field, (name, help_text) in _COUNTERS.items():
            c = CounterMetricFamily(name, help_text, labels=["model"])
            c.add_metric([self._model], float(getattr(stats, field)))
            yield c
