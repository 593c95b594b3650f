"""`tokenmill purge`: removes finished work past each tenant's retention (as the API does hourly)."""

from __future__ import annotations

from typing import Optional

import typer

from tokenmill.settings import Settings


def purge_command(
    tenant: Optional[str] = typer.Option(None, "--tenant", "-t", help="Only this tenant (its name)."),
) -> None:
    """Purge finished jobs, results, files and batches older than each tenant's retention
    (TOKENMILL_RETENTION_DAYS unless the tenant has its own). Usage is kept, summed per hour."""
    from store import Store

    settings = Settings.from_env()
    store = Store.open(settings.database_url)
    try:
        tenant_id = None
        if tenant is not None:
            t = store.keys.tenant_by_name(tenant)
            if t is None:
                typer.echo(f"error: no tenant named {tenant!r}", err=True)
                raise typer.Exit(1)
            tenant_id = t.id
        report = store.retention.purge(settings.retention_days, tenant_id=tenant_id)
    finally:
        store.close()
    typer.echo(f"purged {report.jobs} jobs, {report.batches} batches, {report.files} files; "
               f"{report.usage_rows_folded} usage rows kept as hourly sums")
