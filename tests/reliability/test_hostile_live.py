"""Hostile input against the live stack (API processes, a real worker on a tiny model, PostgreSQL,
Redis db 9): nothing a client sends gets a 5xx or takes the worker down; chat templates and stop
strings treat what a request carries as text; a job sees no other job's text; a pickled Celery
message is refused by the worker and never executed; uploads are capped and their names are names.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_fixtures import (  # noqa: F401 - fixtures
    BASES,
    CONTEXT,
    MAX_FILE_BYTES,
    PATHS,
    TINY,
    Stack,
    hostile,
    nasty_text,
    put,
    relsec_stack,
    tiny_dir,
    wait_batch,
    wait_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ENDPOINTS = {"job": "/v1/jobs", "job_chat": "/v1/jobs", "completion": "/v1/completions", "chat": "/v1/chat/completions"}
# Bodies no endpoint can take (400 or 413 from every one), and odd ones some may take.
MALFORMED = [b"", b"{", b"\xff\xfe{}", b"[" * 200_000, b'{"a":' * 100_000, b"null", b"[]", b"1e999999",
             b'{"model": "tiny", "prompt": NaN}', b'{"model": "tiny", "prompt": "\xc3"}',
             b'{"model": "tiny", "prompt": "a\\ud800"}', b"\x00" * 64, b'{"model": "tiny", "prompt": "x"' + b" " * 5_000_000]
ODD = [b'{"model": "tiny", "prompt": "\\u0000", "max_tokens": 1, "params": {"max_tokens": 1}}',
       b'{"model": "tiny", "prompt": "x", "max_tokens": 1, "params": {"max_tokens": 1e400}}',
       b'\xef\xbb\xbf{"model": "tiny", "prompt": "x", "max_tokens": 1}']


def _check_answer(r: httpx.Response, field: str | None) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        if r.status_code == 400 and err.get("code") == "invalid_value" and field and err.get("param"):
            top = err["param"].split(".")[0].split("[")[0]
            assert top == field or err["param"] in ("max_tokens", "params.max_tokens", "min_tokens"), (field, r.text)


def test_hostile_requests_get_no_5xx_and_the_worker_keeps_serving(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    key = s.key("fuzz-relsec")
    accepted: list[str] = []
    outcomes: dict[int, int] = {}
    clients = [s.client(key, server=i) for i in range(2)]

    @settings(max_examples=70, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(kind=st.sampled_from(sorted(BASES)), data=st.data(), ascii_only=st.booleans(), server=st.integers(0, 1))
    def one_field(kind: str, data: Any, ascii_only: bool, server: int) -> None:
        path = data.draw(st.sampled_from(PATHS[kind]), label="path")
        body = put(BASES[kind], path, data.draw(hostile, label="value"))
        raw = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        r = clients[server].post(ENDPOINTS[kind], content=raw, headers={"Content-Type": "application/json"})
        outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
        _check_answer(r, path[0])
        if r.status_code == 202:
            accepted.append(r.json()["id"])

    string_paths = {"job": [("prompt",), ("idempotency_key",), ("params", "stop")],
                    "job_chat": [("messages", 0, "content"), ("messages", 0, "name")],
                    "completion": [("prompt",), ("stop",), ("user",)], "chat": [("messages", 0, "content"), ("user",)]}

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(kind=st.sampled_from(sorted(BASES)), data=st.data(), server=st.integers(0, 1))
    def one_string(kind: str, data: Any, server: int) -> None:
        # Text that passes validation (control characters, NUL, template syntax, special tokens)
        # reaches the store and the worker: it must be stored, run, or refused naming the field.
        path = data.draw(st.sampled_from(string_paths[kind]), label="path")
        value = data.draw(nasty_text.map(lambda t: t or "x"),
                          label="text")
        if path[-1] == "stop":
            value = [value[:1000]]
        body = put(BASES[kind], path, value)
        raw = json.dumps(body, ensure_ascii=True).encode()
        r = clients[server].post(ENDPOINTS[kind], content=raw, headers={"Content-Type": "application/json"})
        outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
        _check_answer(r, path[0])
        if r.status_code == 202:
            accepted.append(r.json()["id"])

    try:
        one_field()
        one_string()
        # NUL in a path or a query parameter: refused naming it, before the database sees it
        for url, param in (("/v1/jobs?batch_id=a%00b", "batch_id"), ("/v1/jobs?cursor=%00", "cursor"),
                           ("/v1/files?purpose=%00", "purpose"), ("/v1/usage?model=x%00", "model"),
                           ("/v1/jobs/job_%00", "path"), ("/v1/files/%00/content", "path"),
                           ("/v1/batches?after=%00", "after")):
            r = clients[0].get(url)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (url, r.text)
        for raw in MALFORMED + ODD:
            for endpoint in sorted(set(ENDPOINTS.values())):
                r = clients[0].post(endpoint, content=raw, headers={"Content-Type": "application/json"})
                _check_answer(r, None)
                if raw in MALFORMED:
                    assert r.status_code in (400, 413), (endpoint, raw[:40], r.status_code, r.text)
                if raw[:1] in (b"[", b"{") and raw.count(raw[:1]) > 1000:
                    assert r.json()["error"]["code"] == "invalid_json", r.text
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
        # headers a client controls
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/json; charset=latin-1"},
                        {"Content-Type": "application/json", "Idempotency-Key": "k" * 500},
                        {"Content-Type": "application/json", "Idempotency-Key": b"\x7f\xff"},
                        {"Content-Type": "application/json", "Authorization": "Bearer " + key + "\t"}):
            try:
                r = clients[1].post("/v1/jobs", content=json.dumps(BASES["job"]).encode(), headers=headers)
            except httpx.LocalProtocolError:  # the client itself refused to send it
                continue
            assert r.status_code < 500, (headers, r.status_code, r.text)
            if r.status_code == 202:
                accepted.append(r.json()["id"])
        # Everything accepted ends, cleanly, and the worker is still there to run the next one.
        for job_id in accepted:
            job = wait_job(clients[0], job_id)
            assert job["status"] in ("succeeded", "failed"), job
            if job["status"] == "failed":
                assert job["error"]["message"], job
        assert sum(outcomes.values()) >= 70 and any(code in outcomes for code in (200, 202)), outcomes
        s.assert_worker_serves(key)
        s.assert_no_unhandled_errors()
    finally:
        for c in clients:
            c.close()
    print(f"hostile live requests by status: {dict(sorted(outcomes.items()))}; jobs run: {len(accepted)}")


# Values at the very edge of what validation lets through: the ones most likely to trip the
# sampler (overflowing seeds, a filter that keeps nothing, extreme penalties and temperatures).
EDGE_PARAMS = [
    {"seed": 2**64 - 1}, {"seed": -(2**63)}, {"seed": 0, "temperature": 100}, {"temperature": 1e-300},
    {"top_p": 5e-324}, {"top_k": 1_000_000}, {"top_k": 1, "top_p": 5e-324, "min_p": 1}, {"min_p": 1},
    {"repetition_penalty": 100}, {"repetition_penalty": 0.01}, {"presence_penalty": 2, "frequency_penalty": -2},
    {"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 0.01}, {"logprobs": 20},
    {"stop_token_ids": [2**31 - 1, 0, 1, 2]}, {"min_tokens": 6, "ignore_eos": True}, {"stop": ["\x00", "\ufffd"]},
    {"skip_special_tokens": False, "ignore_eos": True}, {"max_tokens": CONTEXT - 16, "ignore_eos": True},
]


def test_sampling_values_at_the_edge_of_validation_run_and_leave_the_worker_alive(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    key = s.key("fuzz-relsec")
    with s.client(key) as c:
        ids = []
        for params in EDGE_PARAMS:
            r = c.post("/v1/jobs", json={"model": TINY, "prompt": "Once upon", "params": {"max_tokens": 6, **params}})
            assert r.status_code == 202, (params, r.text)
            ids.append((params, r.json()["id"]))
        r = c.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4, "logprobs": True, "top_logprobs": 20,
                                                 "seed": 2**64 - 1, "temperature": 100})
        assert r.status_code == 200, r.text
        # A repetition penalty that rounds to zero in float32 made every logit it touched infinite
        # and the sampler read past the vocabulary: the engine crashed and took the worker (and
        # every request in its batch) down, on each redelivery. Now refused, naming the field.
        for tiny in (5e-324, 1e-40, 0.0099):
            r = c.post("/v1/jobs", json={"model": TINY, "prompt": "x", "params": {"repetition_penalty": tiny}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "params.repetition_penalty", r.text
            r = c.post("/v1/completions", json={"model": TINY, "prompt": "x", "repetition_penalty": tiny})
            assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty", r.text
        for params, job_id in ids:
            job = wait_job(c, job_id)
            assert job["status"] == "succeeded", (params, job)
            if params.get("min_tokens"):
                assert job["usage"]["completion_tokens"] >= params["min_tokens"], (params, job["usage"])
    s.assert_worker_serves(key)


def test_prompts_up_to_and_past_the_context_are_run_or_refused_naming_the_field(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    with s.client(s.key("fuzz-relsec")) as c:
        ran = []
        for n in (1, 255, CONTEXT - 2, CONTEXT - 1, CONTEXT, CONTEXT + 1, 4 * CONTEXT, 200_000):
            r = c.post("/v1/jobs", json={"model": TINY, "prompt": [11] * n, "params": {"max_tokens": 1}})
            if n < CONTEXT:
                assert r.status_code == 202, (n, r.text)
                ran.append(r.json()["id"])
            else:
                err = r.json()["error"]
                assert r.status_code == 400 and err["param"] == "prompt", (n, r.text)
                assert err["code"] == "context_length_exceeded" and str(n) in err["message"], err
        r = c.post("/v1/jobs", json={"model": TINY, "prompt": [11] * 500, "params": {"max_tokens": CONTEXT - 500 + 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "params.max_tokens", r.text
        r = c.post("/v1/completions", json={"model": TINY, "prompt": "word " * 3000, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        r = c.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "word " * 3000}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        r = c.post("/v1/jobs", json={"model": TINY, "prompt": "A" * 3_000_000, "params": {"max_tokens": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text[:300]
        r = c.post("/v1/jobs", json={"model": TINY, "prompt": "A" * 5_000_000})
        assert r.status_code == 413 and str(4 * 1024 * 1024) in r.json()["error"]["message"], r.text[:300]
        for job_id in ran:
            job = wait_job(c, job_id)
            assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 1, job
    s.assert_worker_serves(s.key("fuzz-relsec"))


def _batch_line(custom_id: str, prompt: str = "x") -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": TINY, "prompt": prompt, "max_tokens": 1}}).encode()


def test_hostile_batch_files_fail_naming_their_lines_and_never_stick(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    lines = [_batch_line("ok-1"), b"[" * 20_000, b'{"custom_id": "\xff"}', _batch_line("nul\x00id"),
             b'{"custom_id": "s\\udc80", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", '
             b'"prompt": "x"}}', _batch_line("ok-2").replace(b'"x"', b"NaN"), _batch_line("ok-3")]
    with s.client(s.key("fuzz-relsec")) as c:
        f = c.post("/v1/files", files={"file": ("hostile.jsonl", b"\n".join(lines))}, data={"purpose": "batch"})
        assert f.status_code == 200, f.text
        b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/completions"})
        assert b.status_code == 200, b.text
        batch = wait_batch(c, b.json()["id"], ("failed", "in_progress", "completed"), timeout=30)
        assert batch["status"] == "failed", batch
        errors = {e["line"]: e for e in batch["errors"]["data"]}
        assert sorted(errors) == [2, 3, 4, 5, 6], batch["errors"]
        assert all(e["message"] for e in errors.values())
        assert "nested too deeply" in errors[2]["message"] and "UTF-8" in errors[3]["message"]
        assert errors[4]["code"] == errors[5]["code"] == "invalid_custom_id"
        # and a good file still runs after it
        good = b"\n".join(_batch_line(f"g{i}", f"prompt {i}") for i in range(3))
        f = c.post("/v1/files", files={"file": ("good.jsonl", good)}, data={"purpose": "batch"})
        b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/completions"})
        done = wait_batch(c, b.json()["id"], ("completed", "failed"))
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 3, done


# -- templates and stop strings ---------------------------------------------------------------------

TEMPLATE_PAYLOADS = [
    "{{ 7 * 7 }}", "{{ config }}", "{{ messages }}", "{% for m in messages %}LEAK{{ m.content }}{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ raise_exception('boom') }}", "{% raw %}",
    "{{ bos_token }}{{ eos_token }}", "{% set x = 'y' %}{{ x }}", "{#", "{{", "}}",
]


def test_template_syntax_in_messages_is_rendered_as_text_by_the_api_and_the_worker(relsec_stack: Stack) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    s = relsec_stack
    tok = AutoTokenizer.from_pretrained(str(s.model_dir))
    with s.client(s.key("template-relsec")) as c:
        for payload in TEMPLATE_PAYLOADS:
            messages = [{"role": "system", "content": f"sys {payload}"}, {"role": "user", "content": payload}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert text.count(payload) == 2, (payload, text)  # both contents, literally
            assert "49" not in text and "LEAK" not in text.replace(payload, "") and "boom" not in text.replace(payload, "")
            expected_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
            r = c.post("/v1/jobs", json={"model": TINY, "messages": messages, "params": {"max_tokens": 2}})
            assert r.status_code == 202, (payload, r.text)
            job = wait_job(c, r.json()["id"])
            assert job["status"] == "succeeded", (payload, job)
            # The worker's rendering has exactly the literal text's tokens: had it executed the
            # payload ("{{ 7 * 7 }}" -> "49", a loop over messages), the count would differ.
            assert job["usage"]["prompt_tokens"] == expected_tokens, (payload, job["usage"], expected_tokens)
            assert job["request"]["messages"] == messages
            r = c.post("/v1/chat/completions", json={"model": TINY, "messages": messages, "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == expected_tokens, (payload, r.text)
    s.assert_worker_serves(s.key("template-relsec"))


def _greedy(c: httpx.Client, prompt: str, stop: list[str] | None = None, max_tokens: int = 24) -> dict:
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                              "skip_special_tokens": True}
    if stop is not None:
        params["stop"] = stop
    r = c.post("/v1/jobs", json={"model": TINY, "prompt": prompt, "params": params})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


REGEX_STOPS = [".*", ".", "\\w+", "\\s", "[^\\x00]", "(", ")", "|", "^", "$", "\\", "+", "?", "[", "]", "{1}", "\\b"]


def test_stop_strings_with_regex_metacharacters_are_matched_literally(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    with s.client(s.key("stops-relsec")) as c:
        for prompt in ("The quick brown fox", "1 + 1 = ? (answer: [x])", "^$.*"):
            plain = _greedy(c, prompt)["result"]["output_text"]
            assert len(plain) > 6, plain
            literal = [x for x in REGEX_STOPS if x not in plain]
            # None of these occurs literally in the text: treated as regexes, most would cut it at once.
            assert _greedy(c, prompt, stop=literal[:16])["result"]["output_text"] == plain
            # A literal piece of the text cuts it right there (the earliest such piece).
            piece = plain[3:6]
            cut = _greedy(c, prompt, stop=[piece])
            assert cut["result"]["output_text"] == plain[:plain.index(piece)], (plain, piece, cut["result"])
            assert cut["result"]["finish_reason"] == "stop"
            specials = [i for i, ch in enumerate(plain) if ch in ".*+?()[]{}|^$\\" and i > 0]
            if specials:  # a metacharacter in the text: a stop holding it cuts exactly there
                i = specials[0]
                stop = plain[i - 1:i + 1]
                out = _greedy(c, prompt, stop=[stop])["result"]["output_text"]
                assert out == plain[:plain.index(stop)], (plain, stop, out)


def test_concurrent_jobs_in_one_worker_get_exactly_their_own_greedy_output(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    prompts = [f"{uuid.uuid4().hex} {w}" for w in ("apple orchard", "diesel engine", "violin sonata", "quartz",
                                                    "tax law", "glacier")]
    prompts[-1] = prompts[-1] * 12  # one long prompt among short ones (chunked with the others' decodes)
    with s.client(s.key("isolation-relsec")) as c:
        alone = {p: _greedy(c, p, max_tokens=20)["result"]["output_text"] for p in prompts}
        assert len(set(alone.values())) == len(prompts), "distinct prompts gave the same text; pick others"
        ids: dict[str, str] = {}
        lock = threading.Lock()

        def submit(prompt: str) -> None:
            with s.client(s.key("isolation-relsec"), server=len(prompt) % 2) as cc:
                r = cc.post("/v1/jobs", json={"model": TINY, "prompt": prompt, "params": {
                    "max_tokens": 20, "temperature": 0, "ignore_eos": True}})
            assert r.status_code == 202, r.text
            with lock:
                ids[prompt] = r.json()["id"]

        threads = [threading.Thread(target=submit, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = {p: wait_job(c, ids[p]) for p in prompts}
    for p in prompts:
        out = together[p]["result"]["output_text"]
        assert out == alone[p], (p, out, alone[p])
        for other in prompts:
            if other != p:
                assert other[:32] not in out
    # They did run together: their run times overlap.
    spans = sorted((together[p]["started_at"], together[p]["finished_at"]) for p in prompts)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans


# -- the queue refuses pickle -----------------------------------------------------------------------

class _CreatesAFile:
    """Unpickling this creates a file: what a pickled payload could do to a worker that took it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_pickled_task_is_refused_by_the_worker_and_never_runs(relsec_stack: Stack, tmp_path: Path) -> None:  # noqa: F811
    from contract.celery_app import QueueConfig, make_celery
    from contract.queues import TASK_GENERATE, queue_for

    s = relsec_stack
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    sender = make_celery(QueueConfig(redis_url=s.redis_url))
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    log_before = len(s.worker.log_path.read_bytes())
    task_id = f"job_pickle_{uuid.uuid4().hex}"
    sender.send_task(TASK_GENERATE, args=[_CreatesAFile(str(marker)), 0.0], task_id=task_id, queue=queue_for(TINY),
                     serializer="pickle")
    queue = queue_for(TINY)
    deadline = time.monotonic() + 30
    while s.redis.llen(queue) and time.monotonic() < deadline:  # the worker takes it off the queue
        time.sleep(0.1)
    assert s.redis.llen(queue) == 0
    time.sleep(1.0)
    log = s.worker.log_path.read_bytes()[log_before:].decode(errors="replace")
    assert not marker.exists(), "a pickled message was deserialized by the worker"
    assert "ContentDisallowed" in log or "untrusted content" in log.lower(), log[-3000:]
    assert task_id in log or "pickle" in log, log[-3000:]
    # Rejected for good: not parked for redelivery in kombu's unacked hash, and not requeued.
    assert not any(task_id.encode() in v for v in s.redis.hvals("unacked")), "the refused message waits to be redelivered"
    assert all(s.redis.llen(f"{queue}:{p}") == 0 for p in range(1, 10))
    s.assert_worker_serves(s.key("fuzz-relsec"))
    assert not marker.exists()
    sender.close()


