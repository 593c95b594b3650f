"""compose.yaml as Docker Compose reads it (`docker compose config`, or the standalone
`docker-compose`): valid, persistent noeviction Redis, GPU reservations, health checks, and
secrets that must come from the environment. No Docker engine is needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from stack_helpers import REPO

SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "REDIS_PASSWORD": "redis-secret", "TOKENMILL_ADMIN_KEY": "admin-secret",
           "TOKENMILL_FLOWER_PASSWORD": "flower-secret"}


def compose_cmd() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def config(env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run([*compose_cmd(), "-f", "compose.yaml", "config"], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_compose_file_is_accepted_and_wires_every_service():
    run = config(SECRETS)
    assert run.returncode == 0, run.stderr
    cfg = yaml.safe_load(run.stdout)
    services = cfg["services"]
    # The monitoring profile's services (prometheus, grafana) run only when asked for.
    assert set(services) - {"prometheus", "grafana"} == {"redis", "postgres", "migrate", "api", "worker", "flower"}
    redis_cmd = " ".join(services["redis"]["command"]) if isinstance(services["redis"]["command"], list) \
        else services["redis"]["command"]
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in services["postgres"]["volumes"]]
    assert any(v.startswith("postgres-data:") for v in volumes) and "postgres-data" in cfg["volumes"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    for name in ("redis", "postgres", "api", "worker", "flower"):
        assert "test" in services[name]["healthcheck"], name
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Secrets reach the services from the environment, and nowhere are they written in the file.
    assert services["api"]["environment"]["TOKENMILL_ADMIN_KEY"] == "admin-secret"
    assert "pg-secret" in services["worker"]["environment"]["TOKENMILL_DATABASE_URL"]
    text = (REPO / "compose.yaml").read_text()
    assert not any(secret in text for secret in SECRETS.values())


def test_compose_refuses_to_run_without_its_secrets():
    run = config({})
    assert run.returncode != 0
    assert "set POSTGRES_PASSWORD" in run.stderr or "set REDIS_PASSWORD" in run.stderr


def test_monitoring_profile_scrapes_the_api_and_provisions_the_dashboard():
    # Read as written (no Docker needed): the optional services, and every file they mount exists.
    cfg = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = cfg["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
            else:
                assert source in cfg["volumes"], source
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]
    # It scrapes with the admin key (per-tenant tokens), from the environment, never written here.
    assert job["authorization"]["credentials_file"] == "/tmp/tokenmill_admin_key"
    assert services["prometheus"]["environment"]["TOKENMILL_ADMIN_KEY"].startswith("${TOKENMILL_ADMIN_KEY:?")
    assert "> /tmp/tokenmill_admin_key" in services["prometheus"]["entrypoint"][-1]
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    board = json.loads((REPO / "deploy/grafana/tokenmill.json").read_text())
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["datasources"][0]["uid"]}
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/tokenmill.yml").read_text())
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"] if v.startswith("./deploy/grafana/tokenmill.json")]
    assert mounted and mounted[0].startswith(provider["providers"][0]["options"]["path"] + "/")
    assert "TOKENMILL_ADMIN_KEY" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
