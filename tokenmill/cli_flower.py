"""`tokenmill flower`: Flower on the tokenmill Celery app, with basic auth, events on, a bounded
task memory, and tasks shown in a readable, redacted form (`workers.flower_format`)."""

from __future__ import annotations

from typing import Optional

import typer


def flower_argv(host: str, port: int, max_tasks: int, url_prefix: str = "") -> list[str]:
    """The arguments after ``celery flower`` (the secret is set on Flower's options, not here,
    so it never shows in a process list)."""
    argv = ["flower", f"--address={host}", f"--port={port}", f"--max_tasks={max_tasks}",
            "--enable_events=True", "--natural_time=False",
            "--tasks_columns=name,uuid,state,args,result,runtime,worker"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    return argv


def flower_command(
    host: Optional[str] = typer.Option(None, help="Interface to listen on [default: TOKENMILL_FLOWER_HOST]."),
    port: Optional[int] = typer.Option(None, help="Port [default: TOKENMILL_FLOWER_PORT]."),
    max_tasks: Optional[int] = typer.Option(None, help="Tasks kept in memory [default: TOKENMILL_FLOWER_MAX_TASKS]."),
    url_prefix: str = typer.Option("", help="Serve under this path (behind a reverse proxy)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without a password (a trusted machine only)."),
) -> None:
    """Run Flower, the Celery monitor, on tokenmill's queues: workers, their engine figures, tasks."""
    from tokenmill.settings import Settings

    settings = Settings.from_env()
    if not settings.flower_password and not no_auth:
        typer.echo("error: Flower needs a password: set TOKENMILL_FLOWER_PASSWORD (user: TOKENMILL_FLOWER_USER, "
                   f"now {settings.flower_user!r}), or pass --no-auth on a machine only you can reach", err=True)
        raise typer.Exit(2)
    if ":" in settings.flower_user:
        typer.echo("error: TOKENMILL_FLOWER_USER must not contain ':'", err=True)
        raise typer.Exit(2)

    from tornado.options import options

    import flower.command  # noqa: F401 - defines Flower's options before they are set below
    from contract.celery_app import QueueConfig, declare_queues, make_celery
    from tokenmill.cli_api import served_models
    from workers.flower_format import format_task

    if not no_auth:
        _authenticate_metrics()
    app = make_celery(QueueConfig(redis_url=settings.redis_url, visibility_timeout_s=settings.visibility_timeout_s))
    declare_queues(app, list(served_models(settings)))  # Flower's broker page lists these queues
    options.format_task = format_task
    options.basic_auth = [] if no_auth else [f"{settings.flower_user}:{settings.flower_password}"]
    code = app.start(argv=flower_argv(host or settings.flower_host, port or settings.flower_port,
                                      max_tasks or settings.flower_max_tasks, url_prefix))
    raise typer.Exit(code or 0)


def _authenticate_metrics() -> None:
    """Flower serves /metrics (worker names, task names and counts) without asking for the
    password it asks everywhere else; behind basic auth, it asks there too (/healthcheck, which
    says only "OK", stays open for probes)."""
    import tornado.web
    from flower import urls
    from flower.views.monitor import Metrics

    class AuthenticatedMetrics(Metrics):
        @tornado.web.authenticated
        async def get(self) -> None:  # type: ignore[override]
            await super().get()

    urls.handlers[:] = [(h[0], AuthenticatedMetrics, *h[2:]) if isinstance(h, tuple) and h[1] is Metrics else h
                        for h in urls.handlers]
