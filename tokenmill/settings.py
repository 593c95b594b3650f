"""Settings, read once at the edge from `TOKENMILL_*` environment variables, passed down as plain
objects. No other module reads the environment (except the CUDA pinning done before torch loads)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping


LOG_FORMATS = ("text", "json")


def _home_dir(env: Mapping[str, str], xdg_var: str, fallback: str) -> Path:
    base = env.get(xdg_var) or str(Path(env.get("HOME", str(Path.home()))) / fallback)
    return Path(base) / "tokenmill"


@dataclass(frozen=True)
class Settings:
    """Every setting of tokenmill. Each field is read from `TOKENMILL_<FIELD NAME IN CAPITALS>`."""

    data_dir: Path
    cache_dir: Path
    database_url: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    model: str = "smollm2-135m-instruct"
    # workers
    worker_concurrency: int = 128  # tasks a worker holds at once (each waits on the shared engine)
    # of those, the most bulk tasks may hold (64 jobs each); the rest wait for interactive tasks
    # (workers.task_slots); >= worker_concurrency: bulk may take every slot
    worker_bulk_tasks: int = 64
    max_num_seqs: int = 0  # sequences in one engine batch; 0: from the device (engine.config.default_batch_limits)
    max_attempts: int = 3  # lost starts before a job runs alone; lost runs alone before it fails
    visibility_timeout_s: int = 3600  # a lost worker's tasks return to the queue after this
    shutdown_grace_s: float = 90.0  # after SIGTERM: time to finish held jobs before handing the rest back
    num_kv_blocks: int = 0  # KV cache blocks of a worker's engine; 0: sized from memory
    tensor_parallel_size: int = 1  # processes (GPUs) one worker's model is split over
    # Test only: a worker whose engine is given a prompt containing this text crashes (as on a
    # CUDA error). Empty (the default): off.
    fault_crash_marker: str = ""
    # HTTP API (`tokenmill api`)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 1  # uvicorn worker processes
    admin_key: str = ""  # bearer key of the admin endpoints; empty: admin endpoints refuse everyone
    served_models: str = ""  # "name=model_dir,name2=dir2"; empty: the one `model` above
    queue_limit: int = 10_000  # interactive tasks a model's queue may hold before new ones get 429
    max_body_bytes: int = 4 * 1024 * 1024  # JSON request bodies
    max_file_bytes: int = 512 * 1024 * 1024  # uploaded files
    batch_max_lines: int = 50_000  # requests in one batch input file
    default_max_tokens: int = 512  # chat completions that name no max_tokens (capped by the context)
    sync_timeout_s: float = 600.0  # how long a synchronous completion waits for its job
    reconcile_interval_s: float = 10.0  # how often the API looks for jobs whose task Redis lost (<= 0: never)
    reconcile_min_age_s: float = 30.0  # how long a job waits or runs before it is looked for in Redis
    # observability (docs/observability.md)
    # prometheus_client's multiprocess directory, shared by the API processes of one host (also read
    # from the standard PROMETHEUS_MULTIPROC_DIR); empty: `<data dir>/metrics/api-<port>` when
    # `api_workers` > 1, none with one process.
    metrics_dir: str = ""
    log_format: str = "text"  # "json": one JSON object per log line, with job, tenant and worker ids
    # OTLP/HTTP collector to send traces to (also read from the standard OTEL_EXPORTER_OTLP_ENDPOINT);
    # empty: no tracing
    otel_endpoint: str = ""
    # tenancy (docs/tenancy.md)
    budget_status: int = 429  # HTTP status of a request refused by a token budget: 429 or 402
    retention_days: int = 30  # finished jobs, results, files and batches older than this are purged
    purge_interval_s: float = 3600.0  # how often the API purges work past its retention (<= 0: never)
    webhook_allow_private: bool = False  # allow webhooks to loopback, link-local and private addresses
    webhook_interval_s: float = 1.0  # how often completion webhooks are queued and sent (<= 0: never)
    settle_interval_s: float = 1.0  # how often finished jobs' token reservations are settled (<= 0: never)
    # prefix-aware routing (docs/routing.md): a job whose prompt shares a long prefix with a live
    # worker's recent prompts goes to that worker's own queue (off: every job to the shared queue)
    prefix_routing: bool = True
    # Flower (`tokenmill flower`, and inside `tokenmill up`)
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: str = ""  # empty: `tokenmill up` makes one on first start (saved in the data dir)
    flower_max_tasks: int = 10_000  # tasks Flower keeps in memory (older ones are forgotten)
    # command-line clients (`tokenmill submit`, `jobs`, `batch`, `usage`)
    api_url: str = ""  # empty: the API that `tokenmill up` runs, else http://api_host:api_port
    api_key: str = ""  # empty: the local key `tokenmill up` made on first start

    @property
    def model_cache_dir(self) -> Path:
        """Where built-in models are converted to safetensors directories."""
        return self.cache_dir / "models"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Builds the settings from the environment (or the given mapping)."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("TOKENMILL_DATA_DIR") or _home_dir(env, "XDG_DATA_HOME", ".local/share"))
        cache_dir = Path(env.get("TOKENMILL_CACHE_DIR") or _home_dir(env, "XDG_CACHE_HOME", ".cache"))
        values: dict[str, object] = {
            "data_dir": data_dir,
            "cache_dir": cache_dir,
            "database_url": env.get("TOKENMILL_DATABASE_URL") or f"sqlite:///{data_dir / 'tokenmill.db'}",
            # The standard variables of prometheus_client and OpenTelemetry count too.
            "metrics_dir": env.get("TOKENMILL_METRICS_DIR") or env.get("PROMETHEUS_MULTIPROC_DIR", ""),
            "otel_endpoint": env.get("TOKENMILL_OTEL_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        }
        for f in fields(cls):
            key = "TOKENMILL_" + f.name.upper()
            if f.name not in values and key in env:
                values[f.name] = _convert(key, env[key], f.type)
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.log_format not in LOG_FORMATS:
            raise ValueError(f"TOKENMILL_LOG_FORMAT={settings.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        return settings


def _convert(key: str, raw: str, type_name: object) -> object:
    """Parses an environment value by its field's type; a bad value names the variable."""
    kind = str(type_name)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a valid {kind}") from None
    return raw
