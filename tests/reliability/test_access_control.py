"""Access control against the live stack (two API processes, a worker, PostgreSQL, Redis db 9).

- Every route of the app's route table (enumerated, so a new route cannot be forgotten: the test
  fails until it is classified here) is walked with no key, wrong keys, a revoked key, another
  tenant's key and the admin key, against the first tenant's jobs, files, batches, keys and usage:
  401, 403 or 404 exactly as for an object that does not exist, never the other tenant's data, and
  nothing of theirs changed.
- A revoked key (admin API, `tokenmill keys revoke`, a revoked tenant) stops working at once in
  every API process, not only the one that revoked it.
- Keys are stored only as their SHA-256: no column of any table, and no log, holds the plaintext.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, create_engine, select

from api.app import create_app
from api.config import ApiConfig
from hostile_fixtures import REPO, TINY, Stack, relsec_stack, tiny_dir, wait_batch, wait_job  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

OPEN = "open"  # no key needed; must show no tenant's data
OBJECT = "object"  # one object of a tenant: another tenant gets 404 as for a missing one
LIST = "list"  # the caller's own objects only
CREATE = "create"  # makes the caller's own object; another tenant's references are 404
SHARED = "shared"  # served models: the same for every key
ADMIN = "admin"  # the admin key only

# Every (method, path) of the app. A route missing here fails the test: classify it.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/openapi.json"): OPEN, ("GET", "/docs"): OPEN, ("GET", "/docs/oauth2-redirect"): OPEN,
    ("GET", "/redoc"): OPEN, ("GET", "/healthz"): OPEN, ("GET", "/readyz"): OPEN, ("GET", "/metrics"): OPEN,
    ("POST", "/v1/jobs"): CREATE, ("GET", "/v1/jobs"): LIST, ("GET", "/v1/jobs/{job_id}"): OBJECT,
    ("DELETE", "/v1/jobs/{job_id}"): OBJECT, ("GET", "/v1/jobs/{job_id}/events"): OBJECT,
    ("POST", "/v1/completions"): CREATE, ("POST", "/v1/chat/completions"): CREATE,
    ("GET", "/v1/models"): SHARED, ("GET", "/v1/models/{model}"): SHARED,
    ("POST", "/v1/files"): CREATE, ("GET", "/v1/files"): LIST, ("GET", "/v1/files/{file_id}"): OBJECT,
    ("GET", "/v1/files/{file_id}/content"): OBJECT, ("DELETE", "/v1/files/{file_id}"): OBJECT,
    ("POST", "/v1/batches"): CREATE, ("GET", "/v1/batches"): LIST, ("GET", "/v1/batches/{batch_id}"): OBJECT,
    ("POST", "/v1/batches/{batch_id}/cancel"): OBJECT,
    ("GET", "/v1/usage"): LIST,
    ("POST", "/v1/admin/tenants"): ADMIN, ("GET", "/v1/admin/tenants"): ADMIN,
    ("DELETE", "/v1/admin/tenants/{tenant_id}"): ADMIN, ("POST", "/v1/admin/tenants/{tenant_id}/keys"): ADMIN,
    ("GET", "/v1/admin/tenants/{tenant_id}/keys"): ADMIN,
    ("DELETE", "/v1/admin/tenants/{tenant_id}/keys/{key_id}"): ADMIN,
    ("GET", "/v1/admin/tenants/{tenant_id}"): ADMIN, ("PATCH", "/v1/admin/tenants/{tenant_id}"): ADMIN,
    ("PUT", "/v1/admin/tenants/{tenant_id}/limits"): ADMIN,
    ("PUT", "/v1/admin/tenants/{tenant_id}/keys/{key_id}/limits"): ADMIN,
    ("GET", "/v1/admin/tenants/{tenant_id}/webhook-secret"): ADMIN,
    ("POST", "/v1/admin/tenants/{tenant_id}/webhook-secret"): ADMIN,
}


def app_routes(stack: Stack) -> set[tuple[str, str]]:
    """(method, path) of every route the application serves (HEAD aside: Starlette adds it to GET)."""
    app = create_app(ApiConfig(database_url=stack.database_url, redis_url=stack.redis_url,
                               models={TINY: str(stack.model_dir)}, run_batch_loop=False), store=stack.store)
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        # FastAPI >= 0.16x keeps included routers as one entry each; older ones list the routes.
        routes = list(route.effective_route_contexts()) if hasattr(route, "effective_route_contexts") else [route]
        for r in routes:
            out |= {(m, r.path) for m in (r.methods or ()) if m != "HEAD"}
    assert len(out) >= len(ROUTES) - 2, out
    return out


@dataclass
class Owned:
    """What tenant A owns, and the secret text that must never reach anyone else."""

    secret: str
    tenant_id: str
    key_id: str
    job_id: str
    idem_job: str
    completion_id: str
    idem_completion: str
    chat_id: str
    idem_chat: str
    file_id: str
    batch_id: str
    output_file_id: str

    def ids(self) -> list[str]:
        return [self.tenant_id, self.key_id, self.job_id, self.completion_id, self.chat_id, self.file_id,
                self.batch_id, self.output_file_id]


@pytest.fixture(scope="module")
def owned(relsec_stack: Stack) -> Owned:  # noqa: F811 - the imported fixture
    s = relsec_stack
    key = s.key("acme-relsec")
    secret = f"secret-of-acme-{uuid.uuid4().hex}"
    idem_job, idem_completion, idem_chat = (f"idem-{n}-{uuid.uuid4().hex[:8]}" for n in range(3))
    with s.client(key) as a:
        r = a.post("/v1/jobs", json={"model": TINY, "prompt": secret, "idempotency_key": idem_job,
                                     "params": {"max_tokens": 3, "temperature": 0}})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        r = a.post("/v1/completions", json={"model": TINY, "prompt": secret, "max_tokens": 2},
                   headers={"Idempotency-Key": idem_completion})
        assert r.status_code == 200, r.text
        completion_id = r.json()["id"]
        r = a.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": secret}]},
                   headers={"Idempotency-Key": idem_chat})
        assert r.status_code == 200, r.text
        chat_id = r.json()["id"]
        line = ('{"custom_id": "%s", "method": "POST", "url": "/v1/completions", "body": {"model": "%s", '
                '"prompt": "%s", "max_tokens": 2}}\n' % (secret, TINY, secret)).encode()
        f = a.post("/v1/files", files={"file": ("acme.jsonl", line)}, data={"purpose": "batch"})
        assert f.status_code == 200, f.text
        b = a.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/completions"})
        assert b.status_code == 200, b.text
        batch = wait_batch(a, b.json()["id"], ("completed",))
        assert wait_job(a, job_id)["status"] == "succeeded"
    tenant_id = s.tenant_id("acme-relsec")
    key_id = s.store.keys.list_keys(tenant_id)[0].id
    return Owned(secret, tenant_id, key_id, job_id, idem_job, completion_id, idem_completion, chat_id, idem_chat,
                 f.json()["id"], batch["id"], batch["output_file_id"])


def _params(o: Owned, missing: bool) -> dict[str, str]:
    if missing:
        return {"job_id": "job_0000000000000000000000", "file_id": "file-000000000000000000000000",
                "batch_id": "batch_000000000000000000000000", "tenant_id": "ten_0000000000000000",
                "key_id": "key_0000000000000000", "model": TINY}
    return {"job_id": o.job_id, "file_id": o.file_id, "batch_id": o.batch_id, "tenant_id": o.tenant_id,
            "key_id": o.key_id, "model": TINY}


def _request(client: httpx.Client, method: str, path: str, o: Owned, *, missing: bool = False,
             variant: str = "") -> httpx.Response:
    """One request to the route, with bodies and queries that point at tenant A's objects."""
    url = path.format(**_params(o, missing))
    kw: dict[str, Any] = {}
    if (method, path) == ("POST", "/v1/jobs"):
        kw["json"] = {"model": TINY, "prompt": "mine", "idempotency_key": o.idem_job, "params": {"max_tokens": 1}}
    elif (method, path) == ("POST", "/v1/completions"):
        kw.update(json={"model": TINY, "prompt": "mine", "max_tokens": 1}, headers={"Idempotency-Key": o.idem_completion})
    elif (method, path) == ("POST", "/v1/chat/completions"):
        kw.update(json={"model": TINY, "max_tokens": 1, "messages": [{"role": "user", "content": "mine"}]},
                  headers={"Idempotency-Key": o.idem_chat})
    elif (method, path) == ("POST", "/v1/files"):
        kw.update(files={"file": ("mine.jsonl", b"{}\n")}, data={"purpose": "batch"})
    elif (method, path) == ("POST", "/v1/batches"):
        kw["json"] = {"input_file_id": "file-000000000000000000000000" if missing else o.file_id,
                      "endpoint": "/v1/completions"}
    elif (method, path) == ("POST", "/v1/admin/tenants"):
        kw["json"] = {"name": f"intruder-{uuid.uuid4().hex[:6]}"}
    elif (method, path) == ("POST", "/v1/admin/tenants/{tenant_id}/keys"):
        kw["json"] = {"name": "intruder"}
    elif method in ("PUT", "PATCH") and path.startswith("/v1/admin/"):
        kw["json"] = {}
    elif (method, path) == ("GET", "/v1/jobs"):
        kw["params"] = {"batch_id": o.batch_id} if variant == "by_batch" else {}
    elif (method, path) == ("GET", "/v1/batches"):
        kw["params"] = {"after": o.batch_id} if variant == "after" else {}
    elif (method, path) == ("GET", "/v1/usage"):
        kw["params"] = ({"api_key_id": o.key_id, "group_by": ["api_key", "model"]} if variant == "by_key"
                        else {"tenant_id": o.tenant_id} if variant == "by_tenant" else {"group_by": ["api_key"]})
    return client.request(method, url, timeout=60, **kw)


