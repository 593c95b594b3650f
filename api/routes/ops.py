"""Operations: /healthz (process up), /readyz (database, Redis, workers), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from api.metrics import family
from api.schemas.common import responses
from api.schemas.ops import Health, Readiness
from api.state import ApiState, get_state

# The health checks are open (no API key), and the schema says so (it overrides the global bearer).
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


_ENGINE_GAUGES = {
    "running": "Sequences running in the engine.",
    "waiting": "Sequences waiting in the engine.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_total": "KV cache blocks in all.",
    "tokens_per_s": "Tokens generated per second (last second).",
}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, openapi_extra=OPEN,
            responses=responses({200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}}))
def metrics(state: ApiState = Depends(get_state)) -> PlainTextResponse:
    """Requests (this process), jobs by status, queue depth per queue, tokens in and out per model,
    and the workers' engine gauges. Parts whose source is down are left out."""
    lines = state.metrics.lines()
    resent = dict(state.reconciler.resent_total)
    lines += family("tokenmill_api_reconciler_resent_total", "counter",
                    "Jobs whose task Redis had lost, sent again by this API process's reconciler.",
                    [({"status": s}, resent.get(s, 0)) for s in ("queued", "running")])
    try:
        counts = state.store.jobs.count_by_status()
        lines += family("tokenmill_jobs", "gauge", "Jobs by status (all tenants).",
                        [({"status": s}, n) for s, n in sorted(counts.items())])
        buckets = state.store.usage.summary(None, group_by=["model"])
        lines += family("tokenmill_tokens_total", "counter", "Tokens processed, by model and direction.",
                        [({"model": b.model or "", "direction": "in"}, b.prompt_tokens) for b in buckets]
                        + [({"model": b.model or "", "direction": "out"}, b.completion_tokens) for b in buckets]
                        + [({"model": b.model or "", "direction": "cached_in"}, b.cached_prompt_tokens)
                           for b in buckets])
    except Exception:
        pass
    try:
        depths = [state.dispatcher.depth(m, fresh=True) for m in state.registry.names()]
        lines += family("tokenmill_queue_depth", "gauge", "Tasks waiting in each queue, by class.",
                        [({"queue": d.queue, "class": "interactive"}, d.interactive) for d in depths]
                        + [({"queue": d.queue, "class": "bulk"}, d.bulk) for d in depths])
        workers = state.dispatcher.workers()
        lines += family("tokenmill_workers", "gauge", "Live workers per model.",
                        [({"model": m}, sum(1 for w in workers if w.get("model") == m))
                         for m in sorted({w.get("model", "") for w in workers} | set(state.registry.names()))])
        for name, help_text in _ENGINE_GAUGES.items():
            samples = []
            for w in workers:
                try:
                    samples.append(({"worker": w["hostname"], "model": w.get("model", "")}, float(w[name])))
                except (KeyError, ValueError):
                    continue
            lines += family(f"tokenmill_engine_{name}", "gauge", help_text, samples)
    except Exception:
        pass
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
