"""`tokenmill api`: the HTTP API (uvicorn over `api.create_app`).

Only FastAPI, SQLAlchemy, Redis and Celery's client side are imported: never torch or the engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from tokenmill.builtin_model import cached_model_dir
from tokenmill.settings import Settings


def served_models(settings: Settings) -> dict[str, str | None]:
    """Served model name -> model directory, from TOKENMILL_SERVED_MODELS ("name=dir,...") or, when
    that is empty, the one TOKENMILL_MODEL (a directory, or a built-in name converted in the cache)."""
    out: dict[str, str | None] = {}
    if settings.served_models.strip():
        for item in settings.served_models.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, where = item.partition("=")
            if not sep:  # a bare directory or built-in name
                where, name = name, os.path.basename(os.path.normpath(name))
            out[name.strip()] = _model_dir(settings, where.strip())
        return out
    model = settings.model
    out[os.path.basename(os.path.normpath(model))] = _model_dir(settings, model)
    return out


def _model_dir(settings: Settings, where: str) -> str | None:
    path = Path(where).expanduser()
    if path.is_dir():
        return str(path)
    # A built-in model, once fetched into the cache (by `tokenmill fetch`, `up` or a worker). The API
    # does not fetch it itself: converting needs torch, which an API process never imports.
    cached = cached_model_dir(where, settings.model_cache_dir)
    return str(cached) if cached.is_dir() else None


def api_config(settings: Settings):  # type: ignore[no-untyped-def]
    """The API's config from the settings."""
    from api.config import ApiConfig

    return ApiConfig(
        database_url=settings.database_url, redis_url=settings.redis_url, models=served_models(settings),
        admin_key=settings.admin_key, queue_limit=settings.queue_limit, max_body_bytes=settings.max_body_bytes,
        max_file_bytes=settings.max_file_bytes, batch_max_lines=settings.batch_max_lines,
        default_max_tokens=settings.default_max_tokens, sync_timeout_s=settings.sync_timeout_s,
        visibility_timeout_s=settings.visibility_timeout_s, reconcile_interval_s=settings.reconcile_interval_s,
        reconcile_min_age_s=settings.reconcile_min_age_s, metrics_multiprocess_dir=settings.metrics_dir,
        budget_status=settings.budget_status,
        settle_interval_s=settings.settle_interval_s, retention_days=settings.retention_days,
        purge_interval_s=settings.purge_interval_s, webhook_allow_private=settings.webhook_allow_private,
        webhook_interval_s=settings.webhook_interval_s, prefix_routing=settings.prefix_routing,
    )


def make_app():  # type: ignore[no-untyped-def]
    """Factory for uvicorn's worker processes (``--factory``): reads the settings in each process."""
    from api.app import create_app

    settings = Settings.from_env()
    if settings.log_format == "json":  # text: uvicorn's own logging, as it is
        from tokenmill.log_format import configure_logging

        configure_logging("json", "INFO")
    if settings.otel_endpoint:
        from tokenmill.tracing import configure_tracing

        configure_tracing(settings.otel_endpoint, "tokenmill-api")
    return create_app(api_config(settings))


def api_command(
    host: str | None = typer.Option(None, help="Interface to listen on [default: TOKENMILL_API_HOST]."),
    port: int | None = typer.Option(None, help="Port [default: TOKENMILL_API_PORT]."),
    workers: int | None = typer.Option(None, help="Processes [default: TOKENMILL_API_WORKERS]."),
    loglevel: str = typer.Option("info", help="Log level."),
) -> None:
    """Run the HTTP API: jobs, OpenAI-compatible completions and chat, files, batches, usage."""
    import uvicorn

    settings = Settings.from_env()
    processes = workers or settings.api_workers
    metrics_dir = settings.metrics_dir
    if not metrics_dir and processes > 1:
        metrics_dir = str(settings.data_dir / "metrics" / f"api-{port or settings.api_port}")
    if metrics_dir:
        _fresh_metrics_dir(Path(metrics_dir))
        # Read by prometheus_client as it is imported in each worker process, and by its settings.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["TOKENMILL_METRICS_DIR"] = metrics_dir
        settings = Settings.from_env()
    config = api_config(settings)
    missing = [name for name, where in config.models.items() if where is None]
    if missing:
        typer.echo(f"note: no model directory for {', '.join(missing)}: prompts are not counted here "
                   "(set TOKENMILL_SERVED_MODELS=name=dir)", err=True)
    uvicorn.run("tokenmill.cli_api:make_app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port, workers=processes,
                log_level=loglevel.lower(), proxy_headers=True, timeout_keep_alive=30)


def _fresh_metrics_dir(path: Path) -> None:
    """prometheus_client's multiprocess files of an earlier run would add to this one's counters."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
