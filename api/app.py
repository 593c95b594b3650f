"""The app factory: `create_app(config)` wires the store, the queue, the model registry, the
routers, the error handlers and the request guard into one FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api.auth import KeyCache
from api.batch_runner import BatchRunner
from api.config import ApiConfig
from api.errors import install_error_handlers
from api.limits import Limiter
from api.metrics import ApiMetrics
from api.middleware import RequestGuard
from api.queue import Dispatcher
from api.reconciler import Reconciler
from api.registry import ModelRegistry
from api.purger import Purger
from api.routes.batches import batch_json
from api.settler import Settler
from api.webhooks import WebhookSender
from api.routes import admin, batches, files, jobs, openai, ops, usage
from api.state import ApiState
from api.submit import Submitter
from contract import tracing
from store import Store

log = logging.getLogger(__name__)

DESCRIPTION = """LLM generation jobs: submit one at a time or by the hundred thousand, follow them,
read their results and token usage. OpenAI-compatible completions, chat, files and batches.
Every endpoint except the health checks needs `Authorization: Bearer <API key>`."""


def create_app(config: ApiConfig, *, store: Store | None = None) -> FastAPI:
    """A ready-to-serve application for ``config`` (``store`` may be given to share one)."""
    own_store = store is None
    # Threads of the pool and the job writers share the connections; SQLite manages its own.
    pool = {"pool_size": 20, "max_overflow": 20} if config.database_url.startswith("postgresql") else {}
    the_store = store if store is not None else Store.open(config.database_url, **pool)
    dispatcher = Dispatcher(config.redis_url, visibility_timeout_s=config.visibility_timeout_s,
                            prefix_routing=config.prefix_routing)
    registry = ModelRegistry(config.models)
    metrics = ApiMetrics(config.metrics_multiprocess_dir)
    limiter = Limiter(dispatcher.redis, the_store, budget_status=config.budget_status)
    state = ApiState(config=config, store=the_store, dispatcher=dispatcher, registry=registry,
                     submitter=Submitter(the_store, dispatcher),
                     batches=BatchRunner(config, the_store, dispatcher, registry, limiter),
                     reconciler=Reconciler(the_store, dispatcher, interval_s=config.reconcile_interval_s,
                                           min_age_s=config.reconcile_min_age_s, on_resent=metrics.resent),
                     limiter=limiter,
                     settler=Settler(the_store, dispatcher, limiter, interval_s=config.settle_interval_s),
                     purger=Purger(the_store, dispatcher, default_days=config.retention_days,
                                   interval_s=config.purge_interval_s),
                     webhooks=WebhookSender(the_store, dispatcher, batch_json, allow_private=config.webhook_allow_private,
                                            interval_s=config.webhook_interval_s),
                     metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.aioredis = aioredis.Redis.from_url(config.redis_url, socket_connect_timeout=2)
        state.submitter.start()
        state.batches.start()
        state.reconciler.start()
        state.settler.start()
        state.purger.start()
        state.webhooks.start()
        try:
            yield
        finally:
            await state.submitter.stop()
            state.reconciler.stop()
            state.settler.stop()
            state.purger.stop()
            state.webhooks.stop()
            state.batches.stop()
            await app.state.aioredis.aclose()
            dispatcher.close()
            if own_store:
                the_store.close()
            tracing.flush()

    app = FastAPI(title="tokenmill", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.tokenmill = state
    app.state.key_cache = KeyCache(config.auth_cache_s)
    install_error_handlers(app)
    _document_errors_as_400(app)
    for module in (jobs, openai, files, batches, usage, admin, ops):
        app.include_router(module.router)
    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes,  # type: ignore[arg-type]
                       max_file_bytes=config.max_file_bytes, metrics=metrics)
    return app


def _document_errors_as_400(app: FastAPI) -> None:
    """FastAPI documents a 422 for every endpoint with input; this API answers 400 with
    ErrorResponse instead (OpenAI's convention), so the schema says that and nothing else."""

    def openapi() -> dict:  # type: ignore[type-arg]
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "an API key (tm-...) or the admin key"}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