def _assert_no_leak(r: httpx.Response, o: Owned, where: str, echoed: set[str] = frozenset()) -> None:
    """Nothing of tenant A in the answer (ids the caller sent itself may be echoed in a 404)."""
    text = r.text
    assert o.secret not in text, f"{where}: A's secret text leaked: {text[:500]}"
    for ident in set(o.ids()) - set(echoed):
        assert ident not in text, f"{where}: A's id {ident} leaked: {text[:500]}"


def _error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except Exception:  # noqa: BLE001
        return None


def test_every_route_keeps_one_tenants_objects_from_every_other_caller(relsec_stack: Stack, owned: Owned) -> None:  # noqa: F811
    s, o = relsec_stack, owned
    served = app_routes(s)
    assert served == set(ROUTES), (f"routes not classified in ROUTES (add them): {sorted(served - set(ROUTES))}; "
                                   f"gone from the app: {sorted(set(ROUTES) - served)}")
    other = s.key("globex-relsec")
    revoked_key = s.key("acme-revoked-relsec")
    with s.client(s.admin_key) as admin:
        rid = s.tenant_id("acme-revoked-relsec")
        kid = s.store.keys.list_keys(rid)[0].id
        assert admin.delete(f"/v1/admin/tenants/{rid}/keys/{kid}").status_code == 200
    strangers = {"no key": None, "wrong key": "tm-" + uuid.uuid4().hex, "admin key + x": s.admin_key + "x",
                 "A's key + x": s.key("acme-relsec") + "x", "revoked key": revoked_key}
    checked = 0
    for (method, path), kind in sorted(ROUTES.items()):
        where = f"{method} {path}"
        # 1. Nobody without a live key gets past the door (open routes excepted).
        for label, key in strangers.items():
            with s.client(key, server=checked % 2) as c:
                r = _request(c, method, path, o)
            if kind == OPEN:
                assert r.status_code == 200, (where, label, r.status_code, r.text[:300])
                _assert_no_leak(r, o, f"{where} ({label})")
            else:
                assert r.status_code == 401, (where, label, r.status_code, r.text[:300])
                assert r.headers.get("www-authenticate") == "Bearer" and _error_code(r) == "invalid_api_key", where
            checked += 1
        # 2. Another tenant: A's objects are absent, A's data is never shown.
        with s.client(other, server=checked % 2) as b:
            variants = {LIST: {("GET", "/v1/jobs"): ["", "by_batch"], ("GET", "/v1/batches"): ["", "after"],
                               ("GET", "/v1/usage"): ["", "by_key", "by_tenant"]}.get((method, path), [""])}
            for variant in variants.get(kind, [""]):
                r = _request(b, method, path, o, variant=variant)
                checked += 1
                if kind == OBJECT or (kind == CREATE and path == "/v1/batches"):
                    absent = _request(b, method, path, o, missing=True)
                    assert r.status_code == absent.status_code == 404, (where, r.status_code, r.text[:300])
                    assert _error_code(r) == _error_code(absent), (where, r.text, absent.text)
                    _assert_no_leak(r, o, where, echoed=set(_params(o, False).values()) | {o.file_id})
                elif kind == LIST:
                    if variant == "after":  # paging after A's batch: as if no such batch
                        assert r.status_code == 404 and _error_code(r) == "batch_not_found", (where, r.text)
                    elif variant == "by_tenant":  # another tenant's usage: refused, whoever it is
                        assert r.status_code == 403 and _error_code(r) == "admin_key_required", (where, r.text)
                    else:
                        assert r.status_code == 200, (where, variant, r.text[:300])
                        if path == "/v1/usage" and variant == "by_key":
                            assert r.json()["data"] == [], (where, r.text)
                        if path == "/v1/jobs" and variant == "by_batch":
                            assert r.json()["data"] == [], (where, r.text)
                    _assert_no_leak(r, o, f"{where}?{variant}", echoed={o.batch_id, o.key_id, o.tenant_id})
                elif kind == CREATE:
                    assert r.status_code in (200, 202), (where, r.status_code, r.text[:300])
                    assert r.json()["id"] not in (o.job_id, o.completion_id, o.chat_id, o.file_id), (where, r.text)
                    _assert_no_leak(r, o, where)
                elif kind == SHARED:
                    assert r.status_code == 200, (where, r.text)
                    _assert_no_leak(r, o, where)
                elif kind == ADMIN:
                    assert r.status_code == 403 and _error_code(r) == "admin_key_required", (where, r.text)
                    _assert_no_leak(r, o, where, echoed={o.tenant_id, o.key_id})
                elif kind == OPEN:
                    assert r.status_code == 200, (where, r.text[:300])
                    _assert_no_leak(r, o, where)
        # 3. The admin key manages tenants; it owns no jobs, files or batches.
        if kind in (OBJECT, LIST, CREATE) and path != "/v1/usage":
            with s.client(s.admin_key) as adm:
                r = _request(adm, method, path, o)
            assert r.status_code == 403 and _error_code(r) == "tenant_key_required", (where, r.text[:300])
            _assert_no_leak(r, o, where)
            checked += 1
    assert checked > 150

    # Nothing of A's was changed by the walk: its job, file and batch are as they were.
    with s.client(s.key("acme-relsec")) as a:
        job = a.get(f"/v1/jobs/{o.job_id}").json()
        assert job["status"] == "succeeded" and job["request"]["prompt"] == o.secret
        assert a.get(f"/v1/files/{o.file_id}/content").text.count(o.secret) == 2
        assert a.get(f"/v1/batches/{o.batch_id}").json()["status"] == "completed"
        assert a.get(f"/v1/admin/tenants/{o.tenant_id}/keys").status_code == 403
    assert s.store.keys.authenticate(s.key("acme-relsec")) is not None, "A's key was revoked by the walk"
    assert not [t for t in s.store.keys.list_tenants() if t.name.startswith("intruder-")]
    s.assert_no_unhandled_errors()


