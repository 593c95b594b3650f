"""/v1/admin: tenants and API keys (the admin key only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from api.auth import KeyCache, Principal, admin, announce_revocation
from api.errors import ApiError
from api.schemas.admin import ApiKey as ApiKeyModel
from api.schemas.admin import (
    ApiKeyList,
    CreatedApiKey,
    KeyCreate,
    Limits,
    Tenant,
    TenantCreate,
    TenantList,
    TenantRevoked,
    TenantSettings,
    WebhookSecret,
)
from api.webhooks import WebhookUrlError, check_webhook_url
from api.schemas.common import AUTH, BAD, CONFLICT, FORBIDDEN, MEDIA, MISSING, TOO_LARGE, responses
from api.state import ApiState, get_state
from store.errors import Conflict, NotFound

router = APIRouter(prefix="/v1/admin", tags=["admin"])
_COMMON = (AUTH, FORBIDDEN)


def _tenant(t: Any) -> dict[str, Any]:
    return {"id": t.id, "object": "tenant", "name": t.name, "created_at": t.created_at, "limits": t.limits or {},
            "retention_days": t.retention_days, "webhook_url": t.webhook_url, "weight": t.weight}


def _key(k: Any) -> dict[str, Any]:
    return {"id": k.id, "object": "api_key", "tenant_id": k.tenant_id, "name": k.name, "prefix": k.prefix,
            "created_at": k.created_at, "revoked_at": k.revoked_at, "limits": k.limits or {}}


def _require_tenant(state: ApiState, tenant_id: str) -> Any:
    t = state.store.keys.get_tenant(tenant_id)
    if t is None:
        raise ApiError(404, f"no tenant {tenant_id!r}", code="tenant_not_found")
    return t


@router.post("/tenants", response_model=Tenant, status_code=201, summary="Create a tenant",
             responses=responses(BAD, *_COMMON, CONFLICT, TOO_LARGE, MEDIA))
def create_tenant(body: TenantCreate, _: Principal = Depends(admin), state: ApiState = Depends(get_state)) -> Any:
    """A new tenant (names are unique)."""
    try:
        return _tenant(state.store.keys.create_tenant(body.name))
    except Conflict as exc:
        raise ApiError(409, str(exc), param="name", code="tenant_exists") from None


@router.get("/tenants", response_model=TenantList, summary="List tenants", responses=responses(*_COMMON))
def list_tenants(_: Principal = Depends(admin), state: ApiState = Depends(get_state)) -> Any:
    """Every tenant."""
    return {"object": "list", "data": [_tenant(t) for t in state.store.keys.list_tenants()]}


@router.delete("/tenants/{tenant_id}", response_model=TenantRevoked, summary="Revoke a tenant",
               responses=responses(*_COMMON, MISSING))
def revoke_tenant(tenant_id: str, request: Request, _: Principal = Depends(admin),
                  state: ApiState = Depends(get_state)) -> Any:
    """Revokes every key of the tenant (its jobs, files and usage are kept)."""
    _require_tenant(state, tenant_id)
    n = sum(1 for k in state.store.keys.list_keys(tenant_id) if state.store.keys.revoke_key(tenant_id, k.id))
    cache: KeyCache = request.app.state.key_cache
    cache.forget_tenant(tenant_id)
    announce_revocation(state.dispatcher.redis)  # the other API processes check their cached keys again
    return {"id": tenant_id, "object": "tenant", "revoked_keys": n}


@router.post("/tenants/{tenant_id}/keys", response_model=CreatedApiKey, status_code=201,
             summary="Create an API key", responses=responses(BAD, *_COMMON, MISSING, TOO_LARGE, MEDIA))
def create_key(tenant_id: str, body: KeyCreate | None = None, _: Principal = Depends(admin),
               state: ApiState = Depends(get_state)) -> Any:
    """A new key for the tenant; the answer holds the key itself, shown only this once."""
    try:
        key, plaintext = state.store.keys.create_key(tenant_id, name=body.name if body else None)
    except NotFound:
        raise ApiError(404, f"no tenant {tenant_id!r}", code="tenant_not_found") from None
    return {**_key(key), "key": plaintext}


@router.get("/tenants/{tenant_id}/keys", response_model=ApiKeyList, summary="List a tenant's keys",
            responses=responses(*_COMMON, MISSING))
def list_keys(tenant_id: str, include_revoked: bool = False, _: Principal = Depends(admin),
              state: ApiState = Depends(get_state)) -> Any:
    """The tenant's keys (never their plaintext)."""
    _require_tenant(state, tenant_id)
    return {"object": "list", "data": [_key(k) for k in state.store.keys.list_keys(
        tenant_id, include_revoked=include_revoked)]}


@router.delete("/tenants/{tenant_id}/keys/{key_id}", response_model=ApiKeyModel, summary="Revoke an API key",
               responses=responses(*_COMMON, MISSING))
def revoke_key(tenant_id: str, key_id: str, request: Request, _: Principal = Depends(admin),
               state: ApiState = Depends(get_state)) -> Any:
    """Revokes the key: it gets 401 from now on, from every API process."""
    _require_tenant(state, tenant_id)
    state.store.keys.revoke_key(tenant_id, key_id)
    key = next((k for k in state.store.keys.list_keys(tenant_id, include_revoked=True) if k.id == key_id), None)
    if key is None:
        raise ApiError(404, f"no key {key_id!r} for tenant {tenant_id!r}", code="key_not_found")
    cache: KeyCache = request.app.state.key_cache
    cache.forget_key(key_id)
    announce_revocation(state.dispatcher.redis)
    return _key(key)


