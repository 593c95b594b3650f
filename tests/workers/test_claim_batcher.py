"""The claimer claims the jobs of concurrent tasks in one call, hands each task its own claims
(in the claim's order), fails every task of a group whose claim failed, and claims a lone request
at once (unit tests: the claim function is a stand-in of our own)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from store.types import JobClaim
from workers.claim_batcher import ClaimBatcher


def claim_of(job_id: str) -> JobClaim:
    return JobClaim(id=job_id, tenant_id="t", api_key_id=None, model="m", kind="interactive", priority=0,
                    request={}, attempts=1, created_at=datetime.now(timezone.utc))


class GatedClaims:
    """Claims every id except those in ``skip``; the first call waits for ``gate`` so that the
    requests made meanwhile pile up for the next one."""

    def __init__(self, skip: set[str] = frozenset(), fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.skip, self.fail = skip, fail

    def __call__(self, ids: list[str]) -> list[JobClaim]:
        self.calls.append(list(ids))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("the store is away")
        return [claim_of(i) for i in sorted(set(ids) - self.skip)]


def test_requests_made_during_a_claim_are_claimed_together_in_the_next():
    claims = GatedClaims(skip={"b2"})
    batcher = ClaimBatcher(claims).start()
    try:
        first = batcher.submit(["a"])
        assert claims.entered.wait(10)
        later = [batcher.submit(["b3", "b1", "b2"]), batcher.submit(["c"]), batcher.submit(["d"])]
        claims.gate.set()
        assert [c.id for c in first.result(10)] == ["a"]
        assert [c.id for c in later[0].result(10)] == ["b1", "b3"]  # the claim's order; b2 not claimed
        assert [c.id for c in later[1].result(10)] == ["c"]
        assert [c.id for c in later[2].result(10)] == ["d"]
        assert claims.calls == [["a"], ["b3", "b1", "b2", "c", "d"]]
    finally:
        batcher.stop()


def test_a_group_is_bounded_by_max_jobs():
    claims = GatedClaims()
    batcher = ClaimBatcher(claims, max_jobs=3).start()
    try:
        first = batcher.submit(["a"])
        assert claims.entered.wait(10)
        futs = [batcher.submit([f"x{i}", f"y{i}"]) for i in range(3)]
        claims.gate.set()
        for f in [first, *futs]:
            f.result(10)
        assert [len(ids) for ids in claims.calls] == [1, 4, 2]  # 2 + 2 reaches 3: the third waits
    finally:
        batcher.stop()


def test_a_failed_claim_fails_every_task_of_its_group_and_the_claimer_goes_on():
    claims = GatedClaims(fail=True)
    batcher = ClaimBatcher(claims).start()
    try:
        first = batcher.submit(["a"])
        assert claims.entered.wait(10)
        second = batcher.submit(["b"])
        claims.gate.set()
        for f in (first, second):
            with pytest.raises(RuntimeError, match="the store is away"):
                f.result(10)
        claims.fail = False
        assert [c.id for c in batcher.claim(["c"])] == ["c"]
    finally:
        batcher.stop()


def test_a_lone_request_is_claimed_at_once():
    claims = GatedClaims()
    claims.gate.set()
    batcher = ClaimBatcher(claims).start()
    try:
        start = time.monotonic()
        assert [c.id for c in batcher.claim(["a"])] == ["a"]
        assert time.monotonic() - start < 0.5  # no gathering window: nothing else was waiting
    finally:
        batcher.stop()


def test_after_stop_requests_fail_at_once():
    claims = GatedClaims()
    claims.gate.set()
    batcher = ClaimBatcher(claims).start()
    batcher.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.claim(["a"])
    assert claims.calls == []
