"""Batches (OpenAI Batches API): lifecycle, ingestion of the input file into bulk jobs, counts.

Lifecycle::

    validating -> in_progress -> finalizing -> completed
         |             |             +-------> failed | expired
         +-> failed    +-> expired
         +-> cancelling <-+ (from validating, in_progress or finalizing) -> cancelled

While a batch runs its request counts are counted from its jobs; when it reaches a final state
they are written into the batch row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import InvalidTransition, NotFound
from store.files import FileStore
from store.jobs import insert_jobs
from store.models import Batch, Job, Result, Usage
from store.sql import chunked, new_id, paged_ids, utcnow
from store.types import BatchCounts, IngestReport, JobSpec

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
FINAL = ("completed", "failed", "expired", "cancelled")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "validating": ("in_progress", "failed", "cancelling"),
    "in_progress": ("finalizing", "expired", "cancelling"),
    "finalizing": ("completed", "failed", "expired", "cancelling"),
    "cancelling": ("cancelled",),
}
MAX_ERRORS = 50
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # how an unpaired surrogate gets into a line


def _no_constant(name: str) -> float:
    """json.loads hook: NaN and Infinity are no JSON (and no database takes them in a JSON value)."""
    raise ValueError(f"{name} is not a JSON number")


def _storable(text: str, *, nul_ok: bool = False) -> bool:
    """Whether a text column takes ``text``: UTF-8 (no unpaired surrogate) and, unless ``nul_ok``,
    no NUL (PostgreSQL refuses it in text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return nul_ok or "\x00" not in text


# A hook that checks one request body; returns an error message, or None when the body is fine.
BodyValidator = Callable[[dict[str, Any]], "str | None"]
# A hook that checks one request body and turns it into the job's stored request: returns the
# request (a dict), or an error message (a str).
BodyPreparer = Callable[[dict[str, Any]], "dict[str, Any] | str"]


def _window(completion_window: str) -> timedelta:
    m = _WINDOW.match(completion_window)
    if not m:
        raise ValueError(f"completion_window {completion_window!r} must be hours, like '24h'")
    return timedelta(hours=int(m.group(1)))


class _LeftValidating(Exception):
    """The batch being ingested is no longer ``validating`` (cancelled, or gone)."""

    def __init__(self, status: str | None) -> None:
        super().__init__(status)
        self.status = status or "deleted"


def _locked_status(s: Session, batch_id: str) -> str | None:
    """The batch's status, its row locked until the transaction ends (None: no such batch)."""
    return s.scalar(select(Batch.status).where(Batch.id == batch_id).with_for_update())


def _cancel_queued(s: Session, batch_id: str, status: str | None, now: datetime) -> None:
    """A batch cancelled while it was being ingested keeps no queued job (its cancel may have run
    before the last jobs were inserted)."""
    if status in ("cancelling", "cancelled"):
        s.execute(update(Job).where(Job.batch_id == batch_id, Job.status == "queued")
                  .values(status="cancelled", finished_at=now))


def _counts(s: Session, batch: Batch) -> BatchCounts:
    if batch.status in FINAL:
        done = batch.completed + batch.failed
        return BatchCounts(batch.total, batch.completed, batch.failed, max(batch.total - done, 0), 0)
    rows = dict(s.execute(select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)).all())
    return BatchCounts(
        total=batch.total,
        completed=rows.get("succeeded", 0),
        failed=rows.get("failed", 0) + rows.get("expired", 0),
        cancelled=rows.get("cancelled", 0),
        pending=rows.get("queued", 0) + rows.get("running", 0),
    )


