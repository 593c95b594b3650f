"""``Store``: the one object the API, the workers and the CLI hold to reach the database."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from store.batches import BatchStore
from store.db import Database
from store.files import FileStore
from store.jobs import JobStore
from store.keys import KeyStore
from store.limits import LimitStore
from store.models import Base
from store.retention import RetentionStore
from store.webhooks import WebhookStore
from store.usage import UsageStore


class Store:
    """The SQL store, grouped by what it holds.

    - ``keys``: tenants and API keys (:class:`store.keys.KeyStore`)
    - ``jobs``: jobs, results, worker claims and bulk finishing (:class:`store.jobs.JobStore`)
    - ``limits``: limits and retention of tenants and keys, and the sums they are checked against
      (:class:`store.limits.LimitStore`)
    - ``retention``: purging finished work past each tenant's retention
      (:class:`store.retention.RetentionStore`)
    - ``webhooks``: tenants' webhook settings and the delivery outbox (:class:`store.webhooks.WebhookStore`)
    - ``usage``: token accounting aggregates (:class:`store.usage.UsageStore`)
    - ``files``: streamed file content (:class:`store.files.FileStore`)
    - ``batches``: batch lifecycle, ingestion and counts (:class:`store.batches.BatchStore`)

    Every method runs its own short transaction and is safe to call from many threads. Rows come
    back as detached snapshots (plain attribute access, no lazy loading).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.keys = KeyStore(db)
        self.jobs = JobStore(db)
        self.usage = UsageStore(db)
        self.limits = LimitStore(db)
        self.retention = RetentionStore(db)
        self.webhooks = WebhookStore(db)
        self.files = FileStore(db)
        self.batches = BatchStore(db, self.files)

    @classmethod
    def open(cls, url: str | URL, *, engine: Engine | None = None, **engine_kwargs: object) -> "Store":
        """Opens the store at ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

        The schema must exist: run ``tokenmill db upgrade`` (or ``store.migrate.upgrade(url)``).
        """
        return cls(Database(url, engine=engine, **engine_kwargs))

    def create_all(self) -> None:
        """Creates every table directly from the models, without Alembic (tests and throwaway
        databases only; a real database is created with the migrations)."""
        Base.metadata.create_all(self.db.engine)

    def close(self) -> None:
        """Closes the store's pooled connections."""
        self.db.dispose()
