"""How a job's task is addressed: task names, one queue per model, priority steps inside a queue.

- One queue per model (`queue_for(model)`); inside a queue, Redis priority steps put interactive
  work (priority 0) ahead of bulk work (priority 9): a worker always drains the interactive list
  first, so interactive jobs overtake a bulk backlog.
- A task's id is the job id (the bulk task's id is its first job's id plus a suffix); its arguments
  are ids and a timestamp, never prompts: the job itself is read from the store.
"""

from __future__ import annotations

import re

TASK_GENERATE = "tokenmill.generate"  # args: [job_id, enqueued_at (unix seconds)]
TASK_GENERATE_BULK = "tokenmill.generate_bulk"  # args: [[job_id, ...], enqueued_at]
PRIORITY_INTERACTIVE = 0
PRIORITY_BULK = 9
PRIORITY_STEPS = list(range(10))
PRIORITY_SEP = ":"  # kombu keeps priority N of queue Q in the Redis list "Q:N" (N > 0)
BULK_CHUNK = 64  # jobs per bulk task
QUEUE_PREFIX = "tokenmill."


def queue_for(model: str) -> str:
    """The queue that holds a model's jobs: `tokenmill.<model name, safe characters only>`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/").split("/")[-1] if "/" in model else model)
    return f"{QUEUE_PREFIX}{safe}"


def priority_lists(queue: str) -> list[tuple[int, str]]:
    """The Redis lists kombu keeps for a queue's priority steps: ``queue`` for 0, ``queue:N`` for N."""
    return [(p, queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}") for p in PRIORITY_STEPS]


WORKER_QUEUE_SEP = ".w."


def worker_queue(model_queue: str, instance: str) -> str:
    """A worker instance's own queue beside its model's shared one (prefix routing,
    `contract.prefix_routing`): ``<model queue>.w.<instance>``, with the same priority steps."""
    return f"{model_queue}{WORKER_QUEUE_SEP}{instance}"


_WORKER_SUFFIX = re.compile(re.escape(WORKER_QUEUE_SEP) + r"[0-9a-f]{32}$")


def shared_queue_of(queue: str) -> str:
    """The model queue of a queue: itself, or the shared queue a worker queue belongs to."""
    return _WORKER_SUFFIX.sub("", queue)
