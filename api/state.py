"""What one API process holds: the store, the queue dispatcher, the model registry, the submitter,
the batch runner, the reconciler and the request metrics. Built by `create_app` and reached through
`get_state`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from api.batch_runner import BatchRunner
from api.config import ApiConfig
from api.limits import Limiter
from api.metrics import ApiMetrics
from api.queue import Dispatcher
from api.reconciler import Reconciler
from api.registry import ModelRegistry
from api.purger import Purger
from api.settler import Settler
from api.webhooks import WebhookSender
from api.submit import Submitter
from store import Store


@dataclass
class ApiState:
    """The long-lived parts of an API process."""

    config: ApiConfig
    store: Store
    dispatcher: Dispatcher
    registry: ModelRegistry
    submitter: Submitter
    batches: BatchRunner
    reconciler: Reconciler
    limiter: Limiter
    settler: Settler
    purger: Purger
    webhooks: WebhookSender
    metrics: ApiMetrics = field(default_factory=ApiMetrics)


def get_state(request: Request) -> ApiState:
    """The process's state (a FastAPI dependency)."""
    return request.app.state.tokenmill  # type: ignore[no-any-return]
