"""The API's settings as one plain object (built from `tokenmill.settings` at the edge)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiConfig:
    """Everything an API process needs to know.

    ``models`` maps each served model name to its model directory (the tokenizer and config are
    read from there to count prompt tokens; None: the model is served without token counting).
    """

    database_url: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    models: dict[str, str | None] = field(default_factory=dict)
    admin_key: str = ""
    queue_limit: int = 10_000
    max_body_bytes: int = 4 * 1024 * 1024
    max_file_bytes: int = 512 * 1024 * 1024
    batch_max_lines: int = 50_000
    default_max_tokens: int = 512
    sync_timeout_s: float = 600.0
    visibility_timeout_s: int = 3600
    batch_interval_s: float = 2.0  # how often each API process moves open batches along
    auth_cache_s: float = 2.0  # how long a checked API key is trusted before asking the store again
    run_batch_loop: bool = True
    reconcile_interval_s: float = 10.0  # how often the reconciler looks for jobs Redis lost (<= 0: never)
    reconcile_min_age_s: float = 30.0  # how long a job waits or runs before the reconciler looks for it
    metrics_multiprocess_dir: str = ""  # prometheus_client's directory shared by several API processes
    budget_status: int = 429  # the status of a request refused by a token budget (429 or 402)
    retention_days: int = 30  # the default retention of finished work (a tenant's own wins)
    purge_interval_s: float = 3600.0  # how often finished work past its retention is purged (<= 0: never)
    webhook_allow_private: bool = False  # webhooks may go to loopback, link-local and private addresses
    webhook_interval_s: float = 1.0  # how often completion webhooks are queued and sent (<= 0: never)
    settle_interval_s: float = 1.0  # how often finished jobs' token reservations are settled (<= 0: never)
    prefix_routing: bool = True  # jobs sharing a long prompt prefix go to the worker that has it cached
