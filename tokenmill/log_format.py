"""How a tokenmill process writes its logs: plain text (the default), or with
`TOKENMILL_LOG_FORMAT=json` one JSON object per line with the job, tenant and worker it concerns
(`contract.log_context`), for a log pipeline to index. Messages hold ids and counts, never a prompt
or an output (docs/observability.md)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from contract.log_context import LogFieldsFilter
from contract.queues import TASK_GENERATE

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's loggers keep handlers of their own and do not pass records up: in JSON they go to ours.
_OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the context's ids."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            **getattr(record, "tokenmill", {}),
        }
        # Celery's "received" and "succeeded" lines come from threads outside the task's context;
        # a one-job task's id is its job's id.
        args = record.args
        if "job_id" not in line and isinstance(args, dict) and args.get("name") == TASK_GENERATE:
            line["job_id"] = args.get("id")
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: str, level: str = "INFO", **process_fields: Any) -> None:
    """Sends this process's logs to stderr in ``log_format`` (``text`` or ``json``), with
    ``process_fields`` (``worker=...``) on every JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LogFieldsFilter(**process_fields))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        logging.captureWarnings(True)  # warnings become records (JSON lines) too
        for name in _OWN_HANDLERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
