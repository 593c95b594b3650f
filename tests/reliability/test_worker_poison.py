"""A poison job: one whose request crashes its worker every time it runs (made with the test-only
`TOKENMILL_FAULT_CRASH_MARKER`: the engine loop raises, as on a CUDA error, right after the first
step the marked prompt joined; the worker goes down through its real crash path, exit code 70).

The jobs in the same batch die with it each time. The test shows the accounting that follows
(`workers.suspects`): the poison job ends `failed` with `attempts_exhausted` after its runs alone,
and every job around it, though killed with it, finishes once with the right token counts."""

from __future__ import annotations

import random

from contract.payload import job_payload
from relworker import assert_each_stored_once, create, greedy, jobs_by_id, payloads, rows_per_job, send, wait_final
from store.models import Usage

MARKER = "tokenmill-test-poison-7f3a"
MAX_ATTEMPTS = 2  # one run alone less than the default (3), to keep the test short


def test_poison_job_fails_after_its_attempts_and_the_jobs_around_it_finish(
        rel_store, rel_celery, rel_redis, rel_tenant, spawn_worker, rel_reconciler):
    rng = random.Random(14)
    around = payloads(rng, 30, (4, 12), (8, 16))
    poison_body = job_payload(prompt=f"Summarise this: {MARKER}", params=greedy(8))
    ids = create(rel_store, rel_tenant, around[:15] + [poison_body] + around[15:])
    poison = ids[15]
    innocents = ids[:15] + ids[16:]
    send(rel_celery, ids)  # all queued before a worker starts: the first batch holds them all
    env = {"TOKENMILL_FAULT_CRASH_MARKER": MARKER, "TOKENMILL_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    # The visibility timeout at its default: a crashed worker's tasks come back through the
    # recovery of its instance (workers.recovery), not through the timeout.
    options = {"concurrency": 64, "visibility_timeout_s": 3600, "extra_env": env}
    workers = [spawn_worker(wait=False, **options)]
    exits: list[int] = []

    def keep_a_worker_running() -> None:  # what a supervisor does (compose, systemd, `tokenmill up`)
        if not workers[-1].alive():
            exits.append(workers[-1].proc.returncode)
            assert len(exits) <= MAX_ATTEMPTS + 2, f"the worker keeps crashing: exits {exits}"
            workers.append(spawn_worker(wait=False, **options))

    counts = wait_final(rel_store, rel_tenant, len(ids), timeout=240, during=keep_a_worker_running)
    jobs = jobs_by_id(rel_store, ids)
    print(f"worker exits {exits}; final {dict(counts)}; poison started {jobs[poison].attempts} times; "
          f"tasks re-sent by the reconciler {dict(rel_reconciler.resent_total)}")
    # Every task a crashed worker held came back through the recovery (even one Redis was handing
    # over at the crash): the reconciler, at its defaults, had nothing to send again.
    assert dict(rel_reconciler.resent_total) == {}
    assert jobs[poison].status == "failed"
    assert jobs[poison].error_code == "attempts_exhausted"
    assert f"{MAX_ATTEMPTS} times with the job running alone" in jobs[poison].error_message
    assert rows_per_job(rel_store, Usage, [poison])[poison] == 0
    # Every crash went through the engine's crash path, and the poison alone caused them: one in
    # the first batch, then one in each of its runs alone.
    assert exits == [70] * (MAX_ATTEMPTS + 1), exits
    assert {jobs[i].status for i in innocents} == {"succeeded"}
    assert_each_stored_once(rel_store, innocents, around)
    killed_with_it = [i for i in innocents if jobs[i].attempts > 1]
    assert killed_with_it, "no innocent job was in a batch with the poison"
    print(f"{len(killed_with_it)} of {len(innocents)} innocent jobs were killed with the poison "
          f"(up to {max(jobs[i].attempts for i in innocents)} starts); all finished once")
