"""Batches, from the API's side: ingest the input file into bulk jobs and enqueue them, and move
open batches along until their output and error files are written.

Several API processes may run at once. Each runs the same small loop over the open batches of
every tenant; Redis locks make sure one process ingests or finalizes a batch at a time, and since
all state is in the store, any process can pick up where a dead one stopped (a batch left in
``validating`` is ingested again from scratch; one left in ``finalizing`` gets its files again).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from api.batch_ingest import Reserve, ingest_batch
from api.batch_lines import is_refused, refused_param, request_preparer
from api.config import ApiConfig
from api.errors import error_body
from api.formats import answer_for
from api.limits import Limiter, scopes_of
from api.queue import Dispatcher, QueueUnavailable
from api.registry import ModelRegistry
from store import Store
from store.errors import InvalidTransition, NotFound
from store.models import Batch
from store.sql import utcnow

log = logging.getLogger(__name__)

INGEST_LOCK_S = 900
FINALIZE_LOCK_S = 900
STALE_VALIDATING = timedelta(seconds=30)  # a validating batch nobody ingests after this is picked up
SEND_PAGE = 4096


class BatchRunner:
    """Ingests, enqueues and finalizes batches for one API process."""

    def __init__(self, config: ApiConfig, store: Store, dispatcher: Dispatcher, registry: ModelRegistry,
                 limiter: Limiter | None = None) -> None:
        self._config = config
        self._limiter = limiter
        self._store = store
        self._dispatcher = dispatcher
        self._registry = registry
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="batches")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-loop", daemon=True)

    def start(self) -> None:
        """Starts the periodic loop (if the config asks for it)."""
        if self._config.run_batch_loop:
            self._thread.start()

    def stop(self) -> None:
        """Stops the loop and waits for work in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- ingestion -------------------------------------------------------------------------------
    def schedule_ingest(self, tenant_id: str, batch_id: str) -> Future[None]:
        """Ingests and enqueues the batch in the background."""
        return self._pool.submit(self.ingest, tenant_id, batch_id)

    def ingest(self, tenant_id: str, batch_id: str) -> None:
        """Turns the input file into jobs (or fails the batch with per-line errors), then enqueues."""
        lock = f"batch-ingest:{batch_id}"
        if not self._dispatcher.lock(lock, INGEST_LOCK_S):
            return
        try:
            batch = self._store.batches.get(tenant_id, batch_id)
            if batch is None or batch.status != "validating":
                return
            prepare = request_preparer(batch.endpoint, self._registry,
                                       default_max_tokens=self._config.default_max_tokens)
            try:
                report = ingest_batch(self._store, tenant_id, batch_id, prepare=prepare,
                                      max_lines=self._config.batch_max_lines,
                                      reserve=self._reserver(tenant_id, batch.api_key_id, batch_id))
            except (InvalidTransition, NotFound) as exc:
                log.info("batch %s not ingested: %s", batch_id, exc)
                return
            if report.unsettled:
                self._limiter.release(report.unsettled)
            if report.stopped:
                log.info("batch %s left validating while it was ingested (%s): nothing is sent", batch_id,
                         report.stopped)
            elif report.ok and report.model:
                self.enqueue(tenant_id, batch_id, report.model)
        except Exception:
            log.exception("ingesting batch %s failed", batch_id)
        finally:
            self._dispatcher.unlock(lock)

    def _reserver(self, tenant_id: str, key_id: str | None, batch_id: str) -> Reserve | None:
        """What counts the batch's jobs against its tenant's and key's limits (None: it has none)."""
        if self._limiter is None:
            return None
        tenant = self._store.keys.get_tenant(tenant_id)
        key_limits = self._store.limits.key_limits(key_id) if key_id else None
        scopes = scopes_of(tenant_id, key_id, tenant.limits if tenant else None, key_limits)
        if not scopes:
            return None
        limiter = self._limiter
        return lambda jobs: limiter.admit(scopes, jobs, bulk=True)

    def enqueue(self, tenant_id: str, batch_id: str, model: str) -> int:
        """Sends the batch's queued jobs as bulk tasks; returns how many were sent. The store hands
        out a batch's jobs only while it is ``in_progress``: a batch cancelled meanwhile has no
        more of its tasks sent (and its jobs already sent are cancelled, so workers skip them)."""
        sent = 0
        page: list[str] = []
        try:
            for job_id in self._store.batches.queued_job_ids(tenant_id, batch_id, page_size=SEND_PAGE):
                page.append(job_id)
                if len(page) >= SEND_PAGE:
                    self._dispatcher.send_bulk(page, model)
                    sent += len(page)
                    page = []
            if page:
                self._dispatcher.send_bulk(page, model)
                sent += len(page)
        except QueueUnavailable as exc:
            # The jobs stay queued in the store; the reconciler sends what Redis did not take.
            log.warning("batch %s: Redis refused its tasks after %d sent: %s", batch_id, sent, exc)
        return sent

    # -- moving along ----------------------------------------------------------------------------
    def schedule_finalize(self, tenant_id: str, batch_id: str) -> Future[None]:
        """Writes the batch's files in the background (if it needs them)."""
        return self._pool.submit(self.finalize, tenant_id, batch_id)

    def needs_files(self, batch: Batch) -> bool:
        """Whether the batch waits for its output and error files."""
        return batch.status == "finalizing" or (batch.status in ("cancelled", "expired") and batch.output_file_id is None)

    def finalize(self, tenant_id: str, batch_id: str) -> None:
        """Writes the output and error files of a finalizing batch and completes it (or attaches
        them to a batch that ended cancelled or expired)."""
        lock = f"batch-finalize:{batch_id}"
        if not self._dispatcher.lock(lock, FINALIZE_LOCK_S):
            return
        try:
            batch = self._store.batches.get(tenant_id, batch_id)
            if batch is None or not self.needs_files(batch):
                return
            output_id, error_id = self._write_files(batch)
            if batch.status == "finalizing":
                self._store.batches.transition(tenant_id, batch_id, "completed", output_file_id=output_id,
                                               error_file_id=error_id)
            else:
                self._store.batches.attach_files(tenant_id, batch_id, output_file_id=output_id, error_file_id=error_id)
        except (InvalidTransition, NotFound) as exc:
            log.info("batch %s not finalized: %s", batch_id, exc)
        except Exception:
            log.exception("finalizing batch %s failed", batch_id)
        finally:
            self._dispatcher.unlock(lock)

    def _write_files(self, batch: Batch) -> tuple[str, str | None]:
        output = self._store.files.create(batch.tenant_id, self._lines(batch, ok=True), purpose="batch_output",
                                          filename=f"{batch.id}_output.jsonl")
        errors = self._store.files.create(batch.tenant_id, self._lines(batch, ok=False), purpose="batch_output",
                                          filename=f"{batch.id}_error.jsonl")
        if errors.bytes == 0:
            self._store.files.delete(batch.tenant_id, errors.id)
            return output.id, None
        return output.id, errors.id

    def _lines(self, batch: Batch, *, ok: bool) -> Iterator[bytes]:
        buf: list[bytes] = []
        size = 0
        for job, result, usage in self._store.batches.iter_outcomes(batch.tenant_id, batch.id):
            line = self._output_line(job, result, usage) if ok else self._error_line(job)
            if line is None:
                continue
            data = json.dumps(line, separators=(",", ":"), default=str).encode() + b"\n"
            buf.append(data)
            size += len(data)
            if size >= 256 * 1024:
                yield b"".join(buf)
                buf, size = [], 0
        if buf:
            yield b"".join(buf)

    def _output_line(self, job: Any, result: Any, usage: Any) -> dict[str, Any] | None:
        if result is None or job.status != "succeeded":
            return None
        return {"id": f"batch_req_{job.id}", "custom_id": job.custom_id,
                "response": {"status_code": 200, "request_id": job.id,
                             "body": answer_for(job, result, usage, self._registry)},
                "error": None}

    @staticmethod
    def _error_line(job: Any) -> dict[str, Any] | None:
        if job.status == "succeeded" or job.status in ("queued", "running"):
            return None
        code = job.error_code or ("batch_cancelled" if job.status == "cancelled" else job.status)
        message = job.error_message or {"cancelled": "the batch was cancelled before this request ran",
                                        "expired": "the batch expired before this request ran"}.get(job.status,
                                                                                                     "the request failed")
        if job.status == "failed":
            # A refused body, or a request the engine refused: the 400 its endpoint would answer.
            bad_request = is_refused(job.request) or job.error_code == "invalid_request"
            status = 400 if bad_request else 500
            return {"id": f"batch_req_{job.id}", "custom_id": job.custom_id,
                    "response": {"status_code": status, "request_id": job.id,
                                 "body": error_body(status, message, refused_param(job.request), code)},
                    "error": None}
        return {"id": f"batch_req_{job.id}", "custom_id": job.custom_id, "response": None,
                "error": {"code": code, "message": message}}

    def refresh(self, tenant_id: str, batch_id: str) -> Batch | None:
        """Moves one batch along now (cheap): what GET /v1/batches/{id} calls before answering."""
        batch = self._store.batches.get(tenant_id, batch_id)
        if batch is None:
            return None
        if batch.status in ("in_progress", "cancelling"):
            batch = self._store.batches.advance(tenant_id, batch_id)
        if self.needs_files(batch):
            self.schedule_finalize(tenant_id, batch_id)
        return batch

    def tick(self) -> None:
        """One pass over every open batch."""
        now = utcnow()
        for batch in self._store.batches.list_open():
            if self._stop.is_set():
                return
            try:
                if batch.status == "validating":
                    if now - batch.created_at > STALE_VALIDATING:
                        self.ingest(batch.tenant_id, batch.id)
                    continue
                if batch.status in ("in_progress", "cancelling"):
                    batch = self._store.batches.advance(batch.tenant_id, batch.id)
                if self.needs_files(batch):
                    self.finalize(batch.tenant_id, batch.id)
            except Exception:
                log.exception("moving batch %s along failed", batch.id)

    def _loop(self) -> None:
        while not self._stop.wait(self._config.batch_interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("batch loop pass failed")
