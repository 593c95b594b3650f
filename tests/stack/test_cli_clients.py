"""The command-line clients against a running `tokenmill up`: submit, jobs, batch, usage. They
find the API and the local key through the stack's data directory, as a user's shell would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stack_helpers import MODEL, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def tm(stack, *args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    """Runs `tokenmill ARGS` with the stack's environment."""
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], cwd=kw.pop("cwd", REPO), env=stack.env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_cli_clients_submit_follow_batches_and_report_usage(up_factory, tmp_path):
    stack = up_factory().start()
    stack.wait_ready()

    r = tm(stack, "submit", "What is the capital of France?", "--max-tokens", "24", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "succeeded" in r.stderr and "completion tokens" in r.stderr

    r = tm(stack, "submit", "Say hi.", "--no-wait", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id.startswith("job_")
    shown = {}
    for _ in range(100):
        shown = json.loads(tm(stack, "jobs", "show", job_id).stdout)
        if shown["status"] == "succeeded":
            break
        time.sleep(0.3)
    assert shown["status"] == "succeeded" and shown["model"] == MODEL
    listed = tm(stack, "jobs", "list", "--status", "succeeded")
    assert listed.returncode == 0 and job_id in listed.stdout
    assert tm(stack, "jobs", "cancel", job_id).stdout.strip() == f"{job_id} succeeded"  # final stays final

    # A batch file, OpenAI's format: progress until done, then the output file.
    batch_in = tmp_path / "requests.jsonl"
    words = ["cat", "tree", "blue", "light", "rain", "stone"]  # the custom ids, in no sorted order
    lines = [{"custom_id": w, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Give me a word that rhymes with {w}."}]}}
             for w in words]
    batch_in.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "results" / "out.jsonl"  # -o makes the folder
    r = tm(stack, "batch", "submit", str(batch_in), "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    batch_id = r.stdout.splitlines()[0].strip()
    assert batch_id.startswith("batch_") and "completed: 6 completed, 0 failed of 6" in r.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in rows] == words  # in input order
    assert all(x["response"]["status_code"] == 200 for x in rows)
    assert batch_id in tm(stack, "batch", "list").stdout
    assert "completed" in tm(stack, "batch", "status", batch_id).stdout

    # Ctrl-C while following leaves the batch running and says how to reattach. This batch's
    # requests generate 48 tokens each, so it is still running when the signal comes (6 requests
    # of 8 tokens could finish within the second the test waits, and the follower exit 0).
    long_in = tmp_path / "long.jsonl"
    long_in.write_text("".join(json.dumps({**x, "body": {**x["body"], "max_tokens": 48, "min_tokens": 48}}) + "\n"
                               for x in lines))
    follower = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "batch", "submit", str(long_in), "--wait"],
                                cwd=REPO, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = follower.stdout.readline().strip()
    time.sleep(1.0)  # the progress loop is running
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130
    assert f"tokenmill batch status {second} --wait" in err and "Traceback" not in err
    reattached = tm(stack, "batch", "status", second, "--wait", "-o", str(tmp_path / "second.jsonl"))
    assert reattached.returncode == 0, reattached.stderr
    assert len((tmp_path / "second.jsonl").read_text().splitlines()) == 6

    r = tm(stack, "usage")
    assert r.returncode == 0, r.stderr
    assert MODEL in r.stdout and "completion" in r.stdout

    # Clear errors, not tracebacks.
    bad = tm(stack, "submit", "hi", "--api-key", "tm-wrong")
    assert bad.returncode == 1 and "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr
    env_down = {**stack.env, "TOKENMILL_API_URL": "http://127.0.0.1:9"}
    down = subprocess.run([sys.executable, "-m", "tokenmill.cli", "jobs", "list"], env=env_down, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "cannot reach the API" in down.stderr
    assert stack.interrupt() == 0
    assert os.path.exists(stack.data_dir / "tokenmill.db")