def _live(client: httpx.Client) -> int:
    return client.get("/v1/jobs", params={"limit": 1}).status_code


def test_a_revoked_key_is_refused_at_once_by_every_api_process(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    tenant = s.store.keys.create_tenant(f"revoke-{uuid.uuid4().hex[:6]}")
    with s.client(s.admin_key) as admin:
        made = [admin.post(f"/v1/admin/tenants/{tenant.id}/keys", json={"name": f"k{i}"}).json() for i in range(4)]
    clients = [[s.client(m["key"], server=i) for i in range(2)] for m in made]
    try:
        for pair in clients:  # each key checked (and so cached) by both processes
            assert [_live(c) for c in pair] == [200, 200]
        # 1. Revoked through process 0: refused by process 1 on its very next request.
        with s.client(s.admin_key, server=0) as admin:
            assert admin.delete(f"/v1/admin/tenants/{tenant.id}/keys/{made[0]['id']}").status_code == 200
        assert [_live(c) for c in reversed(clients[0])] == [401, 401]
        assert [_live(c) for c in clients[1]] == [200, 200]  # the tenant's other keys still work
        # 2. Revoked from the command line (another process altogether).
        out = subprocess.run([sys.executable, "-m", "tokenmill.cli", "keys", "revoke", made[1]["id"], "--tenant",
                              tenant.name], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TOKENMILL_DATABASE_URL": s.database_url,
                                  "TOKENMILL_REDIS_URL": s.redis_url})
        assert out.returncode == 0, out.stderr
        assert [_live(c) for c in clients[1]] == [401, 401]
        # 3. The whole tenant revoked through process 1: every key refused by both at once.
        with s.client(s.admin_key, server=1) as admin:
            assert admin.delete(f"/v1/admin/tenants/{tenant.id}").json()["revoked_keys"] == 2
        assert [_live(c) for pair in clients[2:] for c in pair] == [401] * 4
    finally:
        for pair in clients:
            for c in pair:
                c.close()


