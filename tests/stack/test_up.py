"""`tokenmill up`: the whole stack starts from nothing, serves a job, stops in order on Ctrl-C
without losing queued work, and says plainly what is wrong when it cannot start."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack_helpers import REPO, submit, wait_final
from store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _statuses(data_dir: Path, job_ids: list[str]) -> dict[str, str]:
    store = Store.open(f"sqlite:///{data_dir / 'tokenmill.db'}")
    try:
        tenant = store.keys.tenant_by_name("local")
        return {j: store.jobs.get_job(tenant.id, j).status for j in job_ids}
    finally:
        store.close()


def test_up_serves_a_job_then_ctrl_c_stops_in_order_and_queued_jobs_survive_a_restart(up_factory, tmp_path):
    # One task at a time, so that jobs submitted just before Ctrl-C are still queued when it lands.
    stack = up_factory("first", env={"TOKENMILL_WORKER_CONCURRENCY": "1"}).start()
    state = stack.wait_ready()
    assert state["api_url"] == stack.api_url and state["redis_url"].startswith("redis://127.0.0.1:")
    assert "first start" in stack.log() and "admin.key" in stack.log()
    assert stack.secret("admin.key").startswith("tm-admin-")

    with stack.client() as api:
        first = submit(api, "What is the capital of France?", max_tokens=24)
        job = wait_final(api, [first], timeout_s=90)[first]
        assert job["status"] == "succeeded", job
        assert "Paris" in job["result"]["output_text"]
        assert job["usage"]["completion_tokens"] > 0
        # The admin key works on the admin endpoints (the API got it from `up`).
        admin = api.get("/v1/admin/tenants", headers={"Authorization": f"Bearer {stack.secret('admin.key')}"})
        assert admin.status_code == 200, admin.text
        queued = [submit(api, f"Count from one to fifty, number {i}.", max_tokens=40, ignore_eos=True)
                  for i in range(5)]

    started = time.monotonic()
    assert stack.interrupt() == 0, stack.log()
    log = stack.log()
    order = [log.index(f"stopping: {part}") for part in ("the API", "1 worker", "Flower", "Redis")]
    assert order == sorted(order), log
    assert "Traceback" not in log
    assert time.monotonic() - started < 120
    assert not (stack.data_dir / "up.json").exists()
    assert (stack.data_dir / "redis" / "appendonly.aof").stat().st_size > 0

    # Nothing is left half-done: each job either finished (the worker's warm shutdown) or waits.
    after_stop = _statuses(stack.data_dir, queued)
    assert "running" not in after_stop.values(), after_stop
    still_queued = [j for j, s in after_stop.items() if s == "queued"]
    assert still_queued, f"every job finished before the stop landed: {after_stop}"
    assert "queued task(s) wait for the next `tokenmill up`" in log

    # The next start finds them in Redis's append-only file and runs them; the keys are not shown again.
    again = up_factory("second", data_dir=stack.data_dir).start()
    again.wait_ready()
    assert "first start" not in again.log()
    with again.client() as api:
        done = wait_final(api, queued, timeout_s=120)
    assert {j: d["status"] for j, d in done.items()} == {j: "succeeded" for j in queued}
    assert again.interrupt() == 0, again.log()


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


def test_a_taken_port_is_reported_plainly(up_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = up_factory(env={"TOKENMILL_API_PORT": str(port)}).start()
        assert stack.run_to_exit(60) == 2
    out = stack.log()
    assert f"port taken: the API port {port}" in out and "TOKENMILL_API_PORT" in out
    _no_traceback(out)


def test_an_unreachable_database_is_reported_plainly(up_factory):
    stack = up_factory(env={"TOKENMILL_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/tokenmill"}).start()
    assert stack.run_to_exit(60) == 2
    out = stack.log()
    assert "is unreachable" in out and "TOKENMILL_DATABASE_URL" in out and "127.0.0.1:1" in out
    _no_traceback(out)


def test_a_model_that_cannot_load_is_reported_plainly(up_factory, tmp_path):
    # A missing directory and an unknown built-in name are caught before anything starts.
    missing = up_factory("missing", args=["--model", str(tmp_path / "nowhere")]).start()
    assert missing.run_to_exit(60) == 2
    assert "no model directory at" in missing.log()
    _no_traceback(missing.log())
    unknown = up_factory("unknown", args=["--model", "no-such-model"]).start()
    assert unknown.run_to_exit(120) == 2
    assert "cannot be loaded: unknown built-in model 'no-such-model'" in unknown.log()
    _no_traceback(unknown.log())

    # A directory the engine refuses is found by the worker: `up` gives up after a few tries and
    # says why, instead of restarting it forever.
    bad = tmp_path / "gpt2-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    stack = up_factory("bad", args=["--model", str(bad), "--no-flower"]).start()
    assert stack.run_to_exit(240) == 2
    out = stack.log()
    assert "the worker could not load the model" in out and "GPT2LMHeadModel" in out, out
    _no_traceback(out)
    assert "stopping: Redis" in out  # what had started is stopped again


def test_a_crashed_worker_is_restarted_and_serves_again(up_factory):
    psutil = pytest.importorskip("psutil")
    stack = up_factory(args=["--no-flower"]).start()
    stack.wait_ready()
    up = psutil.Process(stack.proc.pid)
    worker = next(c for c in up.children() if "worker" in c.cmdline())
    worker.kill()  # SIGKILL: no warm shutdown, as an OOM kill would do
    deadline = time.monotonic() + 120
    while "worker-cpu exited with code -9" not in stack.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "restarting in 1s" in stack.log(), stack.log()
    with stack.client() as api:
        job = submit(api, "Say yes.", max_tokens=4)
        assert wait_final(api, [job], timeout_s=120)[job]["status"] == "succeeded"
    replacement = next(c for c in up.children() if "worker" in c.cmdline())
    assert replacement.pid != worker.pid
    assert stack.interrupt() == 0


def test_a_second_up_on_the_same_data_directory_is_refused_and_the_first_stays_stoppable(up_factory):
    first = up_factory("first", args=["--no-flower"]).start()
    first.wait_ready()
    state_file = first.data_dir / "up.json"
    written = state_file.read_text()

    # `up --detach` again by mistake, on other ports (it is not the ports that must stop it).
    again = up_factory("again", data_dir=first.data_dir)
    run = subprocess.run([sys.executable, "-m", "tokenmill.cli", "up", "--detach", "--no-flower"], cwd=REPO,
                         env=again.env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "already running" in run.stderr and f"pid {first.proc.pid}" in run.stderr, run.stderr
    assert "starting in the background" not in run.stdout + run.stderr
    assert state_file.read_text() == written  # the running stack's file, untouched

    # Without up.json (moved aside), the lock still keeps a second stack off the directory, and
    # the refused start neither writes nor removes a state file.
    aside = state_file.rename(first.data_dir / "up.json.aside")
    third = up_factory("third", data_dir=first.data_dir, args=["--no-flower"]).start()
    assert third.run_to_exit(120) == 2
    assert f"in use by another tokenmill up (pid {first.proc.pid})" in third.log(), third.log()
    assert not state_file.exists()
    aside.rename(state_file)

    # `tokenmill down` finds the first stack and stops it in order.
    down = subprocess.run([sys.executable, "-m", "tokenmill.cli", "down"], cwd=REPO, env=first.env,
                          capture_output=True, text=True, timeout=300)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert first.proc.wait(60) == 0
    assert not state_file.exists()
    _no_traceback(first.log() + third.log() + run.stderr)


def test_up_runs_a_tensor_parallel_cpu_worker_that_serves_a_job(up_factory, tiny_model_dir):
    # The built-in model (9 heads) does not split 2 ways; a tiny Qwen3 (4 heads, 2 KV heads) does.
    from engine import LLM, SamplingParams

    model = tiny_model_dir("qwen3")
    stack = up_factory(args=["--no-flower", "--device", "cpu", "--tensor-parallel-size", "2", "--model", str(model),
                             "--served-name", "smollm2-135m-instruct"]).start()
    stack.wait_ready()
    with stack.client() as api:
        job_id = submit(api, "What is the capital of France?", max_tokens=8, ignore_eos=True)
        job = wait_final(api, [job_id], timeout_s=120)[job_id]
    assert job["status"] == "succeeded", job
    # The split worker answers exactly what one process does (greedy).
    with LLM(str(model)) as llm:
        alone = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert job["result"]["output_text"] == alone.text
    assert job["usage"]["completion_tokens"] == 8
    assert "tensor_parallel_size=2" in (stack.data_dir / "logs" / "worker-cpu.log").read_text()
    assert stack.interrupt() == 0, stack.log()
