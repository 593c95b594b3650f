"""tokenmill's HTTP API (FastAPI): async jobs, OpenAI-compatible completions and chat, Files and
Batches, usage, admin, health and metrics.

The API process never imports torch or the engine: it validates requests itself, writes jobs to the
store, and sends their tasks to the workers through the queue (``contract.celery_app``).
"""

from api.app import create_app
from api.config import ApiConfig

__all__ = ["ApiConfig", "create_app"]