def _limits_changed(request: Request, state: ApiState, tenant_id: str) -> None:
    """Cached keys carry their limits: every API process reads them again (as after a revocation)."""
    cache: KeyCache = request.app.state.key_cache
    cache.forget_tenant(tenant_id)
    announce_revocation(state.dispatcher.redis)


@router.get("/tenants/{tenant_id}", response_model=Tenant, summary="Read a tenant",
            responses=responses(*_COMMON, MISSING))
def get_tenant(tenant_id: str, _: Principal = Depends(admin), state: ApiState = Depends(get_state)) -> Any:
    """The tenant, with its limits and retention."""
    return _tenant(_require_tenant(state, tenant_id))


@router.patch("/tenants/{tenant_id}", response_model=Tenant, summary="Change a tenant's settings",
              responses=responses(BAD, *_COMMON, MISSING, TOO_LARGE, MEDIA))
def update_tenant(tenant_id: str, body: TenantSettings, request: Request, _: Principal = Depends(admin),
                  state: ApiState = Depends(get_state)) -> Any:
    """Sets the fields given: ``retention_days`` (null: the operator's default), ``webhook_url``
    (the default completion webhook of the tenant's jobs and batches; null: none) and ``weight``
    (fair share; it applies to jobs workers claim from then on)."""
    _require_tenant(state, tenant_id)
    if "webhook_url" in body.model_fields_set and body.webhook_url is not None:
        try:
            check_webhook_url(body.webhook_url, allow_private=state.config.webhook_allow_private)
        except WebhookUrlError as exc:
            raise ApiError(400, str(exc), param="webhook_url", code="invalid_webhook_url") from None
    try:
        if body.weight is not None:
            state.store.limits.set_weight(tenant_id, body.weight)
        if "retention_days" in body.model_fields_set:
            state.store.limits.set_retention(tenant_id, body.retention_days)
        if "webhook_url" in body.model_fields_set:
            state.store.webhooks.set_tenant_webhook(tenant_id, body.webhook_url)
            _limits_changed(request, state, tenant_id)  # cached keys carry the default webhook too
    except NotFound:
        raise ApiError(404, f"no tenant {tenant_id!r}", code="tenant_not_found") from None
    return _tenant(_require_tenant(state, tenant_id))


@router.put("/tenants/{tenant_id}/limits", response_model=Tenant, summary="Set a tenant's limits",
            responses=responses(BAD, *_COMMON, MISSING, TOO_LARGE, MEDIA))
def set_tenant_limits(tenant_id: str, body: Limits, request: Request, _: Principal = Depends(admin),
                      state: ApiState = Depends(get_state)) -> Any:
    """Replaces the tenant's limits (a field left out: no limit); every API process applies them at
    once."""
    try:
        t = state.store.limits.set_tenant_limits(tenant_id, body.stored())
    except NotFound:
        raise ApiError(404, f"no tenant {tenant_id!r}", code="tenant_not_found") from None
    _limits_changed(request, state, tenant_id)
    return _tenant(t)


@router.put("/tenants/{tenant_id}/keys/{key_id}/limits", response_model=ApiKeyModel, summary="Set a key's limits",
            responses=responses(BAD, *_COMMON, MISSING, TOO_LARGE, MEDIA))
def set_key_limits(tenant_id: str, key_id: str, body: Limits, request: Request, _: Principal = Depends(admin),
                   state: ApiState = Depends(get_state)) -> Any:
    """Replaces one key's own limits, which apply on top of its tenant's."""
    try:
        k = state.store.limits.set_key_limits(tenant_id, key_id, body.stored())
    except NotFound:
        raise ApiError(404, f"no key {key_id!r} for tenant {tenant_id!r}", code="key_not_found") from None
    _limits_changed(request, state, tenant_id)
    return _key(k)


@router.get("/tenants/{tenant_id}/webhook-secret", response_model=WebhookSecret,
            summary="Read a tenant's webhook signing secret", responses=responses(*_COMMON, MISSING))
def webhook_secret(tenant_id: str, _: Principal = Depends(admin), state: ApiState = Depends(get_state)) -> Any:
    """The secret the tenant's webhook deliveries are signed with (made on first use)."""
    try:
        return {"tenant_id": tenant_id, "secret": state.store.webhooks.secret(tenant_id)}
    except NotFound:
        raise ApiError(404, f"no tenant {tenant_id!r}", code="tenant_not_found") from None


@router.post("/tenants/{tenant_id}/webhook-secret", response_model=WebhookSecret,
             summary="Rotate a tenant's webhook signing secret", responses=responses(*_COMMON, MISSING))
def rotate_webhook_secret(tenant_id: str, _: Principal = Depends(admin), state: ApiState = Depends(get_state)) -> Any:
    """Replaces the signing secret; deliveries from now on are signed with the new one."""
    try:
        return {"tenant_id": tenant_id, "secret": state.store.webhooks.secret(tenant_id, rotate=True)}
    except NotFound:
        raise ApiError(404, f"no tenant {tenant_id!r}", code="tenant_not_found") from None
