"""Operations: /healthz (process up), /readyz (database, Redis, workers), /metrics (Prometheus)."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client.core import Metric
from sqlalchemy import text

from api.metrics import CONTENT_TYPE, queue_families, store_families, worker_families
from api.schemas.common import responses
from api.schemas.ops import Health, Readiness
from api.state import ApiState, get_state

# The health checks are open (no API key), and the schema says so (it overrides the global bearer).
log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])
OPEN = {"security": []}


@router.get("/healthz", response_model=Health, summary="Liveness", openapi_extra=OPEN, responses=responses())
async def healthz() -> Any:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


def _database_ok(state: ApiState) -> bool:
    try:
        with state.store.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def _workers_by_model(state: ApiState) -> dict[str, int] | None:
    try:
        workers = state.dispatcher.workers()
    except Exception:
        return None
    counts = {name: 0 for name in state.registry.names()}
    for w in workers:
        model = w.get("model", "")
        counts[model] = counts.get(model, 0) + 1
    return counts


@router.get("/readyz", response_model=Readiness, summary="Readiness", openapi_extra=OPEN,
            responses=responses({503: {"model": Readiness, "description": "not ready: see which part is missing"}}))
def readyz(state: ApiState = Depends(get_state)) -> Any:
    """Ready when the database and Redis answer and every served model has at least one live worker."""
    db = _database_ok(state)
    workers = _workers_by_model(state)
    redis_ok = workers is not None
    counts = {m: (workers or {}).get(m, 0) for m in state.registry.names()}
    ready = db and redis_ok and all(n > 0 for n in counts.values())
    body = {"status": "ready" if ready else "not_ready", "database": db, "redis": redis_ok, "workers": counts}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, openapi_extra=OPEN,
            responses=responses({200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}}))
def metrics(request: Request, state: ApiState = Depends(get_state)) -> Response:
    """Requests and accepted jobs (every API process), jobs by status, tokens per model, queue
    depth per queue, live workers, and every worker's histograms and engine figures
    (docs/observability.md). Tokens per tenant only with the admin key (``Authorization: Bearer``):
    the endpoint is open, tenant ids are not. Parts whose source is down are left out."""
    per_tenant = _is_admin(request, state.config.admin_key)

    def shared() -> list[Metric]:
        out: list[Metric] = []
        for part, read in (("store", lambda: store_families(state.store, per_tenant=per_tenant)),
                           ("queues", lambda: queue_families(state.dispatcher, state.registry.names())),
                           ("workers", lambda: worker_families(state.dispatcher.redis))):
            try:
                out += read()
            except Exception as e:  # noqa: BLE001 - a source that is down leaves its part out
                log.warning("/metrics: %s figures left out (%r)", part, e)
        return out

    return Response(state.metrics.exposition(shared), media_type=CONTENT_TYPE)


def _is_admin(request: Request, admin_key: str) -> bool:
    # No 401 here: without the admin key (or with a wrong one) the open figures are the answer.
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return bool(admin_key) and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                                   admin_key.encode())
