"""/metrics as Prometheus reads it: a real worker's histograms and engine figures reach the API's
one scrape, per model and class; several API processes add up; the Grafana dashboard asks only for
metrics that are really there."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import httpx
from conftest import ADMIN_KEY, REPO, TINY, Proc, Server, free_port, wait_job
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = REPO / "deploy" / "grafana" / "tokenmill.json"


def scrape(url: str, key: str | None = ADMIN_KEY) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Family name -> its samples, as Prometheus parses the exposition (scraping with the admin
    key by default, as deploy/prometheus/prometheus.yml does)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    return sum(v for samples in families.values() for name, ls, v in samples
               if name == sample and all(ls.get(k) == want for k, want in labels.items()))


def test_a_finished_job_shows_in_the_worker_histograms_behind_one_scrape(server: Server, api: httpx.Client) -> None:
    before = scrape(server.url)
    ids = [api.post("/v1/jobs", json={"model": TINY, "prompt": f"count {i}", "params": {"max_tokens": 6}}).json()["id"]
           for i in range(3)]
    for job_id in ids:
        assert wait_job(api, job_id)["status"] == "succeeded"
    labels = {"model": TINY, "class": "interactive"}
    deadline = time.monotonic() + 10  # the worker writes its metrics to Redis every second
    while True:
        after = scrape(server.url)
        done = value(after, "tokenmill_request_e2e_latency_seconds_count", **labels) \
            - value(before, "tokenmill_request_e2e_latency_seconds_count", **labels)
        if done >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done == 3
    for hist in ("tokenmill_request_queue_time_seconds", "tokenmill_request_time_to_first_token_seconds",
                 "tokenmill_request_time_per_output_token_seconds", "tokenmill_request_prompt_tokens",
                 "tokenmill_request_generation_tokens"):
        grew = value(after, f"{hist}_count", **labels) - value(before, f"{hist}_count", **labels)
        assert grew == 3, hist
        assert value(after, f"{hist}_bucket", le="+Inf", **labels) == value(after, f"{hist}_count", **labels)
    # Every sample of a worker's family names its worker.
    assert all(ls.get("worker") for _, ls, _ in after["tokenmill_request_e2e_latency_seconds"])
    # Six tokens asked, six made: the generation-length sum grew by 18 (or less if one stopped early).
    grown = value(after, "tokenmill_request_generation_tokens_sum", **labels) \
        - value(before, "tokenmill_request_generation_tokens_sum", **labels)
    assert 3 <= grown <= 18
    assert value(after, "tokenmill_jobs_finished_total", status="succeeded", error_code="", **labels) \
        - value(before, "tokenmill_jobs_finished_total", status="succeeded", error_code="", **labels) == 3
    assert value(after, "tokenmill_engine_kv_blocks_total", model=TINY) > 0
    assert value(after, "tokenmill_api_jobs_accepted_total") - value(before, "tokenmill_api_jobs_accepted_total") == 3
    assert value(after, "tokenmill_worker_up", model=TINY) == 1
    assert any(ls["direction"] == "out" and v > 0 for _, ls, v in after["tokenmill_tenant_tokens"])
    # The endpoint is open; tenant ids are not: without the admin key (or with another) no tenant.
    for key in (None, "tm-not-the-admin-key"):
        open_view = scrape(server.url, key)
        assert "tokenmill_tenant_tokens" not in open_view and "tokenmill_request_e2e_latency_seconds" in open_view

def test_several_api_processes_add_up_in_one_scrape(database_url: str, redis_url: str, tiny_dir: Path,
                                                      tmp_path: Path, worker: Proc) -> None:
    port = free_port()
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url,
           "TOKENMILL_SERVED_MODELS": f"{TINY}={tiny_dir}", "TOKENMILL_DATA_DIR": str(tmp_path / "data")}
    p = Proc([sys.executable, "-m", "tokenmill.cli", "api", "--host", "127.0.0.1", "--port", str(port),
              "--workers", "2", "--loglevel", "warning"], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert p.proc.poll() is None, p.log()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, p.log()
            time.sleep(0.2)
        files = tmp_path / "data" / "metrics" / f"api-{port}"
        deadline = time.monotonic() + 60
        n = 1
        # New connections each time, until both processes have answered (each writes its own file).
        while len({f.name.rsplit("_", 1)[-1] for f in files.glob("histogram_*.db")}) < 2:
            httpx.get(url + "/healthz", timeout=5)
            n += 1
            assert time.monotonic() < deadline, "one process answered every request"
        for _ in range(3):  # whichever process answers the scrape, it counts every process's requests
            families = scrape(url)
            assert value(families, "tokenmill_api_requests_total", route="/healthz", status="200") == n
    finally:
        p.stop()


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's PromQL expressions use."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    assert exprs, "the dashboard has no queries"
    names: set[str] = set()
    for expr in exprs:
        body = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', "", expr))  # label matchers and strings out
        names |= {m for m in re.findall(r"\b(tokenmill_[a-z0-9_]+)\b", body)}
    return names


def test_every_metric_of_the_dashboard_is_exposed(server: Server, api: httpx.Client) -> None:
    job = api.post("/v1/jobs", json={"model": TINY, "prompt": "x", "params": {"max_tokens": 3}}).json()["id"]
    assert wait_job(api, job)["status"] == "succeeded"
    time.sleep(1.5)  # the worker's next write of its metrics
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    missing = sorted(dashboard_metrics() - exposed)
    assert not missing, f"the dashboard asks for metrics /metrics does not expose: {missing}"