class BatchStore:
    """Batches, their jobs and their counts."""

    def __init__(self, db: Database, files: FileStore) -> None:
        self._db = db
        self._files = files

    def create(
        self,
        tenant_id: str,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        api_key_id: str | None = None,
    ) -> Batch:
        """Creates a batch in ``validating`` status over one of the tenant's ``batch`` files.

        Raises NotFound if the tenant has no such uploaded file, ValueError for a file of another
        purpose, an endpoint not in ENDPOINTS or a malformed completion window.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}")
        window = _window(completion_window)
        file = self._files.get(tenant_id, input_file_id)
        if file is None or file.status != "uploaded":
            raise NotFound(f"no file {input_file_id!r} for this tenant; upload it with purpose 'batch' first")
        if file.purpose != "batch":
            raise ValueError(f"file {input_file_id!r} has purpose {file.purpose!r}; a batch input needs 'batch'")
        now = utcnow()
        batch = Batch(
            id=new_id("batch_"),
            tenant_id=tenant_id,
            api_key_id=api_key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status="validating",
            metadata_=metadata,
            errors=None,
            total=0,
            completed=0,
            failed=0,
            created_at=now,
            expires_at=now + window,
        )
        self._db.transact(lambda s: s.add(batch))
        return batch

    def get(self, tenant_id: str, batch_id: str) -> Batch | None:
        """The tenant's batch, or None."""
        with self._db.read() as s:
            return s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))

    def list_batches(self, tenant_id: str, *, limit: int = 20, after: str | None = None) -> list[Batch]:
        """The tenant's batches, newest first; ``after`` is the id of the last batch of the previous page."""
        stmt = select(Batch).where(Batch.tenant_id == tenant_id)
        with self._db.read() as s:
            if after is not None:
                anchor = s.scalar(select(Batch).where(Batch.id == after, Batch.tenant_id == tenant_id))
                if anchor is None:
                    raise NotFound(f"no batch {after!r} for this tenant to list after")
                stmt = stmt.where(
                    (Batch.created_at < anchor.created_at)
                    | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id))
                )
            return list(s.scalars(stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))

    def list_open(self, *, limit: int = 1000) -> list[Batch]:
        """Batches of every tenant that still need attention, oldest first (for the process that
        moves batches along): not final, or final (cancelled or expired) with no output file yet.
        """
        stmt = (
            select(Batch)
            .where(
                Batch.status.not_in(FINAL)
                | (Batch.status.in_(("cancelled", "expired")) & Batch.output_file_id.is_(None))
            )
            .order_by(Batch.created_at, Batch.id)
            .limit(limit)
        )
        with self._db.read() as s:
            return list(s.scalars(stmt))

    def attach_files(
        self, tenant_id: str, batch_id: str, *, output_file_id: str | None, error_file_id: str | None
    ) -> Batch:
        """Sets the output and error files of a batch that ended cancelled or expired (the requests
        that ran before it stopped are kept). Raises NotFound, or InvalidTransition for a batch in
        another status."""

        def work(s: Session) -> Batch:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            if batch is None:
                raise NotFound(f"no batch {batch_id!r} for this tenant")
            if batch.status not in ("cancelled", "expired"):
                raise InvalidTransition(f"batch {batch_id} is {batch.status}; files attach only to a cancelled or expired batch")
            s.execute(
                update(Batch)
                .where(Batch.id == batch_id)
                .values(output_file_id=output_file_id, error_file_id=error_file_id)
            )
            s.refresh(batch)
            return batch

        return self._db.transact(work)

    def token_totals(self, tenant_id: str, batch_id: str) -> tuple[int, int, int]:
        """Prompt, cached prompt and completion tokens spent so far by the batch's requests."""
        stmt = (
            select(
                func.coalesce(func.sum(Usage.prompt_tokens), 0),
                func.coalesce(func.sum(Usage.cached_prompt_tokens), 0),
                func.coalesce(func.sum(Usage.completion_tokens), 0),
            )
            .select_from(Job)
            .join(Usage, Usage.job_id == Job.id)
            .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id)
        )
        with self._db.read() as s:
            row = s.execute(stmt).one()
            return int(row[0]), int(row[1]), int(row[2])

    def count_batches(self, tenant_id: str) -> int:
        """How many batches the tenant has."""
        with self._db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Batch).where(Batch.tenant_id == tenant_id)) or 0)

    def counts(self, tenant_id: str, batch_id: str) -> BatchCounts | None:
        """The batch's request counts, or None if the tenant has no such batch."""
        with self._db.read() as s:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            return None if batch is None else _counts(s, batch)

    def job_by_custom_id(self, tenant_id: str, batch_id: str, custom_id: str) -> Job | None:
        """The batch's job for one input line, or None."""
        with self._db.read() as s:
            return s.scalar(
                select(Job).where(Job.batch_id == batch_id, Job.custom_id == custom_id, Job.tenant_id == tenant_id)
            )

    # -- ingestion ----------------------------------------------------------------------------

    def ingest(
        self,
        tenant_id: str,
        batch_id: str,
        *,
        validate: BodyValidator | None = None,
        prepare: BodyPreparer | None = None,
        jobs_per_insert: int = 500,
        max_lines: int = 50_000,
        priority: int = 0,
    ) -> IngestReport:
        """Turns a ``validating`` batch's input file into bulk jobs, streaming it line by line.

        Each line must be a JSON object ``{"custom_id", "method": "POST", "url": <the batch's
        endpoint>, "body": {"model", ...}}`` with a custom_id unique in the file; ``validate`` may
        check each body further. Memory stays bounded by ``jobs_per_insert`` lines. If every line is
        good the batch moves to ``in_progress`` with its total set; otherwise no job is kept, the
        batch moves to ``failed`` and the report (and the batch's ``errors``) say which lines were wrong.
        ``prepare``, when given, checks each body too and returns the request the job stores
        instead of the body itself (or an error message).
        """
        batch = self.get(tenant_id, batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} for this tenant")
        if batch.status != "validating":
            raise InvalidTransition(f"batch {batch_id} is {batch.status}; only a validating batch can be ingested")
        input_file_id = batch.input_file_id
        if input_file_id is None:
            raise NotFound(f"the input file of batch {batch_id} was deleted")
        # Jobs left by an ingestion that died half-way (the batch is still validating) start over.
        def start_over(s: Session) -> None:
            status = _locked_status(s, batch_id)
            if status != "validating":
                raise InvalidTransition(f"batch {batch_id} is {status}; only a validating batch can be ingested")
            s.execute(delete(Job).where(Job.batch_id == batch_id, Job.tenant_id == tenant_id))

        self._db.transact(start_over)
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        total = 0

        def error(line: int | None, code: str, message: str) -> None:
            if len(errors) < MAX_ERRORS:
                errors.append({"code": code, "message": message, "line": line})

        def specs() -> Iterator[JobSpec]:
            nonlocal total
            try:
                for number, raw in self._files.open_lines(tenant_id, input_file_id):
                    if not raw.strip():
                        continue
                    total += 1
                    if total > max_lines:
                        error(number, "too_many_requests", f"a batch holds at most {max_lines} requests")
                        return
                    spec = self._parse_line(batch, number, raw, seen, validate, error, priority, prepare)
                    if spec is not None and not errors:
                        yield spec
            except ValueError as exc:  # a line over the size limit
                error(None, "invalid_file", str(exc))

        # Every write below locks the batch row and checks that it is still validating: a cancel
        # (which takes the same lock, then cancels the batch's queued jobs) either comes first and
        # stops the ingestion, or comes after and cancels what was inserted. No job of a batch
        # cancelled while validating is ever left queued, so none is ever sent.
        stopped: str | None = None

        def insert_group(s: Session, group: list[JobSpec]) -> None:
            status = _locked_status(s, batch_id)
            if status != "validating":
                raise _LeftValidating(status)
            insert_jobs(s, tenant_id, group)

        try:
            for group in chunked(specs(), jobs_per_insert):
                self._db.transact(lambda s, group=group: insert_group(s, group))
        except _LeftValidating as exc:
            stopped = exc.status
        if total == 0 and not errors and stopped is None:
            error(None, "empty_file", "the input file holds no requests")
        now = utcnow()

        def finish(s: Session) -> str | None:
            status = _locked_status(s, batch_id)
            if status != "validating":
                _cancel_queued(s, batch_id, status, now)
                return status or "deleted"
            if errors:
                self._fail_ingest(s, batch_id, errors, now)
            else:
                s.execute(update(Batch).where(Batch.id == batch_id).values(status="in_progress", total=total,
                                                                          in_progress_at=now))
            return None

        if stopped is None:
            stopped = self._db.transact(finish)
        else:
            self._db.transact(lambda s: _cancel_queued(s, batch_id, _locked_status(s, batch_id), now))
        return IngestReport(batch_id, 0 if errors or stopped else total, errors, stopped)

    def queued_job_ids(self, tenant_id: str, batch_id: str, *, page_size: int = 1000) -> Iterator[str]:
        """The ids of the batch's queued jobs, in id order, a page at a time, for sending their
        tasks; only while the batch is ``in_progress``: once it is cancelled (or expired) the next
        page is empty, so a batch that left ``in_progress`` has nothing more sent."""
        queued = (
            select(Job.id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id, Job.status == "queued",
                   Batch.status == "in_progress")
        )
        return paged_ids(self._db, lambda last: queued.where(Job.id > last).order_by(Job.id).limit(page_size),
                         page_size)

    @staticmethod
    def _parse_line(
        batch: Batch,
        number: int,
        raw: bytes,
        seen: set[str],
        validate: BodyValidator | None,
        error: Callable[[int | None, str, str], None],
        priority: int,
        prepare: BodyPreparer | None = None,
    ) -> JobSpec | None:
        try:
            item = json.loads(raw, parse_constant=_no_constant)
        except UnicodeDecodeError:
            error(number, "invalid_json", "the line is not valid JSON: it is not UTF-8")
            return None
        except ValueError as exc:
            where = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            error(number, "invalid_json", f"the line is not valid JSON: {getattr(exc, 'msg', exc)}{where}")
            return None
        except RecursionError:  # not a ValueError: it would end the whole ingestion
            error(number, "invalid_json", "the line is not valid JSON: it is nested too deeply")
            return None
        if not isinstance(item, dict):
            error(number, "invalid_request", "each line must be a JSON object")
            return None
        custom_id = item.get("custom_id")
        body = item.get("body")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 200 or not _storable(custom_id):
            error(number, "invalid_custom_id",
                  "custom_id must be a string of 1 to 200 characters, without NUL or unpaired surrogates")
        elif custom_id in seen:
            error(number, "duplicate_custom_id", f"custom_id {custom_id!r} appears more than once")
        elif item.get("method") != "POST":
            error(number, "invalid_method", "method must be POST")
        elif item.get("url") != batch.endpoint:
            error(number, "mismatched_url", f"url must be the batch's endpoint {batch.endpoint!r}")
        elif (not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]
              or len(body["model"]) > 200 or not _storable(body["model"])):
            error(number, "invalid_body", "body must be an object with a model (a name of 1 to 200 characters)")
        elif _SURROGATE_ESCAPE.search(raw) and not _storable(json.dumps(body, ensure_ascii=False), nul_ok=True):
            error(number, "invalid_body", "body holds an unpaired surrogate (\\ud800-\\udfff), which is not text")
        else:
            problem = validate(body) if validate is not None else None
            seen.add(custom_id)
            if problem:
                error(number, "invalid_body", problem)
                return None
            request = body
            if prepare is not None:
                prepared = prepare(body)
                if isinstance(prepared, str):
                    error(number, "invalid_body", prepared)
                    return None
                request = prepared
            return JobSpec(
                model=body["model"],
                request=request,
                kind="bulk",
                priority=priority,
                api_key_id=batch.api_key_id,
                batch_id=batch.id,
                custom_id=custom_id,
                expires_at=batch.expires_at,
            )
        return None

    @staticmethod
    def _fail_ingest(s: Session, batch_id: str, errors: list[dict[str, Any]], now: datetime) -> None:
        s.execute(delete(Job).where(Job.batch_id == batch_id))
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == "validating")
            .values(status="failed", errors=errors, failed_at=now, total=0)
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def transition(self, tenant_id: str, batch_id: str, status: str, **fields: str | None) -> Batch:
        """Moves the batch to ``status`` (see TRANSITIONS), stamping ``<status>_at``.

        ``fields`` may set ``output_file_id`` and ``error_file_id`` (e.g. when completing).
        Entering a final state writes the request counts into the batch. Raises NotFound or
        InvalidTransition (whose message names the current status and the allowed next ones).
        """
        allowed = {"output_file_id", "error_file_id"}
        if set(fields) - allowed:
            raise ValueError(f"transition can only set {', '.join(sorted(allowed))}")
        return self._db.transact(lambda s: self._transition(s, tenant_id, batch_id, status, dict(fields)))

    def _transition(self, s: Session, tenant_id: str, batch_id: str, status: str, fields: dict[str, Any]) -> Batch:
        batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id).with_for_update())
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} for this tenant")
        nexts = TRANSITIONS.get(batch.status, ())
        if status not in nexts:
            raise InvalidTransition(
                f"batch {batch_id} is {batch.status}; it can move to "
                + (", ".join(nexts) if nexts else "nothing (it is final)")
                + f", not {status}"
            )
        if status in FINAL:
            counts = _counts(s, batch)
            fields.update(completed=counts.completed, failed=counts.failed)
        fields.update(status=status, **{f"{status}_at": utcnow()})
        s.execute(update(Batch).where(Batch.id == batch_id).values(**fields))
        s.refresh(batch)
        return batch

    def cancel(self, tenant_id: str, batch_id: str) -> Batch:
        """Cancels the batch: its queued jobs are cancelled at once; the batch is ``cancelling``
        while some jobs still run, and ``cancelled`` when none do. A final batch is returned as is.
        Raises NotFound if the tenant has no such batch."""

        def work(s: Session) -> Batch:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            if batch is None:
                raise NotFound(f"no batch {batch_id!r} for this tenant")
            if batch.status in FINAL:
                return batch
            if batch.status != "cancelling":
                batch = self._transition(s, tenant_id, batch_id, "cancelling", {})
            s.execute(
                update(Job)
                .where(Job.batch_id == batch_id, Job.status == "queued")
                .values(status="cancelled", finished_at=utcnow())
            )
            return self._advance(s, batch)

        return self._db.transact(work)

    def advance(self, tenant_id: str, batch_id: str) -> Batch:
        """Moves a running batch along when its jobs say so, and returns it:
        ``in_progress`` with no pending job -> ``finalizing``; ``in_progress`` past its window ->
        its queued jobs expire and the batch is ``expired``; ``cancelling`` with nothing running ->
        ``cancelled``. Call it when jobs of the batch finish (cheap; idempotent)."""

        def work(s: Session) -> Batch:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
            if batch is None:
                raise NotFound(f"no batch {batch_id!r} for this tenant")
            return self._advance(s, batch)

        return self._db.transact(work)

    def _advance(self, s: Session, batch: Batch) -> Batch:
        if batch.status not in ("in_progress", "cancelling"):
            return batch
        pending = dict(
            s.execute(
                select(Job.status, func.count())
                .where(Job.batch_id == batch.id, Job.status.in_(("queued", "running")))
                .group_by(Job.status)
            ).all()
        )
        if batch.status == "cancelling":
            if not pending.get("running"):
                return self._transition(s, batch.tenant_id, batch.id, "cancelled", {})
            return batch
        now = utcnow()
        if pending and batch.expires_at is not None and batch.expires_at <= now:
            s.execute(
                update(Job)
                .where(Job.batch_id == batch.id, Job.status == "queued")
                .values(
                    status="expired",
                    finished_at=now,
                    error_code="batch_expired",
                    error_message="the batch's completion window ended before this request ran",
                )
            )
            return self._transition(s, batch.tenant_id, batch.id, "expired", {})
        if not pending:
            return self._transition(s, batch.tenant_id, batch.id, "finalizing", {})
        return batch

    def iter_outcomes(
        self, tenant_id: str, batch_id: str, *, page_size: int = 500
    ) -> Iterator[tuple[Job, Result | None, Usage | None]]:
        """Each job of the batch with its result and usage (None where missing), in job id order,
        a page at a time: what an output or error file is built from. Raises NotFound at once."""
        if self.get(tenant_id, batch_id) is None:
            raise NotFound(f"no batch {batch_id!r} for this tenant")
        return self._outcomes(tenant_id, batch_id, page_size)

    def _outcomes(
        self, tenant_id: str, batch_id: str, page_size: int
    ) -> Iterator[tuple[Job, Result | None, Usage | None]]:
        last = ""
        while True:
            stmt = (
                select(Job, Result, Usage)
                .outerjoin(Result, Result.job_id == Job.id)
                .outerjoin(Usage, Usage.job_id == Job.id)
                .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id, Job.id > last)
                .order_by(Job.id)
                .limit(page_size)
            )
            with self._db.read() as s:
                rows: list[tuple[Job, Result | None, Usage | None]] = [(r[0], r[1], r[2]) for r in s.execute(stmt)]
            yield from rows
            if len(rows) < page_size:
                return
            last = rows[-1][0].id
