"""Tenants and API keys. A key is random, shown once, and stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from store.db import Database
from store.errors import Conflict, NotFound
from store.models import ApiKey, Tenant
from store.sql import new_id, utcnow

KEY_PREFIX = "tm-"


def hash_key(plaintext: str) -> str:
    """The stored form of a key. Keys carry 256 random bits, so a plain SHA-256 is enough
    (no salt or slow hash needed: there is nothing to brute-force)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


class KeyStore:
    """Tenants and their API keys."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create_tenant(self, name: str) -> Tenant:
        """Creates a tenant. Raises Conflict if the name is taken (names are unique)."""
        if not name or len(name) > 200:
            raise ValueError(f"tenant name must be 1 to 200 characters, got {len(name)}")
        tenant = Tenant(id=new_id("ten_"), name=name, created_at=utcnow(), weight=1.0)
        try:
            self._db.transact(lambda s: s.add(tenant))
        except IntegrityError:
            raise Conflict(f"a tenant named {name!r} already exists; pick another name") from None
        return tenant

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant with this id, or None."""
        with self._db.read() as s:
            return s.get(Tenant, tenant_id)

    def list_tenants(self) -> list[Tenant]:
        """Every tenant, oldest first (for administrators)."""
        with self._db.read() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)))

    def tenant_by_name(self, name: str) -> Tenant | None:
        """The tenant with this name, or None."""
        with self._db.read() as s:
            return s.scalar(select(Tenant).where(Tenant.name == name))

    def create_key(self, tenant_id: str, name: str | None = None) -> tuple[ApiKey, str]:
        """Creates an API key for the tenant and returns it with its plaintext.

        The plaintext is returned only here; the store keeps its hash. Raises NotFound for an
        unknown tenant.
        """
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=new_id("key_"),
            tenant_id=tenant_id,
            name=name,
            prefix=plaintext[:11],
            key_hash=hash_key(plaintext),
            created_at=utcnow(),
            revoked_at=None,
        )

        def work(s):  # type: ignore[no-untyped-def]
            if s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}; create it first")
            s.add(key)

        self._db.transact(work)
        return key, plaintext

    def authenticate(self, plaintext: str) -> ApiKey | None:
        """The live (not revoked) key with this plaintext, or None."""
        if not plaintext.startswith(KEY_PREFIX):
            return None
        with self._db.read() as s:
            return s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)))

    def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        """Revokes the tenant's key. False if the tenant has no such key or it was already revoked."""

        def work(s):  # type: ignore[no-untyped-def]
            result = s.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            return result.rowcount == 1

        return self._db.transact(work)

    def list_keys(self, tenant_id: str, *, include_revoked: bool = False) -> list[ApiKey]:
        """The tenant's keys, oldest first (hashes included, plaintexts never)."""
        stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            stmt = stmt.where(ApiKey.revoked_at.is_(None))
        with self._db.read() as s:
            return list(s.scalars(stmt))
