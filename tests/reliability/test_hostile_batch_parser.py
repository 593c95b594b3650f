"""Hypothesis against the batch-file parser: `api.batch_ingest.ingest_batch` (the line rules of
`api.batch_lines`) with the API's own body check (`api.batch_lines.request_preparer`), on a real
PostgreSQL database.

Whatever the file holds — invalid JSON or UTF-8, deep nesting, NUL and unpaired surrogates in
custom_id or body, non-finite numbers, wrong methods and URLs, hostile bodies — ingestion never
raises (a raise leaves the batch stuck in `validating`, re-ingested forever), a good line is never
blamed, a bad line is reported with its line number, and a batch either holds exactly its lines as
jobs or none at all. A well-formed line whose body alone is refused fails alone: its job is
`failed` with the body's error, and the batch runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from api.batch_ingest import IngestReport, ingest_batch
from api.batch_lines import BodyPreparer, request_preparer
from api.config import ApiConfig
from api.registry import ModelRegistry
from hostile_fixtures import PG_PREFIX, TINY, tiny_dir  # noqa: F401 - fixture
from pg_helpers import migrated_postgres
from store import Store

ENDPOINT = "/v1/completions"


@pytest.fixture(scope="module")
def store(postgres_admin_url: str) -> Iterator[Store]:
    with migrated_postgres(postgres_admin_url, PG_PREFIX) as url:
        s = Store.open(url)
        yield s
        s.close()


@pytest.fixture(scope="module")
def prepare(tiny_dir: Path) -> BodyPreparer:  # noqa: F811 - the imported fixture
    """The API's body check for the batch's endpoint, over the tiny model served as TINY."""
    registry = ModelRegistry({TINY: str(tiny_dir)})
    return request_preparer(ENDPOINT, registry, default_max_tokens=ApiConfig.default_max_tokens)


def ingest(store: Store, prepare: BodyPreparer, tenant: str, batch_id: str) -> IngestReport:
    """What the batch runner does to ingest a batch, without its Redis lock and sending."""
    return ingest_batch(store, tenant, batch_id, prepare=prepare, max_lines=ApiConfig.batch_max_lines)


@pytest.fixture(scope="module")
def tenant(store: Store) -> str:
    return store.keys.create_tenant("batch-fuzz").id


def _line(custom_id: Any, body: Any, method: Any = "POST", url: Any = ENDPOINT) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body},
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def good(i: int) -> bytes:
    return _line(f"req-{i}", {"model": TINY, "prompt": f"line {i}", "max_tokens": 2})


# Lines that must be refused, by kind (each a function of the line's index, for unique ids).
BAD = {
    "invalid_json": lambda i: b'{"custom_id": "x", ',
    "invalid_utf8": lambda i: b'{"custom_id": "\xff\xfe", "method": "POST"}',
    "invalid_utf8_in_prompt": lambda i: _line(f"u{i}", {"model": TINY, "prompt": "ok"}).replace(b"ok", b"o\xc3"),
    "deep_list": lambda i: b"[" * 100_000,
    "deep_object": lambda i: b'{"a":' * 50_000,
    "deep_body": lambda i: _line(f"d{i}", {"model": TINY, "prompt": "x"}).replace(b'"x"', b"[" * 5000 + b"]" * 5000),
    "nul_custom_id": lambda i: _line(f"a\x00{i}", {"model": TINY, "prompt": "x"}),
    "surrogate_custom_id": lambda i: _line(f"a\ud800{i}", {"model": TINY, "prompt": "x"}),
    "escaped_surrogate_custom_id": lambda i: f'{{"custom_id": "s\\udc80{i}", "method": "POST", "url": "{ENDPOINT}", '
                                             f'"body": {{"model": "{TINY}", "prompt": "x"}}}}'.encode(),
    "long_custom_id": lambda i: _line("c" * 201, {"model": TINY, "prompt": "x"}),
    "int_custom_id": lambda i: _line(i, {"model": TINY, "prompt": "x"}),
    "nan_prompt": lambda i: _line(f"n{i}", {"model": TINY, "prompt": "x"}).replace(b'"x"', b"NaN"),
    "infinite_max_tokens": lambda i: _line(f"f{i}", {"model": TINY, "prompt": "x", "max_tokens": 1}).replace(
        b'"max_tokens": 1', b'"max_tokens": Infinity'),
    "wrong_method": lambda i: _line(f"m{i}", {"model": TINY, "prompt": "x"}, method="GET"),
    "wrong_url": lambda i: _line(f"w{i}", {"model": TINY, "prompt": "x"}, url="/v1/admin/tenants"),
    "unknown_model": lambda i: _line(f"k{i}", {"model": "../../etc/passwd", "prompt": "x"}),
    "body_not_object": lambda i: _line(f"b{i}", ["model", TINY]),
    "array_line": lambda i: b"[1, 2, 3]",
    "nul_byte_outside_strings": lambda i: b'{"custom_id": "z\x00"}',
}
# Well-formed lines whose body the endpoint refuses: that request fails alone.
REFUSED = {
    "prompt_past_context": lambda i: _line(f"l{i}", {"model": TINY, "prompt": [5] * 600}),
    "stream": lambda i: _line(f"t{i}", {"model": TINY, "prompt": "x", "stream": True}),
    "negative_max_tokens": lambda i: _line(f"n{i}", {"model": TINY, "prompt": "x", "max_tokens": -5}),
    "unknown_parameter": lambda i: _line(f"q{i}", {"model": TINY, "prompt": "x", "temprature": 0.5}),
    "invalid_schema": lambda i: _line(f"j{i}", {"model": TINY, "prompt": "x", "guided_regex": "(unclosed"}),
    "surrogate_prompt": lambda i: _line(f"p{i}", {"model": TINY, "prompt": "a\ud800"}),
    "escaped_surrogate_prompt": lambda i: f'{{"custom_id": "e{i}", "method": "POST", "url": "{ENDPOINT}", '
                                          f'"body": {{"model": "{TINY}", "prompt": "a\\ud800"}}}}'.encode(),
}
# Lines that may be accepted or refused; either way, cleanly.
ODD = {
    "nul_in_prompt": lambda i: _line(f"o{i}", {"model": TINY, "prompt": "a\x00b", "max_tokens": 1}),
    "control_chars": lambda i: _line(f"\x01\x1b[2J{i}", {"model": TINY, "prompt": "\x07\x08", "max_tokens": 1}),
    "template_syntax": lambda i: _line(f"{{{{ config }}}}{i}", {"model": TINY, "prompt": "{% raw %}{{ 7*7 }}"}),
    "crlf": lambda i: good(i) + b"\r",
    "bom": lambda i: b"\xef\xbb\xbf" + good(i),
    "extra_fields": lambda i: _line(f"e{i}", {"model": TINY, "prompt": "x", "max_tokens": 1, "x" * 300: [{}] * 50}),
    "duplicate_keys": lambda i: good(i).replace(b'"custom_id"', b'"custom_id": "dup", "custom_id"', 1),
}

line_kind = st.sampled_from(["good"] * 4 + sorted(BAD) + sorted(REFUSED) + sorted(ODD))


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(line_kind, min_size=1, max_size=6), blank_between=st.booleans())
def test_the_batch_parser_never_raises_and_names_every_bad_line(kinds, blank_between, store, prepare, tenant) -> None:
    raw_lines: list[bytes] = []
    numbers: dict[int, str] = {}  # line number -> kind
    for i, kind in enumerate(kinds):
        line = good(i) if kind == "good" else (BAD.get(kind) or REFUSED.get(kind) or ODD[kind])(i)
        raw_lines.append(line)
        numbers[len(raw_lines)] = kind
        if blank_between:
            raw_lines.append(b"   ")
    f = store.files.create(tenant, [b"\n".join(raw_lines) + b"\n"], purpose="batch", filename="fuzz.jsonl")
    batch = store.batches.create(tenant, input_file_id=f.id, endpoint=ENDPOINT)
    report = ingest(store, prepare, tenant, batch.id)  # must not raise

    after = store.batches.get(tenant, batch.id)
    jobs = store.jobs.list_jobs(tenant, batch_id=batch.id, limit=1000).jobs
    blamed = {e["line"]: e for e in report.errors}
    for line, err in blamed.items():
        assert err["message"] and err["code"], err
        assert line is not None and numbers.get(line, "good") != "good", (line, err, numbers)
        assert numbers.get(line) not in REFUSED, (line, err)
    for line, kind in numbers.items():
        if kind in BAD and len(report.errors) < 50:
            assert line in blamed, (kind, line, report.errors)
    if report.errors:
        event("failed")
        assert after.status == "failed" and after.errors and not jobs
    else:
        event("in_progress")
        assert after.status == "in_progress" and after.total == len(kinds) == len(jobs)
        refused, odd = sum(kind in REFUSED for kind in kinds), sum(kind in ODD for kind in kinds)
        failed = sum(job.status == "failed" for job in jobs)
        assert refused <= failed <= refused + odd  # an odd line may be refused too
        assert sum(job.status == "queued" for job in jobs) == len(kinds) - failed
        for job in jobs:
            json.dumps(store.jobs.get_job(tenant, job.id).request, allow_nan=False).encode("utf-8")


@pytest.mark.slow
def test_each_kind_of_bad_line_alone_fails_the_batch_with_its_line_number(store, prepare, tenant) -> None:
    for kind, make in sorted(BAD.items()):
        lines = [good(0), make(1), good(2)]
        f = store.files.create(tenant, [b"\n".join(lines)], purpose="batch", filename=f"{kind}.jsonl")
        batch = store.batches.create(tenant, input_file_id=f.id, endpoint=ENDPOINT)
        report = ingest(store, prepare, tenant, batch.id)
        assert [e["line"] for e in report.errors] == [2], (kind, report.errors)
        assert store.batches.get(tenant, batch.id).status == "failed", kind


@pytest.mark.slow
def test_each_kind_of_refused_body_fails_its_request_alone(store, prepare, tenant) -> None:
    for kind, make in sorted(REFUSED.items()):
        lines = [good(0), make(1), good(2)]
        f = store.files.create(tenant, [b"\n".join(lines)], purpose="batch", filename=f"{kind}.jsonl")
        batch = store.batches.create(tenant, input_file_id=f.id, endpoint=ENDPOINT)
        report = ingest(store, prepare, tenant, batch.id)
        assert report.ok and report.total == 3, (kind, report.errors)
        jobs = sorted(store.jobs.list_jobs(tenant, batch_id=batch.id).jobs, key=lambda j: j.custom_id)
        failed = [j for j in jobs if j.status == "failed"]
        assert len(jobs) == 3 and len(failed) == 1 and failed[0].custom_id not in ("req-0", "req-2"), kind
        assert failed[0].error_message, kind
