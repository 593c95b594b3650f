"""Prefix-aware routing through the HTTP API at the default settings (routing on): chat jobs that
share a long system message are routed, run, and the second one finds the prefix in the cache."""

from __future__ import annotations

import httpx
import redis
from conftest import TINY, wait_job
from sqlalchemy import select

from contract.prefix_routing import ROUTE_WORKERS_KEY, prefix_hashes, prefix_key, prompt_text
from contract.queues import queue_for
from store import Store
from store.models import Job

SYSTEM = "You answer questions about the tokenmill job system, briefly and exactly. " * 5  # 370 characters


def test_chat_jobs_sharing_a_system_message_are_routed_to_the_worker_that_holds_it(
        api: httpx.Client, store: Store, redis_client: redis.Redis) -> None:
    ids = []
    for question in ("What is a job?", "What is a worker?"):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        r = api.post("/v1/jobs", json={"model": TINY, "messages": messages,
                                       "params": {"max_tokens": 2, "temperature": 0}})
        assert r.status_code == 202, r.text
        job = wait_job(api, r.json()["id"])
        assert job["status"] == "succeeded", job
        ids.append(job["id"])
    with store.db.read() as s:
        instances = set(s.execute(select(Job.worker_instance).where(Job.id.in_(ids))).scalars())
    assert len(instances) == 1
    instance = instances.pop()
    assert redis_client.hexists(ROUTE_WORKERS_KEY, instance)  # a routing worker
    hashes = prefix_hashes(prompt_text({"messages": [{"role": "system", "content": SYSTEM}]}))
    assert hashes, "the system message is longer than a chunk"
    # The index names the worker for the shared prefix (written by the API's routing and the worker).
    assert redis_client.get(prefix_key(queue_for(TINY), hashes[0])) == instance.encode()
    second = api.get(f"/v1/jobs/{ids[1]}").json()
    assert second["usage"]["cached_prompt_tokens"] > 0, second