# -- uploads ---------------------------------------------------------------------------------------

def test_uploads_over_the_cap_are_refused_naming_the_limit_and_leave_nothing(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    tenant = s.tenant_id("uploads-relsec")
    with s.client(s.key("uploads-relsec")) as c:
        exact = c.post("/v1/files", files={"file": ("exact.jsonl", b"x" * MAX_FILE_BYTES)}, data={"purpose": "batch"})
        assert exact.status_code == 200 and exact.json()["bytes"] == MAX_FILE_BYTES, exact.text
        over = c.post("/v1/files", files={"file": ("over.jsonl", b"x" * (MAX_FILE_BYTES + 1))}, data={"purpose": "batch"})
        assert over.status_code == 413 and str(MAX_FILE_BYTES) in over.json()["error"]["message"], over.text
        assert over.json()["error"]["param"] == "file"
        big = c.post("/v1/files", files={"file": ("big.jsonl", b"x" * (MAX_FILE_BYTES * 4))}, data={"purpose": "batch"})
        assert big.status_code == 413 and str(MAX_FILE_BYTES) in big.json()["error"]["message"], big.text

        def chunks():  # no Content-Length: counted as the bytes arrive
            boundary = b"relsecboundary"
            yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"\r\n\r\n'
            for _ in range(MAX_FILE_BYTES // 1024 + 100):
                yield b"y" * 1024
            yield b"\r\n--" + boundary + b"--\r\n"

        streamed = c.post("/v1/files", content=chunks(),
                          headers={"Content-Type": "multipart/form-data; boundary=relsecboundary"})
        assert streamed.status_code == 413 and str(MAX_FILE_BYTES) in streamed.json()["error"]["message"], streamed.text
        names = [f["filename"] for f in c.get("/v1/files").json()["data"]]
    assert "exact.jsonl" in names and not {"over.jsonl", "big.jsonl", "s.jsonl"} & set(names)
    assert s.store.files.count_files(tenant) == 1
    from sqlalchemy import text

    with s.store.db.engine.connect() as conn:  # no half-written upload left behind
        left = conn.execute(text("SELECT count(*) FROM files WHERE tenant_id = :t AND status <> 'uploaded'"),
                            {"t": tenant}).scalar()
    assert left == 0


HOSTILE_NAMES = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "a\x00b.jsonl", "\x00",
                 "name\r\nX-Injected: 1.jsonl", "\u202egnp.exe", "%2e%2e%2fetc%2fpasswd", "~root/.ssh/authorized_keys",
                 "x" * 1000, "con", "a/../../../../tmp/relsec-escape", ".", ""]


def test_hostile_filenames_are_kept_as_names_and_content_is_reached_only_by_id(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    passwd_before = os.stat("/etc/passwd").st_mtime_ns
    with s.client(s.key("uploads-relsec")) as c:
        for i, name in enumerate(HOSTILE_NAMES):
            content = f"content {i} of {name!r}\n".encode("utf-8", "replace")
            r = c.post("/v1/files", files={"file": (name, content)}, data={"purpose": "batch"})
            assert r.status_code in (200, 400), (name, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["param"] == "file", (name, r.text)
                continue
            f = r.json()
            assert f["id"].startswith("file-") and "/" not in f["id"] and ".." not in f["id"]
            assert "\x00" not in f["filename"] and len(f["filename"]) <= 255, f
            got = c.get(f"/v1/files/{f['id']}/content")
            assert got.status_code == 200 and got.content == content, (name, got.status_code)
            disposition = got.headers["content-disposition"]
            assert "/" not in disposition and "\\" not in disposition and "\r" not in disposition, disposition
            assert c.get(f"/v1/files/{f['id']}").json()["filename"] == f["filename"]
        # A NUL byte in the multipart header itself (a browser would escape it; a hostile client need not)
        raw = (b'--bnd\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--bnd\r\n'
               b'Content-Disposition: form-data; name="file"; filename="../a\x00b\x01.jsonl"\r\n\r\nraw content\n'
               b'\r\n--bnd--\r\n')
        r = c.post("/v1/files", content=raw, headers={"Content-Type": "multipart/form-data; boundary=bnd"})
        assert r.status_code == 200, r.text
        assert r.json()["filename"] == "../a_b_.jsonl", r.json()
        assert c.get(f"/v1/files/{r.json()['id']}/content").content == b"raw content\n"
        # Paths in place of ids reach nothing.
        for ident in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "file-..", "%00"):
            r = c.get(f"/v1/files/{ident}/content")
            assert r.status_code in (400, 404), (ident, r.status_code)
            assert b"root:" not in r.content
    assert os.stat("/etc/passwd").st_mtime_ns == passwd_before
    s.assert_no_unhandled_errors()
    assert not Path("/tmp/relsec-escape").exists()
    assert not list(s.log_dir.glob("**/passwd")) and not list(s.log_dir.glob("**/win.ini"))
