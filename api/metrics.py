"""`/metrics` with prometheus_client: this API process's request counters, and at scrape time the
figures every API process shares (jobs, tokens and per-tenant tokens from the store; queue depths
and live workers from Redis; every worker's own metrics from its Redis entry).

Several API processes (``TOKENMILL_API_WORKERS`` > 1) write their counters through
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which `tokenmill api` sets),
so whichever process answers a scrape reports the sum of all of them. The shared figures are read
by the process that answers, once. See docs/observability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from contract.redis_keys import WORKER_METRICS_PATTERN, worker_of
from contract.worker_metrics import decode_families

log = logging.getLogger(__name__)

# No `*_created` series: Prometheus does not need them, and the multiprocess mode has none either.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    600.0)


class ApiMetrics:
    """The counters this API process increments (requests, accepted jobs, reconciler re-sends).

    ``multiprocess_dir``: prometheus_client's directory when several API processes share a port
    (its value files are what a scrape reads); empty: this process alone.
    """

    def __init__(self, multiprocess_dir: str = "") -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("tokenmill_api_requests", "HTTP requests served, by method, route and status.",
                                ("method", "route", "status"), registry=r)
        self.request_seconds = Histogram("tokenmill_api_request_duration_seconds",
                                         "Time to serve a request (to its last byte), by method and route.",
                                         ("method", "route"), buckets=_REQUEST_BUCKETS, registry=r)
        self.jobs_accepted = Counter("tokenmill_api_jobs_accepted", "Jobs stored by the API (one per job, "
                                     "whatever the endpoint).", registry=r)
        self.reconciler_resent = Counter("tokenmill_api_reconciler_resent", "Jobs whose task Redis had lost, "
                                         "sent again by the reconciler, by the job's status then.", ("status",),
                                         registry=r)
        for status in ("queued", "running"):
            self.reconciler_resent.labels(status)
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Counts one request (a method no route knows counts as ``OTHER``: a client must not be able
        to make new series at will; the route is a template or ``unmatched`` already)."""
        if method not in _METHODS:
            method = "OTHER"
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per key, not per request
            children = (self.requests.labels(method, route, str(status)), self.request_seconds.labels(method, route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def resent(self, status: str, n: int = 1) -> None:
        """The reconciler sent ``n`` jobs of ``status`` again (its hook)."""
        self.reconciler_resent.labels(status).inc(n)

    def exposition(self, shared: Callable[[], Iterable[Metric]]) -> bytes:
        """The text of one scrape: this process's (or every API process's) counters, and the
        families ``shared`` yields."""
        scrape = CollectorRegistry(auto_describe=False)
        if self.multiprocess_dir:
            MultiProcessCollector(scrape, path=self.multiprocess_dir)
        else:
            scrape.register(_Forward(self.registry))
        scrape.register(_Shared(shared))
        return generate_latest(scrape)


class _Forward:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


class _Shared:
    def __init__(self, shared: Callable[[], Iterable[Metric]]) -> None:
        self._shared = shared

    def collect(self) -> Iterable[Metric]:
        return self._shared()


def store_families(store: Any, *, per_tenant: bool = False) -> list[Metric]:
    """Jobs by status, tokens per model, and with ``per_tenant`` per tenant (all from the store:
    every API process reports the same)."""
    out: list[Metric] = []
    jobs = GaugeMetricFamily("tokenmill_jobs", "Jobs by status (all tenants).", labels=["status"])
    for status, n in sorted(store.jobs.count_by_status().items()):
        jobs.add_metric([status], n)
    out.append(jobs)
    tokens = CounterMetricFamily("tokenmill_tokens", "Tokens processed, by model and direction.",
                                 labels=["model", "direction"])
    for b in store.usage.summary(None, group_by=["model"]):
        for direction, n in (("in", b.prompt_tokens), ("out", b.completion_tokens),
                             ("cached_in", b.cached_prompt_tokens)):
            tokens.add_metric([b.model or "", direction], n)
    out.append(tokens)
    if not per_tenant:
        return out
    tenants = CounterMetricFamily("tokenmill_tenant_tokens", "Tokens processed, by tenant, model and direction.",
                                  labels=["tenant", "model", "direction"])
    for b in store.usage.summary(None, group_by=["tenant", "model"]):
        for direction, n in (("in", b.prompt_tokens), ("out", b.completion_tokens)):
            tenants.add_metric([b.tenant_id or "", b.model or "", direction], n)
    out.append(tenants)
    return out


def queue_families(dispatcher: Any, models: list[str]) -> list[Metric]:
    """Queue depth per queue and class, and the live workers (from their figures hashes)."""
    depth = GaugeMetricFamily("tokenmill_queue_depth", "Tasks waiting in each queue, by class.",
                              labels=["queue", "class"])
    for d in (dispatcher.depth(m, fresh=True) for m in models):
        depth.add_metric([d.queue, "interactive"], d.interactive)
        depth.add_metric([d.queue, "bulk"], d.bulk)
    workers = dispatcher.workers()
    live = GaugeMetricFamily("tokenmill_workers", "Live workers per model.", labels=["model"])
    for m in sorted({w.get("model", "") for w in workers} | set(models)):
        live.add_metric([m], sum(1 for w in workers if w.get("model") == m))
    up = GaugeMetricFamily("tokenmill_worker_up", "1 for each live worker (its figures refreshed within "
                           "their TTL).", labels=["worker", "model"])
    for w in workers:
        up.add_metric([w["hostname"], w.get("model", "")], 1)
    return [depth, live, up]


def worker_families(redis: Any) -> list[Metric]:
    """Every live worker's own metric families, merged by name, each sample labelled with its worker."""
    keys = list(redis.scan_iter(match=WORKER_METRICS_PATTERN, count=100))
    if not keys:
        return []
    merged: dict[str, Metric] = {}
    for key, text in zip(keys, redis.mget(keys)):
        if text is None:
            continue
        worker = worker_of(key)
        for name, typ, help_text, samples in decode_families(text):
            fam = merged.get(name)
            if fam is None:
                fam = merged[name] = Metric(name, help_text, typ)
            for sample_name, labels, value in samples:
                fam.add_sample(sample_name, {**labels, "worker": worker}, value)
    return list(merged.values())
