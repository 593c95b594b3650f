"""What the metrics cost the API: `benchmarks/api_submit.py` (POST /v1/jobs, no worker) run
alternately against two source trees (by default the commit before prometheus_client's
`/metrics`, and this tree), on PostgreSQL and Redis servers of its own; prints each run's jobs/s
and the medians.

    .venv/bin/python benchmarks/metrics_overhead.py --base af63cc1 --rounds 4 --jobs 4000

The base tree is exported with `git archive` into a temporary directory (not a worktree), and
runs this tree's `api_submit.py`, so that only the API differs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from services import PrivatePostgres, PrivateRedis, require_postgres_bindir  # noqa: E402


def run(tree: Path, args: argparse.Namespace, postgres: str, redis_url: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "api_submit.py"), "--jobs", str(args.jobs),
                          "--connections", str(args.connections), "--api-workers", str(args.api_workers),
                          "--batch-lines", "0", "--postgres", postgres, "--redis", redis_url],
                         cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    if out.returncode != 0:
        raise SystemExit(f"{tree}: exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}")
    print(out.stdout.strip().replace("\n", "\n    "), flush=True)
    rate = float(re.search(r"([\d,]+) jobs/s accepted", out.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    cpu = float(re.search(r"API CPU ([\d.]+) ms per job", out.stdout).group(1))  # type: ignore[union-attr]
    return rate, cpu


# The observability work one accepted POST /v1/jobs does in an API process, timed alone (the
# end-to-end figures above move by more than that from run to run on a shared machine).
_BASE_WORK = """
import timeit
from api.metrics import RequestMetrics
m = RequestMetrics()
def work():
    m.observe("POST", "/v1/jobs", 202, 0.003)
    m.jobs_accepted += 1
"""
_THIS_WORK = """
import contextvars, os, tempfile, timeit
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()  # as under several API processes
from api.metrics import ApiMetrics
from contract import tracing
from contract.log_context import set_log_fields
m = ApiMetrics(os.environ["PROMETHEUS_MULTIPROC_DIR"])
def request():
    set_log_fields(tenant_id="ten_x")  # api.auth
    tracing.enabled()  # api.routes.jobs: no span when off
    m.jobs_accepted.inc()
    set_log_fields(job_id="job_x")
    tracing.enabled()  # api.submit: no enqueue span when off
    m.observe("POST", "/v1/jobs", 202, 0.003)  # api.middleware
def work():
    contextvars.copy_context().run(request)  # each request is a task of its own
"""
_TIME = """
n = 100000
work()
print(min(timeit.repeat(work, number=n, repeat=5)) / n * 1e6)
"""


def per_request_us(tree: Path, code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + _TIME], cwd=tree, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tree)})
    return float(out.stdout.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="af63cc1", help="the commit to compare with (before the new metrics)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--jobs", type=int, default=4000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--api-workers", type=int, default=2)
    args = p.parse_args()
    if args.rounds == 0:  # the per-request timing alone
        with tempfile.TemporaryDirectory(prefix="tokenmill-overhead-") as tmp:
            base = Path(tmp)
            archive = subprocess.run(["git", "archive", args.base], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            print(f"per accepted job: base {per_request_us(base, _BASE_WORK):.1f} us, "
                  f"this tree {per_request_us(REPO, _THIS_WORK):.1f} us")
        return
    with tempfile.TemporaryDirectory(prefix="tokenmill-overhead-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        # The same driver for both trees (this one's), so that only the API under it differs.
        shutil.copy(REPO / "benchmarks" / "api_submit.py", base / "benchmarks" / "api_submit.py")
        pg = PrivatePostgres(require_postgres_bindir()).start()
        redis = PrivateRedis(Path(tmp)).start()
        try:
            trees = {"base": base, "this": REPO}
            rates: dict[str, list[float]] = {"base": [], "this": []}
            cpus: dict[str, list[float]] = {"base": [], "this": []}
            for i in range(args.rounds):
                order = ("base", "this") if i % 2 == 0 else ("this", "base")
                for name in order:
                    print(f"round {i + 1} {name}:", end=" ", flush=True)
                    rate, cpu = run(trees[name], args, pg.url(), redis.db_url(15))
                    rates[name].append(rate)
                    cpus[name].append(cpu)
            mb, mt = statistics.median(rates["base"]), statistics.median(rates["this"])
            cb, ct = statistics.median(cpus["base"]), statistics.median(cpus["this"])
            print(f"median jobs/s: base {args.base} {mb:,.0f} {rates['base']}, this tree {mt:,.0f} {rates['this']}; "
                  f"change {100 * (mt - mb) / mb:+.1f}%")
            print(f"median API CPU per job: base {cb:.3f} ms {cpus['base']}, this tree {ct:.3f} ms {cpus['this']}; "
                  f"change {100 * (ct - cb) / cb:+.1f}%")
            ub, ut = per_request_us(base, _BASE_WORK), per_request_us(REPO, _THIS_WORK)
            print(f"observability work per accepted job, timed alone: base {ub:.1f} us, this tree {ut:.1f} us; "
                  f"{ut - ub:+.1f} us = {100 * (ut - ub) / (1000 * ct):+.2f}% of the API CPU per job above")
        finally:
            redis.kill()
            pg.stop()
            pg.destroy()


if __name__ == "__main__":
    main()
