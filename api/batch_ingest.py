"""Ingesting a batch: its input file, streamed line by line through the batch-line rules
(`api.batch_lines`), into bulk jobs in the store.

Plain steps: the store readies the batch (it must be ``validating``; jobs left by an ingestion that
died half-way are dropped); the lines' jobs go in a group at a time while the file has no error;
at the end the batch opens (``in_progress`` with its total) or fails with the file's errors.
A line whose body alone was refused becomes a job that is ``failed`` from the start (its error is
that request's 400, written to the batch's error file), counted in the batch like any other
request; the file's errors (not JSON, custom_id, method, url, model, size) fail the whole batch.
Memory stays bounded by one group. A batch cancelled meanwhile stops the ingestion at the next
group, and keeps no queued job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from api.batch_lines import BatchLine, BodyPreparer, LineError, LineRules, refused_request
from api.errors import ApiError
from api.limits import reservation
from store import JobSpec, Store, batch_job_id
from store.models import Batch

MAX_ERRORS = 50  # errors.data entries kept for a failed batch: enough to fix a file, bounded in size
JOBS_PER_INSERT = 500


@dataclass
class IngestReport:
    """The outcome of turning a batch input file into jobs. ``errors`` holds at most MAX_ERRORS
    entries of ``{"code", "message", "line"}`` (OpenAI's batch error shape)."""

    batch_id: str
    total: int
    errors: list[dict[str, Any]]
    stopped: str | None = None  # the batch left ``validating`` meanwhile (e.g. "cancelling"): its jobs stay unsent
    model: str | None = None  # the model every request of the batch names
    unsettled: list[str] = field(default_factory=list)  # jobs reserved but dropped: give them back

    @property
    def ok(self) -> bool:
        """True when every line became a job and the batch is now ``in_progress``."""
        return not self.errors and self.stopped is None


class _FileCheck:
    """One pass over a batch file: the lines that become jobs (good ones, and those whose body
    alone was refused) while the file has no error; the file's errors and the number of requests
    (non-blank lines) as they are found."""

    def __init__(self, rules: LineRules, max_lines: int) -> None:
        self._rules = rules
        self._max_lines = max_lines
        self.total = 0
        self.errors: list[LineError] = []

    def refuse(self, error: LineError) -> None:
        """Records a refused line (only the first MAX_ERRORS are kept)."""
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)

    def job_lines(self, lines: Iterable[tuple[int, bytes]]) -> Iterator[BatchLine | LineError]:
        """The lines of ``lines`` (numbered, as the store reads them) that become jobs, while the
        file has no error; after one the rest is still checked, so that the report names every
        bad line."""
        try:
            for number, raw in lines:
                if not raw.strip():
                    continue
                self.total += 1
                if self.total > self._max_lines:
                    self.refuse(LineError(number, "too_many_requests",
                                          f"a batch holds at most {self._max_lines} requests"))
                    return
                outcome = self._rules.check(number, raw)
                if isinstance(outcome, LineError) and not outcome.of_request:
                    self.refuse(outcome)
                elif not self.errors:
                    yield outcome
        except ValueError as exc:  # a line over the size limit
            self.refuse(LineError(None, "invalid_file", str(exc)))


# Counts a batch's jobs (id, tokens) against its tenant's limits, or raises the limit's ApiError.
Reserve = Callable[[list[tuple[str, int]]], object]


def _job(batch: Batch, line: BatchLine | LineError, priority: int, model: str | None,
         reserving: bool = False) -> JobSpec:
    # The id follows the line number: the output and error files, read in id order, then list
    # the results in the order of the input file.
    job_id = batch_job_id(batch.id, line.line if line.line is not None else 0)
    if isinstance(line, LineError):  # its body was refused: the request fails alone, as a 400
        assert line.custom_id is not None and model is not None
        return JobSpec(id=job_id, model=model, request=refused_request(line), kind="bulk", priority=priority,
                       api_key_id=batch.api_key_id, batch_id=batch.id, custom_id=line.custom_id,
                       expires_at=batch.expires_at, error=(line.code, line.message))
    tokens = None
    if reserving:  # the prompt is not counted here: its UTF-8 bytes bound its tokens
        tokens = reservation(line.request, None, int(line.request["params"]["max_tokens"]))
    return JobSpec(id=job_id, model=line.model, request=line.request, kind="bulk", priority=priority,
                   api_key_id=batch.api_key_id, batch_id=batch.id, custom_id=line.custom_id,
                   expires_at=batch.expires_at, reserved_tokens=tokens)


def ingest_batch(store: Store, tenant_id: str, batch_id: str, *, prepare: BodyPreparer | None, max_lines: int,
                 jobs_per_insert: int = JOBS_PER_INSERT, priority: int = 0,
                 reserve: Reserve | None = None) -> IngestReport:
    """Turns a ``validating`` batch's input file into bulk jobs.

    ``prepare`` checks each line's body and returns the request its job stores (None: the body
    itself). If the file has no error the batch moves to ``in_progress`` (a line whose body was
    refused is a job already ``failed``); otherwise it keeps no job, moves to ``failed``, and the
    report (and the batch's ``errors``) say which lines were wrong.
    ``reserve``, when the tenant or key has limits, counts the batch's jobs against them once the
    file is read: a batch over a limit fails with that limit's error and keeps no job.
    Raises NotFound or InvalidTransition when the batch cannot be ingested.
    """
    batch = store.batches.start_ingest(tenant_id, batch_id)
    assert batch.input_file_id is not None  # start_ingest refuses a batch without one
    rules = LineRules(batch.endpoint, prepare)
    check = _FileCheck(rules, max_lines)
    lines = check.job_lines(store.files.open_lines(tenant_id, batch.input_file_id))
    stopped: str | None = None
    held: list[tuple[str, int]] = []
    while stopped is None and (group := list(islice(lines, jobs_per_insert))):
        specs = [_job(batch, line, priority, rules.model, reserve is not None) for line in group]
        held += [(spec.id, spec.reserved_tokens) for spec in specs
                 if spec.id is not None and spec.reserved_tokens is not None]
        stopped = store.batches.add_jobs(tenant_id, batch_id, specs)
    if stopped is None and check.total == 0 and not check.errors:
        check.refuse(LineError(None, "empty_file", "the input file holds no requests"))
    errors = [e.entry() for e in check.errors]
    reserved: list[str] = []
    if stopped is None and not errors and reserve is not None and held:
        try:
            reserve(held)
            reserved = [job_id for job_id, _ in held]
        except ApiError as exc:
            errors = [{"code": exc.code, "message": exc.message, "line": None}]
    if stopped is None:
        stopped = store.batches.finish_ingest(tenant_id, batch_id, total=check.total, errors=errors)
    return IngestReport(batch_id, 0 if errors or stopped else check.total, errors, stopped, rules.model,
                        reserved if stopped else [])
