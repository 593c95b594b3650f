"""The attempt accounting of `workers.suspects`: which jobs run with the batch, which run alone,
and which have crashed their worker too often (the processes behind it: tests/reliability)."""

from __future__ import annotations

import pytest

from workers.suspects import ALONE, EXHAUSTED, RUN, Suspicion, verdict


@pytest.mark.parametrize("attempts, crashes, solo_runs, expected", [
    (1, 0, 0, RUN),  # a first start
    (3, 0, 0, RUN),  # lost twice to SIGKILL, OOM...: still batched
    (4, 0, 0, ALONE),  # lost three times without an explanation: run alone
    (9, 0, 2, ALONE),
    (9, 0, 3, EXHAUSTED),  # and lost in three runs alone as well: give up
    (2, 1, 0, ALONE),  # in the batch of a crashed engine: run alone at once
    (3, 1, 2, ALONE),
    (5, 1, 3, EXHAUSTED),
    (40, 0, 0, ALONE),  # however many losses, never failed without runs alone
])
def test_verdict(attempts: int, crashes: int, solo_runs: int, expected: str) -> None:
    assert verdict(attempts, Suspicion(crashes, solo_runs), max_attempts=3) == expected
