"""How Flower shows tokenmill's tasks: a job's id, its model and its token counts, never a prompt.

tokenmill's task arguments are already ids and a timestamp (prompts stay in the store), so this
is about readability first: ``['job_01J...', 1732712345.1]`` becomes ``model smollm2-135m-instruct · this job`` (the
task id is the job id), a bulk task's ids become ``64 bulk jobs: job_a … job_z``, and the return
value becomes ``succeeded · 37 in / 8 out tokens``. Anything else (another app's task sharing the broker) is cut short, so a
large argument never fills the page.

Flower passes each task (a copy of `celery.events.state.Task`, whose args, kwargs and result are
strings) to `format_task`, set as Flower's ``format_task`` option.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from contract.queues import QUEUE_PREFIX, TASK_GENERATE, TASK_GENERATE_BULK, shared_queue_of

MAX_SHOWN = 200  # characters of any other task's arguments or result
_JOB_ID = re.compile(r"['\"]([A-Za-z0-9_\-]{1,80})['\"]")


def _model(task: Any) -> str | None:
    for attr in ("routing_key", "queue"):
        value = getattr(task, attr, None)
        if isinstance(value, str) and value.startswith(QUEUE_PREFIX):
            return shared_queue_of(value)[len(QUEUE_PREFIX):]  # a routed task's too
    return None


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_SHOWN:
        return value[:MAX_SHOWN] + f"… ({len(value)} characters)"
    return value


def describe_args(name: str, args: str, model: str | None, task_id: str | None = None) -> str:
    """The readable form of a generate task's arguments: its model and its job(s)."""
    ids = _JOB_ID.findall(args or "")
    where = f"model {model}" if model else "model ?"
    if name == TASK_GENERATE_BULK:
        if not ids:
            return f"{where} · bulk jobs"
        span = ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"
        return f"{where} · {len(ids)} bulk jobs: {span}"
    if not ids:
        return _short(args)
    # A single job's task id is its job id, already in the UUID column.
    return f"{where} · this job" if ids[0] == task_id else f"{where} · job {ids[0]}"


def describe_result(result: Any) -> Any:
    """The readable form of a generate task's return value: outcomes and tokens in / out."""
    if not isinstance(result, str) or not result.startswith("{"):
        return _short(result)
    try:
        counts = ast.literal_eval(result)  # the worker's repr of a dict of ints; never executed
    except (ValueError, SyntaxError):
        return _short(result)
    if not isinstance(counts, dict):
        return _short(result)
    outcomes = {k: v for k, v in counts.items()
                if k not in ("prompt_tokens", "completion_tokens") and isinstance(v, int) and v}
    if list(outcomes.items()) == [("succeeded", 1)]:
        parts = ["succeeded"]
    else:
        parts = [f"{k} {v:,}" for k, v in outcomes.items()] or ["nothing to do"]
    if "prompt_tokens" in counts or "completion_tokens" in counts:
        parts.append(f"{counts.get('prompt_tokens', 0):,} in / {counts.get('completion_tokens', 0):,} out tokens")
    return " · ".join(parts)


def format_task(task: Any) -> Any:
    """Flower's ``format_task`` hook: returns the task with readable, redacted fields."""
    name = getattr(task, "name", None)
    if name in (TASK_GENERATE, TASK_GENERATE_BULK):
        task.args = describe_args(name, getattr(task, "args", "") or "", _model(task), getattr(task, "uuid", None))
        task.kwargs = ""
        if getattr(task, "result", None) is not None:
            task.result = describe_result(task.result)
    else:
        for field in ("args", "kwargs", "result"):
            if hasattr(task, field):
                setattr(task, field, _short(getattr(task, field)))
    return task
