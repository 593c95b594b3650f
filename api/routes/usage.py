"""/v1/usage: token accounting of the caller's tenant (the admin key sees every tenant)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from api.auth import Principal, authenticate
from api.errors import ApiError
from api.schemas.common import AUTH, BAD, FORBIDDEN, IsoDate, responses
from api.schemas.usage import UsageReport
from api.state import ApiState, get_state

router = APIRouter(prefix="/v1/usage", tags=["usage"])

Group = Literal["tenant", "model", "api_key", "day", "hour"]


@router.get("", response_model=UsageReport, summary="Token usage", responses=responses(BAD, AUTH, FORBIDDEN))
def usage(
    who: Principal = Depends(authenticate), state: ApiState = Depends(get_state),
    group_by: Annotated[list[Group] | None, Query(description="repeat: model, api_key, day, hour (tenant: admin)")] = None,
    since: Annotated[IsoDate | None, Query(description="first UTC day, inclusive")] = None,
    until: Annotated[IsoDate | None, Query(description="last UTC day, inclusive")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    api_key_id: Annotated[str | None, Query(max_length=64)] = None,
    tenant_id: Annotated[str | None, Query(max_length=64, description="admin only: one tenant")] = None,
) -> Any:
    """Requests and tokens (prompt, cached prompt, completion) grouped as asked, for the caller's
    tenant; with the admin key, for every tenant (or the one named by ``tenant_id``)."""
    groups = list(dict.fromkeys(group_by or ["model"]))
    if who.admin:
        scope = tenant_id
    else:
        if tenant_id is not None and tenant_id != who.tenant_id:
            raise ApiError(403, "tenant_id is for the admin key; a tenant's key sees its own usage",
                           param="tenant_id", code="admin_key_required")
        if "tenant" in groups:
            groups.remove("tenant")
        scope = who.tenant_id
    if since is not None and until is not None and since > until:
        raise ApiError(400, "since must not be after until", param="since", code="invalid_value")
    buckets = state.store.usage.summary(scope, group_by=groups, since=since, until=until,  # type: ignore[arg-type]
                                        api_key_id=api_key_id, model=model)
    data = [{"tenant_id": b.tenant_id,
             "model": b.model, "api_key_id": b.api_key_id, "day": b.day, "hour": b.hour, "requests": b.requests,
             "prompt_tokens": b.prompt_tokens, "cached_prompt_tokens": b.cached_prompt_tokens,
             "completion_tokens": b.completion_tokens, "total_tokens": b.total_tokens} for b in buckets]
    return {"object": "list", "group_by": groups, "data": data}
