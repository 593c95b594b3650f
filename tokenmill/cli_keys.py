"""`tokenmill keys`: tenants and API keys from the command line (the same as the admin endpoints)."""

from __future__ import annotations

from typing import Optional

import typer

from tokenmill.settings import Settings

keys_app = typer.Typer(name="keys", help="Create, list and revoke API keys.", no_args_is_help=True,
                       add_completion=False)


def _store():  # type: ignore[no-untyped-def]
    from store import Store

    return Store.open(Settings.from_env().database_url)


@keys_app.command("create")
def create_command(
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant name (created if it does not exist)."),
    name: str | None = typer.Option(None, help="A label for the key."),
) -> None:
    """Create an API key for a tenant and print it (it is shown only this once)."""
    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant) or store.keys.create_tenant(tenant)
        key, plaintext = store.keys.create_key(t.id, name=name)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        store.close()
    typer.echo(plaintext)
    typer.echo(f"tenant {t.name} ({t.id}), key {key.id} ({key.prefix}...)", err=True)


@keys_app.command("list")
def list_command(tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant name."),
                 revoked: bool = typer.Option(False, help="Show revoked keys too.")) -> None:
    """List a tenant's keys (id, prefix, name, created, revoked)."""
    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant)
        if t is None:
            typer.echo(f"error: no tenant named {tenant!r}", err=True)
            raise typer.Exit(1)
        for k in store.keys.list_keys(t.id, include_revoked=revoked):
            typer.echo(f"{k.id}\t{k.prefix}...\t{k.name or ''}\t{k.created_at:%Y-%m-%d %H:%M}\t"
                       f"{'revoked ' + format(k.revoked_at, '%Y-%m-%d %H:%M') if k.revoked_at else 'live'}")
    finally:
        store.close()


@keys_app.command("revoke")
def revoke_command(key_id: str = typer.Argument(..., help="The key's id (key_...)."),
                   tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant name.")) -> None:
    """Revoke a key: it gets 401 from then on."""
    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant)
        if t is None or not store.keys.revoke_key(t.id, key_id):
            typer.echo(f"error: tenant {tenant!r} has no live key {key_id!r}", err=True)
            raise typer.Exit(1)
    finally:
        store.close()
    typer.echo(f"revoked {key_id}")
    import redis

    from api.auth import announce_revocation

    # Running API processes cache checked keys; this tells them to check again now.
    if not announce_revocation(redis.Redis.from_url(Settings.from_env().redis_url, socket_connect_timeout=2,
                                                    socket_timeout=2)):
        typer.echo("warning: Redis did not answer; running API processes refuse the key within 2 s", err=True)


@keys_app.command("limits")
def limits_command(
    key_id: str = typer.Argument(..., help="The key's id (key_...)."),
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant name."),
    limit: Optional[list[str]] = typer.Option(None, "--limit", "-l", help="NAME=VALUE, repeatable (as for "
                                                "`tokenmill tenants limits`); VALUE 'none' removes it."),
    clear: bool = typer.Option(False, help="Remove every limit of the key first."),
) -> None:
    """Show or change one key's own limits (they apply on top of its tenant's)."""
    from store.errors import NotFound
    from tokenmill.cli_tenants import _announce, _show, merged_limits

    store = _store()
    try:
        t = store.keys.tenant_by_name(tenant)
        key = None if t is None else next((k for k in store.keys.list_keys(t.id) if k.id == key_id), None)
        if t is None or key is None:
            typer.echo(f"error: tenant {tenant!r} has no live key {key_id!r}", err=True)
            raise typer.Exit(1)
        if limit or clear:
            try:
                key = store.limits.set_key_limits(t.id, key_id, merged_limits(key.limits, limit or [], clear))
            except NotFound as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            _announce()
        typer.echo(f"{key_id}: {_show(key.limits)}")
    finally:
        store.close()