def test_keys_are_stored_only_as_their_hash(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    tenant = s.store.keys.create_tenant(f"hash-{uuid.uuid4().hex[:6]}")
    with s.client(s.admin_key) as admin:
        made = admin.post(f"/v1/admin/tenants/{tenant.id}/keys", json={"name": "hashed"}).json()
        listed = admin.get(f"/v1/admin/tenants/{tenant.id}/keys").text
    plaintext = made["key"]
    assert plaintext.startswith("tm-") and len(plaintext) > 40
    assert plaintext not in listed
    with s.client(plaintext) as c:
        assert _live(c) == 200  # used once, so any cache or log would have seen it
    row = next(k for k in s.store.keys.list_keys(tenant.id) if k.id == made["id"])
    assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert row.prefix == plaintext[:11]  # a short prefix to recognise it, 8 of its 43 random characters
    # No column of any table holds the plaintext (or its random part).
    engine = create_engine(s.database_url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for values in conn.execute(select(table)):
                    text = repr(tuple(values))
                    assert plaintext[3:] not in text, f"table {table.name} holds the key's plaintext"
    finally:
        engine.dispose()
    for server in s.servers:
        assert plaintext[3:] not in server.proc.log(10**7), "an API log holds the key"
    assert plaintext[3:] not in s.worker.log(10**7)


def test_admin_routes_refuse_tenant_keys_and_change_nothing(relsec_stack: Stack) -> None:  # noqa: F811
    s = relsec_stack
    key = s.key("globex-relsec")
    victim = s.tenant_id("acme-relsec")
    before = {t.id for t in s.store.keys.list_tenants()}
    keys_before = len(s.store.keys.list_keys(victim))
    with s.client(key) as c:
        attempts = [c.post("/v1/admin/tenants", json={"name": "evil-tenant"}),
                    c.post(f"/v1/admin/tenants/{victim}/keys", json={"name": "backdoor"}),
                    c.get(f"/v1/admin/tenants/{victim}/keys"),
                    c.delete(f"/v1/admin/tenants/{victim}"),
                    c.get("/v1/usage", params={"group_by": ["tenant"]})]
    assert [r.status_code for r in attempts[:4]] == [403] * 4, [r.text for r in attempts]
    assert all(_error_code(r) == "admin_key_required" for r in attempts[:4])
    # a tenant asking to group usage by tenant gets its own totals only
    assert attempts[4].status_code == 200, attempts[4].text
    assert {b["tenant_id"] for b in attempts[4].json()["data"]} <= {s.tenant_id("globex-relsec")}, attempts[4].text
    assert {t.id for t in s.store.keys.list_tenants()} == before
    assert len(s.store.keys.list_keys(victim)) == keys_before
    assert s.store.keys.authenticate(s.key("acme-relsec")) is not None


@pytest.fixture
def flower_server(relsec_stack: Stack, tmp_path) -> Iterator[tuple[str, str]]:  # noqa: F811
    """`tokenmill flower` with a password, on the suite's Redis."""
    from hostile_fixtures import Proc
    from tokenmill.redis_embedded import free_port

    port, password = free_port(), f"pw-{uuid.uuid4().hex}"
    p = Proc([sys.executable, "-m", "tokenmill.cli", "flower", "--port", str(port)],
             {"TOKENMILL_REDIS_URL": relsec_stack.redis_url, "TOKENMILL_FLOWER_PASSWORD": password,
              "TOKENMILL_FLOWER_USER": "admin", "TOKENMILL_SERVED_MODELS": f"{TINY}={relsec_stack.model_dir}"},
             tmp_path / "flower.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert p.alive(), p.log()
        try:
            httpx.get(url + "/healthcheck", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, p.log()
            time.sleep(0.2)
    yield url, password
    p.stop()


def test_flower_requires_its_credentials(flower_server: tuple[str, str], tmp_path) -> None:
    url, password = flower_server
    pages = ["/", "/workers", "/tasks", "/tasks/datatable", "/broker", "/api/workers", "/api/tasks",
             "/api/task/types", "/api/queues/length", "/metrics"]
    for page in pages:
        assert httpx.get(url + page, timeout=30).status_code == 401, page
        assert httpx.get(url + page, auth=("admin", password + "x"), timeout=30).status_code == 401, page
        assert httpx.get(url + page, auth=("root", password), timeout=30).status_code == 401, page
    # Flower's control and task-sending API: refused without the password, and nothing is sent.
    r = httpx.post(url + "/api/task/send-task/tokenmill.generate", json={"args": ["job_x", 0]}, timeout=30)
    assert r.status_code == 401
    r = httpx.post(url + "/api/worker/shutdown/whoever", timeout=30)
    assert r.status_code == 401
    for page in pages[:3] + ["/api/workers", "/metrics"]:
        r = httpx.get(url + page, auth=("admin", password), timeout=30)
        assert r.status_code == 200, (page, r.status_code)
    assert httpx.get(url + "/healthcheck", timeout=30).text == "OK"  # liveness stays open, and says only that
    # And Flower does not start without a password at all.
    out = subprocess.run([sys.executable, "-m", "tokenmill.cli", "flower", "--port", "1"], cwd=REPO, timeout=60,
                         capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TOKENMILL_FLOWER_PASSWORD"}
                         | {"TOKENMILL_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2 and "TOKENMILL_FLOWER_PASSWORD" in out.stderr, out.stderr
