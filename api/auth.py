"""Bearer-key authentication. A tenant's key gives a `Principal` of that tenant; the admin key
(from the settings) gives an admin principal. Wrong, missing or revoked keys get 401."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from api.errors import ApiError
from contract.log_context import set_log_fields
from api.state import ApiState, get_state

log = logging.getLogger(__name__)

# A counter in Redis, bumped by whoever revokes a key or changes limits (the admin endpoints,
# `tokenmill keys revoke`, `tokenmill tenants limits`). Every API process reads it on each request:
# a cached key checked under an older count is checked against the store again, so a revocation
# or a new limit applies at once in every process.
REVOCATIONS_KEY = "tokenmill:keys:revocations"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant's key, or the admin key (``tenant_id`` None)."""

    tenant_id: str | None
    key_id: str | None
    admin: bool = False
    tenant_limits: dict[str, Any] | None = None  # the tenant's limits (api.limits), as stored
    key_limits: dict[str, Any] | None = None  # the key's own limits, as stored
    webhook_url: str | None = None  # the tenant's default completion webhook


class KeyCache:
    """Checked keys for a short time, so a busy client does not cost a database read per request.

    An entry holds only while the revocation count (``REVOCATIONS_KEY``) is the one it was checked
    under: any announced revocation, in any process, empties it at once. A revocation nobody
    announced (SQL by hand) takes effect within ``ttl_s`` seconds; with Redis unreachable nothing
    is cached.
    """

    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._entries: dict[str, tuple[float, Principal, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, generation: bytes | None = b"") -> Principal | None:
        with self._lock:
            hit = self._entries.get(digest)
        if hit is None or generation is None or hit[2] != generation or time.monotonic() - hit[0] > self._ttl:
            return None
        return hit[1]

    def put(self, digest: str, principal: Principal, generation: bytes | None = b"") -> None:
        if generation is None:
            return
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (time.monotonic(), principal, generation)

    def forget_key(self, key_id: str) -> None:
        with self._lock:
            for d in [d for d, (_, p, _) in self._entries.items() if p.key_id == key_id]:
                del self._entries[d]

    def forget_tenant(self, tenant_id: str) -> None:
        with self._lock:
            for d in [d for d, (_, p, _) in self._entries.items() if p.tenant_id == tenant_id]:
                del self._entries[d]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str:
    """The key of an ``Authorization: Bearer <key>`` header, or a 401."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("malformed Authorization header: use 'Bearer <key>'")
    return token.strip()


async def authenticate(request: Request, state: ApiState = Depends(get_state)) -> Principal:
    """The caller (a FastAPI dependency): a tenant's live key or the admin key; otherwise 401."""
    token = bearer_token(request)
    admin_key = state.config.admin_key
    if admin_key and hmac.compare_digest(token.encode(), admin_key.encode()):
        return Principal(None, None, admin=True)
    cache: KeyCache = request.app.state.key_cache
    digest = hashlib.sha256(token.encode()).hexdigest()
    generation = await _revocations(request)
    principal = cache.get(digest, generation)
    if principal is None:
        key = await run_in_threadpool(state.store.keys.authenticate, token)
        if key is None:
            raise _unauthorized("invalid or revoked API key")
        owner = await run_in_threadpool(state.store.keys.get_tenant, key.tenant_id)
        principal = Principal(key.tenant_id, key.id, tenant_limits=owner.limits if owner else None,
                              key_limits=key.limits, webhook_url=owner.webhook_url if owner else None)
        cache.put(digest, principal, generation)
    set_log_fields(tenant_id=principal.tenant_id)  # the rest of this request's log lines name it
    return principal


async def _revocations(request: Request) -> bytes | None:
    """The revocation count now (b"" before any), or None when Redis cannot say (then the store
    is asked for every request)."""
    client = getattr(request.app.state, "aioredis", None)
    if client is None:
        return None
    try:
        value = await asyncio.wait_for(client.get(REVOCATIONS_KEY), timeout=0.5)
    except Exception:  # noqa: BLE001 - Redis down or slow: check the key in the store instead
        return None
    return value or b""


def announce_revocation(client: Any) -> bool:
    """Tells every API process that a key was revoked (call it after the revocation is committed;
    ``client`` is a synchronous Redis client). False if Redis could not be told: processes then
    notice within their cache time (2 s)."""
    try:
        client.incr(REVOCATIONS_KEY)
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("could not announce a key revocation to the API processes: %r", exc)
        return False


async def tenant(principal: Principal = Depends(authenticate)) -> Principal:
    """A caller that acts as a tenant (the admin key owns no jobs, files or batches)."""
    if principal.tenant_id is None:
        raise ApiError(403, "the admin key manages tenants and keys; use a tenant's API key here",
                       code="tenant_key_required")
    return principal


async def admin(principal: Principal = Depends(authenticate)) -> Principal:
    """A caller holding the admin key; a tenant's key gets 403."""
    if not principal.admin:
        raise ApiError(403, "this endpoint needs the admin key", code="admin_key_required")
    return principal
