"""The Redis names the API and the workers share besides the queues: token streams, cancellation,
and each worker's live engine figures."""

from __future__ import annotations

STREAM_CHANNEL = "tokenmill:stream:{job_id}"  # pub/sub: a running job's new text, then "done"
CANCEL_CHANNEL = "tokenmill:cancel"  # pub/sub: ids of jobs to abort wherever they run
WORKER_STATS_KEY = "tokenmill:worker:{hostname}"  # hash of live engine figures, with a TTL
WORKER_STATS_PATTERN = WORKER_STATS_KEY.format(hostname="*")  # every worker's hash (for SCAN)
# A worker's Prometheus metric families (contract.worker_metrics), refreshed with its figures and
# under the same TTL: the API's /metrics merges them (docs/observability.md).
WORKER_METRICS_KEY = "tokenmill:worker-metrics:{hostname}"
WORKER_METRICS_PATTERN = WORKER_METRICS_KEY.format(hostname="*")
# A worker refreshes its hash every second; one not refreshed for this long is gone.
WORKER_STATS_TTL_S = 15


def worker_of(stats_key: str | bytes) -> str:
    """The worker hostname in a `WORKER_STATS_KEY` (hostnames may hold colons themselves)."""
    key = stats_key.decode() if isinstance(stats_key, bytes) else stats_key
    return key.split(":", 2)[-1]  # the same for WORKER_METRICS_KEY

# Worker liveness (contract.liveness, docs/reliability.md): every worker process has an instance id,
# new on every start, and keeps this key alive while it lives; a key gone means the process is gone.
INSTANCE_KEY = "tokenmill:instance:{instance}"
HEARTBEAT_TTL_S = 5.0  # how long a heartbeat lasts unless renewed
HEARTBEAT_INTERVAL_S = 1.0  # how often a live worker renews it
# kombu delivery tag -> the worker instance holding that delivery (kept by contract.redis_transport
# beside kombu's own ``unacked`` hash, in the same transaction).
UNACKED_OWNER_KEY = "tokenmill:unacked_owner"
# A queue's bell (contract.redis_delivery): a stream that every push into the queue adds an entry
# to, so that idle consumers wait for work without taking it. Kept while pushed to.
QUEUE_BELL_KEY = "tokenmill:bell:{queue}"
QUEUE_BELL_TTL_S = 24 * 3600
