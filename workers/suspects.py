"""Which jobs are suspected of crashing their worker: the attempt accounting that lets a poison job
fail without taking innocent jobs with it.

A worker runs every job it holds in one engine batch, so when the process dies, every job of the
batch dies with it, and nothing tells which one (if any) was to blame. Counting every lost start
against every job in the batch would fail the innocent jobs next to a poison one, and would fail
good jobs after a few unrelated worker losses (an operator's SIGKILL, the OOM killer, a lost node).
So the worker keeps two kinds of evidence, per job, in Redis next to the queue:

- ``crashes``: the engine raised (a CUDA error, say) while the job was in its batch. The worker
  records that just before it exits, for every job it had in the engine.
- ``solo_runs``: how often the job was started *alone*, i.e. as the only suspect in its worker's
  engine (`WorkerRuntime.alone`). A worker lost during a solo run is charged to that job.

A job is a *suspect* once it has a recorded crash, or once it was started `max_attempts` times
without finishing (losses the worker could not see coming: SIGKILL, a segfault). A suspect runs
alone; a suspect whose `max_attempts` solo runs all ended with its worker lost is failed
(``attempts_exhausted``). Everything else runs in the batch as usual, however often it was lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

SUSPECT_KEY = "tokenmill:suspect:{job_id}"  # hash: crashes, solo_runs
SUSPECT_TTL_S = 14 * 24 * 3600  # forgotten after two weeks without news (the job is long done)

RUN = "run"  # with the batch
ALONE = "alone"  # a suspect: the only one in the engine
EXHAUSTED = "exhausted"  # a suspect that lost its worker in every solo run allowed: fail it


@dataclass(frozen=True)
class Suspicion:
    """What is known against one job."""

    crashes: int = 0
    solo_runs: int = 0


CLEAR = Suspicion()


def verdict(attempts: int, suspicion: Suspicion, max_attempts: int) -> str:
    """How to run a job just claimed for its ``attempts``-th start: RUN, ALONE or EXHAUSTED."""
    lost_starts = attempts - 1  # every earlier start ended without the job finishing
    if suspicion.crashes == 0 and lost_starts < max_attempts:
        return RUN
    if suspicion.solo_runs >= max_attempts:
        return EXHAUSTED
    return ALONE


def exhausted_message(attempts: int, suspicion: Suspicion, max_attempts: int) -> str:
    """The error message of a job failed for crashing its worker."""
    return (f"the job's worker was lost each time it ran: {suspicion.solo_runs} times with the job "
            f"running alone ({attempts - 1} starts in all); giving up after {max_attempts} runs alone")


class SuspectLedger:
    """The evidence, in Redis. Failures to reach Redis never stop a job: they lose evidence only."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def lookup(self, job_ids: list[str]) -> dict[str, Suspicion]:
        """The evidence against each of ``job_ids`` that has any."""
        if not job_ids:
            return {}
        try:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(SUSPECT_KEY.format(job_id=job_id))
            rows = pipe.execute()
        except redis.RedisError as e:
            log.warning("could not read crash evidence (%r); the jobs run with the batch", e)
            return {}
        return {job_id: Suspicion(int(row.get(b"crashes", 0)), int(row.get(b"solo_runs", 0)))
                for job_id, row in zip(job_ids, rows) if row}

    def record_crash(self, job_ids: list[str]) -> None:
        """The engine crashed with these jobs in its batch."""
        self._incr(job_ids, "crashes")

    def start_solo_run(self, job_id: str) -> None:
        """The job starts alone: if its worker is lost now, the loss is the job's."""
        self._incr([job_id], "solo_runs")

    def _incr(self, job_ids: list[str], field: str) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                key = SUSPECT_KEY.format(job_id=job_id)
                pipe.hincrby(key, field, 1)
                pipe.expire(key, SUSPECT_TTL_S)
            pipe.execute()
        except redis.RedisError as e:
            log.error("could not record %s of %d job(s): %r", field, len(job_ids), e)
