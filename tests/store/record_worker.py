"""A worker process for the concurrency test: records finished jobs in shuffled batches.

    python record_worker.py URL IDS_FILE SEED SYNC_DIR

It writes SYNC_DIR/ready-SEED once imported and connected, then waits for SYNC_DIR/go, so that
processes started together also write together.

Prints the JSON list of the job ids this process recorded (as opposed to found already recorded).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from store import FinishedJob, Store  # noqa: E402


def tokens(index: int) -> tuple[int, int]:
    """The (prompt, completion) tokens every writer reports for the job at ``index``."""
    return index % 97 + 1, index % 31 + 1


def finished(index: int, job_id: str, writer: str) -> FinishedJob:
    """What a writer reports for one job (the same numbers whoever writes it)."""
    prompt, completion = tokens(index)
    return FinishedJob(job_id, f"out-{index}", "stop", prompt, completion, worker=writer)


def record_all(
    store: Store, ids: list[str], seed: int, writer: str, batch: int = 25, keep: set[str] | None = None
) -> list[str]:
    """Claims and records the jobs (all, or those in ``keep``) in a shuffled order, in batches.

    Jobs are numbered by their position in ``ids`` so every writer reports the same tokens for a
    job. Returns the ids this writer recorded (not those it found already recorded).
    """
    order = [(i, job_id) for i, job_id in enumerate(ids) if keep is None or job_id in keep]
    random.Random(seed).shuffle(order)
    recorded: list[str] = []
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        store.jobs.mark_running([job_id for _, job_id in part], writer)
        recorded += store.jobs.record_results([finished(i, job_id, writer) for i, job_id in part]).recorded
    return recorded


def main() -> None:
    """Runs two threads that each record all jobs, and prints what this process recorded."""
    url, ids_file, seed, sync = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    ids = json.loads(Path(ids_file).read_text())
    store = Store.open(url)
    out: list[list[str]] = [[], []]

    def run(t: int) -> None:
        out[t] = record_all(store, ids, seed * 10 + t, f"proc{seed}-thread{t}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
    store.keys.get_tenant("warm-up")  # connect before saying ready
    (sync / f"ready-{seed}").touch()
    deadline = time.monotonic() + 120
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal within 120 s")
        time.sleep(0.005)
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()
    print(json.dumps(out[0] + out[1]))


if __name__ == "__main__":
    main()
