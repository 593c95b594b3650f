"""A worker's Prometheus registry: what one finished job adds to each histogram, how failures and
redeliveries are counted, and how two workers' entries merge into the API's one exposition."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from api.metrics import ApiMetrics, worker_families
from engine import EngineStats
from workers.metrics import JobTimes, WorkerMetrics


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_one_stored_job_lands_in_every_histogram_with_its_own_times() -> None:
    m = WorkerMetrics("m")
    # Sent at 100.0, admitted 0.5 s later, first token at 101.0, 11 tokens by 102.0, stored at 102.5.
    m.stored(JobTimes("m", "bulk", 100.0, 100.5, 101.0, 102.0, 7, 11), "succeeded", stored_at=102.5)
    got = {f.name: {s.name: s.value for s in f.samples if s.name.endswith("_sum")} for f in m.registry.collect()}
    assert got["tokenmill_request_queue_time_seconds"]["tokenmill_request_queue_time_seconds_sum"] == 0.5
    assert got["tokenmill_request_time_to_first_token_seconds"][
        "tokenmill_request_time_to_first_token_seconds_sum"] == 1.0
    assert got["tokenmill_request_time_per_output_token_seconds"][
        "tokenmill_request_time_per_output_token_seconds_sum"] == 0.1  # 1 s over the 10 tokens after the first
    assert got["tokenmill_request_e2e_latency_seconds"]["tokenmill_request_e2e_latency_seconds_sum"] == 2.5
    assert got["tokenmill_request_prompt_tokens"]["tokenmill_request_prompt_tokens_sum"] == 7
    assert got["tokenmill_request_generation_tokens"]["tokenmill_request_generation_tokens_sum"] == 11


def test_failures_by_code_and_redeliveries_are_counted() -> None:
    m = WorkerMetrics("m")
    m.failed("m", "interactive", "attempts_exhausted")
    m.claimed([SimpleNamespace(model="m", kind="interactive", attempts=1),
               SimpleNamespace(model="m", kind="bulk", attempts=2)])
    s = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in m.registry.collect() for x in f.samples}
    assert s[("tokenmill_jobs_finished_total", (("class", "interactive"), ("error_code", "attempts_exhausted"),
                                                ("model", "m"), ("status", "failed")))] == 1
    assert s[("tokenmill_jobs_recovered_total", (("class", "bulk"), ("model", "m")))] == 1
    assert s[("tokenmill_jobs_recovered_total", (("class", "interactive"), ("model", "m")))] == 0


def test_two_workers_merge_into_one_exposition_each_sample_with_its_worker() -> None:
    entries = {}
    for host, used in (("a@h1", 3), ("b@h2", 5)):
        m = WorkerMetrics("m")
        m.stored(JobTimes("m", "interactive", 0.0, 0.1, 0.2, 0.3, 1, 2), "succeeded", stored_at=0.4)
        m.engine_figures(EngineStats(running=1, waiting=0, kv_blocks_used=used, kv_blocks_total=10,
                                     prompt_tokens_total=1, prefill_tokens_total=1, generated_tokens_total=2,
                                     prefix_cache_hit_tokens=0, preemptions=4, steps=3, last_batch_size=1,
                                     peak_batch_size=1), 1.0, 0)
        entries[f"tokenmill:worker-metrics:{host}".encode()] = m.encode()

    class Redis:
        def scan_iter(self, match: str, count: int) -> list[bytes]:
            return list(entries)

        def mget(self, keys: list[bytes]) -> list[bytes]:
            return [entries[k] for k in keys]

    text = ApiMetrics().exposition(lambda: worker_families(Redis())).decode()
    s = samples(text)  # parses: one HELP/TYPE per family, whatever the number of workers
    assert s[("tokenmill_engine_kv_blocks_used", (("model", "m"), ("worker", "a@h1")))] == 3
    assert s[("tokenmill_engine_kv_blocks_used", (("model", "m"), ("worker", "b@h2")))] == 5
    assert s[("tokenmill_engine_preemptions_total", (("model", "m"), ("worker", "b@h2")))] == 4
    assert text.count("# TYPE tokenmill_request_e2e_latency_seconds histogram") == 1
    assert s[("tokenmill_request_e2e_latency_seconds_count",
              (("class", "interactive"), ("model", "m"), ("worker", "a@h1")))] == 1
