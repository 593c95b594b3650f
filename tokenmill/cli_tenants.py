"""`tokenmill tenants` (list, limits, retention) and `tokenmill keys limits`: the same as the admin
endpoints, straight on the store. Limits are validated by the API's `Limits` schema (their one home)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from tokenmill.settings import Settings

tenants_app = typer.Typer(name="tenants", help="List tenants, set their limits, retention and weight.",
                          no_args_is_help=True, add_completion=False)

LIMIT_HELP = ("NAME=VALUE, repeatable: requests_per_minute, tokens_per_minute, max_queued_jobs, max_batch_tokens, "
              "daily_tokens, monthly_tokens; VALUE 'none' removes that limit.")


def _store():  # type: ignore[no-untyped-def]
    from store import Store

    return Store.open(Settings.from_env().database_url)


def merged_limits(current: dict[str, Any] | None, pairs: list[str], clear: bool) -> dict[str, int] | None:
    """The limits after applying ``NAME=VALUE`` pairs to ``current``; exits 2 naming a bad pair."""
    from pydantic import ValidationError

    from api.schemas.admin import Limits

    limits: dict[str, Any] = {} if clear else dict(current or {})
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            typer.echo(f"error: --limit {pair!r}: write NAME=VALUE (e.g. daily_tokens=100000)", err=True)
            raise typer.Exit(2)
        limits[name.strip()] = None if value.strip().lower() in ("none", "") else value.strip()
    try:
        return Limits.model_validate(limits).stored()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        typer.echo(f"error: {where}: {first['msg']}; {LIMIT_HELP}", err=True)
        raise typer.Exit(2) from None


def _announce() -> None:
    import redis

    from api.auth import announce_revocation

    # Running API processes cache keys with their limits; this tells them to read them again now.
    if not announce_revocation(redis.Redis.from_url(Settings.from_env().redis_url, socket_connect_timeout=2,
                                                    socket_timeout=2)):
        typer.echo("warning: Redis did not answer; running API processes apply the limits within 2 s", err=True)


def _show(limits: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((limits or {}).items())) or "no limits"


@tenants_app.command("list")
def list_command() -> None:
    """List tenants: id, name, limits, retention."""
    store = _store()
    try:
        for t in store.keys.list_tenants():
            retention = f"{t.retention_days} d" if t.retention_days else "default retention"
            typer.echo(f"{t.id}\t{t.name}\tweight {t.weight:g}\t{_show(t.limits)}\t{retention}")
    finally:
        store.close()


@tenants_app.command("limits")
def limits_command(
    tenant: str = typer.Argument(..., help="Tenant name."),
    limit: Optional[list[str]] = typer.Option(None, "--limit", "-l", help=LIMIT_HELP),
    clear: bool = typer.Option(False, help="Remove every limit first."),
) -> None:
    """Show or change a tenant's limits (with no --limit and no --clear: show them)."""
    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant)
        if t is None:
            typer.echo(f"error: no tenant named {tenant!r}", err=True)
            raise typer.Exit(1)
        if limit or clear:
            t = store.limits.set_tenant_limits(t.id, merged_limits(t.limits, limit or [], clear))
            _announce()
        typer.echo(f"{t.name}: {_show(t.limits)}")
    finally:
        store.close()


@tenants_app.command("retention")
def retention_command(
    tenant: str = typer.Argument(..., help="Tenant name."),
    days: Optional[int] = typer.Option(None, min=1, help="Days finished work is kept."),
    default: bool = typer.Option(False, "--default", help="Use the operator's default (TOKENMILL_RETENTION_DAYS)."),
) -> None:
    """Show or set how long a tenant's finished jobs, results, files and batches are kept."""
    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant)
        if t is None:
            typer.echo(f"error: no tenant named {tenant!r}", err=True)
            raise typer.Exit(1)
        if days is not None or default:
            t = store.limits.set_retention(t.id, None if default else days)
        shown = f"{t.retention_days} days" if t.retention_days else f"default ({Settings.from_env().retention_days} days)"
        typer.echo(f"{t.name}: retention {shown}")
    finally:
        store.close()


@tenants_app.command("weight")
def weight_command(
    tenant: str = typer.Argument(..., help="Tenant name."),
    weight: Optional[float] = typer.Argument(None, help="New weight (positive; default 1)."),
) -> None:
    """Show or set a tenant's fair-share weight: workers share their capacity between tenants with
    work in proportion to their weights."""
    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant)
        if t is None:
            typer.echo(f"error: no tenant named {tenant!r}", err=True)
            raise typer.Exit(1)
        if weight is not None:
            try:
                t = store.limits.set_weight(t.id, weight)
            except ValueError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
        typer.echo(f"{t.name}: weight {t.weight:g}")
    finally:
        store.close()
