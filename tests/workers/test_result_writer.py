"""The result writer batches writes, retries a database that is away, and isolates a result the
database refuses (unit tests: the store is a stand-in of our own that fails on purpose)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from sqlalchemy.exc import DataError, OperationalError

from store.types import FinishedJob, RecordOutcome
from workers.result_writer import ResultRejected, ResultWriter


@dataclass
class FlakyJobs:
    refuse: set[str] = field(default_factory=set)
    outages: int = 0
    calls: list[list[str]] = field(default_factory=list)

    def record_results(self, finished):
        ids = [f.job_id for f in finished]
        self.calls.append(ids)
        if self.outages:
            self.outages -= 1
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        if self.refuse & set(ids):
            raise DataError("INSERT", {}, Exception("invalid byte sequence"))
        return RecordOutcome(recorded=ids)


@dataclass
class FakeStore:
    jobs: FlakyJobs


def finished(i: int) -> FinishedJob:
    return FinishedJob(job_id=f"job{i}", output_text="x", finish_reason="stop", prompt_tokens=1,
                       completion_tokens=1)


def test_a_refused_result_fails_alone_and_the_rest_are_stored():
    jobs = FlakyJobs(refuse={"job5"})
    w = ResultWriter(FakeStore(jobs), max_wait_s=0.2).start()
    futs = [w.submit(finished(i)) for i in range(8)]
    for i, f in enumerate(futs):
        if i == 5:
            with pytest.raises(ResultRejected, match="invalid byte sequence"):
                f.result(timeout=10)
        else:
            assert f.result(timeout=10) is True
    w.stop()
    assert w.jobs_written == 7


def test_an_unreachable_database_is_retried_until_it_answers():
    jobs = FlakyJobs(outages=3)
    w = ResultWriter(FakeStore(jobs), max_wait_s=0.05, max_backoff_s=0.05).start()
    futs = [w.submit(finished(i)) for i in range(4)]
    assert all(f.result(timeout=10) for f in futs)
    w.stop()
    assert len(jobs.calls) >= 4 and w.jobs_written == 4


def test_results_are_written_in_batches_not_one_by_one():
    jobs = FlakyJobs()
    w = ResultWriter(FakeStore(jobs), max_wait_s=0.3).start()
    futs = [w.submit(finished(i)) for i in range(200)]
    assert all(f.result(timeout=10) for f in futs)
    w.stop()
    assert len(jobs.calls) <= 3
