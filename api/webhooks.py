"""Completion webhooks: which URLs are allowed, how a delivery is signed, and the loop that sends
them.

A job (``POST /v1/jobs``) or batch may name a ``webhook_url``; otherwise its tenant's default
applies. Once it is final, the loop composes the event (``{"type": "job.succeeded", "timestamp",
"data": <the job as GET returns it>}``), queues it in the SQL outbox (`store.webhooks`) and POSTs
it, signed the Standard Webhooks way:

    webhook-id:        the delivery's id (the same on every retry: receivers deduplicate on it)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>

with the tenant's secret (``whsec_`` + base64; the HMAC key is the decoded bytes). A 2xx answer is
a delivery; anything else (an error status, a timeout, a refused connection) is retried with
exponential backoff, 5 s doubling up to 4 h between tries, for 24 h; then it is ``failed``. It is
at least once: a receiver may see an event twice (after a crash between the POST and its record).

URLs that resolve to loopback, link-local, private, multicast or reserved addresses are refused
(400 at submission, and checked again before every attempt, since DNS may change), unless the
operator allows them (``TOKENMILL_WEBHOOK_ALLOW_PRIVATE``): a webhook must not become a way into
the cluster's own network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from api.formats import job_full
from api.queue import Dispatcher
from store import Store
from store.models import WebhookDelivery
from store.sql import utcnow
from store.webhooks import NewDelivery

log = logging.getLogger(__name__)

LOCK = "webhooks"
MAX_URL = 2000
FIRST_RETRY_S = 5.0
MAX_RETRY_S = 4 * 3600.0
GIVE_UP = timedelta(hours=24)
SEND_TIMEOUT_S = 10.0
SENDERS = 8


class WebhookUrlError(ValueError):
    """A webhook URL that is malformed or points where webhooks may not go."""


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """The URL if webhooks may be sent there, else WebhookUrlError saying why."""
    if len(url) > MAX_URL:
        raise WebhookUrlError(f"webhook_url is longer than {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlError("webhook_url must be an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookUrlError("webhook_url has an invalid port") from None
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise WebhookUrlError(f"webhook_url's host {parts.hostname!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if (address.is_loopback or address.is_link_local or address.is_private or address.is_multicast
                or address.is_reserved or address.is_unspecified):
            raise WebhookUrlError(f"webhook_url's host {parts.hostname!r} resolves to {address}, a loopback, "
                                  "link-local or private address; webhooks go to public addresses only unless "
                                  "the operator allows private ones (TOKENMILL_WEBHOOK_ALLOW_PRIVATE)")
    return url


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of the Standard Webhooks scheme."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def retry_delay(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 5 s, doubling, at most 4 h."""
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, attempts - 1))


class WebhookSender:
    """Queues the events of final jobs and batches and sends due deliveries (one API process at a
    time, every ``interval_s``)."""

    def __init__(self, store: Store, dispatcher: Dispatcher, batch_json: Any, *, allow_private: bool,
                 interval_s: float = 1.0) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._batch_json = batch_json  # (store, batch) -> the batch object as GET returns it
        self.allow_private = allow_private
        self.interval_s = interval_s
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._http = httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False)

    def start(self) -> None:
        """Starts the loop (an interval <= 0: never)."""
        if self.interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        """Stops the loop; deliveries in flight finish (each is recorded)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=SEND_TIMEOUT_S + 5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def run_once(self) -> int:
        """One pass if this process holds the lock: queue new events, send what is due; returns
        how many attempts were made."""
        if not self._dispatcher.hold(LOCK, self._token, max(30.0, SEND_TIMEOUT_S * 3)):
            return 0
        self.queue_events()
        due = self._store.webhooks.due(limit=2 * SENDERS)
        secrets: dict[str, str] = {}
        for d in due:
            if d.tenant_id not in secrets:
                secrets[d.tenant_id] = self._store.webhooks.secret(d.tenant_id)
        list(self._pool.map(lambda d: self._attempt(d, secrets[d.tenant_id]), due))
        return len(due)

    def queue_events(self) -> int:
        """Composes and queues the events of jobs and batches that became final."""
        out: list[NewDelivery] = []
        now = utcnow().isoformat()
        for job in self._store.webhooks.final_pending_jobs():
            result = self._store.jobs.get_result(job.tenant_id, job.id) if job.status == "succeeded" else None
            usage = self._store.jobs.get_usage(job.tenant_id, job.id)
            data = job_full(job, result, usage)
            data["webhook"] = None  # the delivery's own state is on the job, not in its event
            body = json.dumps({"type": f"job.{job.status}", "timestamp": now, "data": data},
                              separators=(",", ":"), default=str)
            out.append(NewDelivery(job.tenant_id, job.webhook_url or "", f"job.{job.status}", body, job_id=job.id))
        for batch in self._store.webhooks.final_pending_batches():
            data = self._batch_json(self._store, batch)
            body = json.dumps({"type": f"batch.{batch.status}", "timestamp": now, "data": data},
                              separators=(",", ":"), default=str)
            out.append(NewDelivery(batch.tenant_id, batch.webhook_url or "", f"batch.{batch.status}", body,
                                   batch_id=batch.id))
        return self._store.webhooks.queue(out)

    def _attempt(self, d: WebhookDelivery, secret: str) -> None:
        body = d.body.encode()
        status_code: int | None = None
        error: str | None = None
        try:
            check_webhook_url(d.url, allow_private=self.allow_private)
            timestamp = int(time.time())
            response = self._http.post(d.url, content=body, headers={
                "content-type": "application/json", "user-agent": "tokenmill-webhooks",
                "webhook-id": d.id, "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret, d.id, timestamp, body)})
            status_code = response.status_code
            if 200 <= status_code < 300:
                self._store.webhooks.record_attempt(d.id, delivered=True, status_code=status_code, error=None,
                                                    next_attempt_at=None)
                return
            error = f"the receiver answered {status_code}"
        except WebhookUrlError as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        next_at = utcnow() + timedelta(seconds=retry_delay(d.attempts + 1))
        if next_at - d.created_at > GIVE_UP:
            next_at = None  # type: ignore[assignment]
        self._store.webhooks.record_attempt(d.id, delivered=False, status_code=status_code, error=error,
                                            next_attempt_at=next_at)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - the store or Redis down: the next pass retries
                log.warning("webhook pass failed: %r", exc)
