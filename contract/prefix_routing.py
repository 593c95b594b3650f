"""Prefix-aware routing, the part the API and the workers share: how a prompt's prefix is hashed,
the Redis names of the prefix index and of the routing workers, and the choice of a queue.

- **Hashes.** A prompt's text (for chat: its messages rendered in a fixed plain form, since the API
  has no tokenizer) is cut into chunks of `CHUNK_CHARS` characters; each full chunk's hash chains
  the one before it, as the engine's KV block hashes do, so equal hashes mean equal prefixes. A
  chunk of 256 characters is about 64 tokens of English text, four KV blocks of 16 tokens: a prompt
  shorter than one chunk is never routed. Only the first `MAX_CHUNKS` chunks are hashed.
- **The index.** ``PREFIX_KEY`` (per model queue and hash) names the worker instance that ran, or
  was sent, a prompt with that prefix; it expires `PREFIX_TTL_S` after its last use (a TTL stands
  in for the engine's evictions, which the API cannot see).
- **The routing workers.** ``ROUTE_WORKERS_KEY`` maps each worker instance that consumes a queue
  of its own to its model queue, when it last said so (every second), and whether it accepts
  routed jobs (not once it is stopping).
- **The choice** (`choose`): the deepest prefix whose owner is live goes to that owner's own queue
  unless it waits `IMBALANCE` tasks more than the least busy live worker (load balance beats cache
  hits); a prompt with no live owner goes to the least busy live worker, which then owns it; no
  live routing worker, or a prompt shorter than a chunk: the shared model queue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

CHUNK_CHARS = 256  # ~64 tokens of English text (4 KV blocks of 16): the shortest prefix routed
MAX_CHUNKS = 32  # hashes per prompt: prefixes longer than 8192 characters count as 8192
PREFIX_TTL_S = 120  # an index entry lives this long after its last use (eviction, approximated)
PREFIX_KEY = "tokenmill:prefix:{queue}:{hash}"  # -> worker instance id
ROUTE_WORKERS_KEY = "tokenmill:route:workers"  # hash: instance -> {"queue": model queue, "seen": unix s}
ROUTE_WORKER_STALE_S = 10.0  # a routing worker not heard from for this long is not routed to
# A preferred worker waiting this many tasks more than the least busy live worker is bypassed.
IMBALANCE = 32


def prompt_text(request: Mapping[str, Any]) -> str:
    """The text whose prefixes are hashed: the prompt, token ids as text, or the messages in a
    fixed rendering (role and content of each, in order). Empty for anything else."""
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return "\x00ids:" + ",".join(str(t) for t in prompt)
    messages = request.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, Mapping):
                return ""
            parts.append(f"\x00{m.get('role', '')}\x00{m.get('content', '')}")
        return "".join(parts)
    return ""


def prefix_hashes(text: str, *, chunk_chars: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> list[str]:
    """The chained hashes of ``text``'s full chunks, shortest prefix first (hex, 16 characters)."""
    out: list[str] = []
    parent = b""
    for i in range(min(len(text) // chunk_chars, max_chunks)):
        chunk = text[i * chunk_chars:(i + 1) * chunk_chars].encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + chunk, digest_size=8).digest()
        out.append(parent.hex())
    return out


def prefix_key(queue: str, digest: str) -> str:
    return PREFIX_KEY.format(queue=queue, hash=digest)


def route_worker_entry(queue: str, seen: float, *, accepting: bool = True) -> str:
    """A ``ROUTE_WORKERS_KEY`` entry; ``accepting`` False: the worker is stopping, route nothing to it."""
    return json.dumps({"queue": queue, "seen": seen, "accepting": accepting})


def parse_route_worker(raw: bytes | str) -> tuple[str, float, bool] | None:
    """(model queue, last seen, accepting) of a ``ROUTE_WORKERS_KEY`` entry, None when unreadable."""
    try:
        entry = json.loads(raw)
        return str(entry["queue"]), float(entry["seen"]), bool(entry.get("accepting", True))
    except (ValueError, TypeError, KeyError):
        return None


def choose(owners: list[str | None], waiting: Mapping[str, int], *, imbalance: int = IMBALANCE) -> str | None:
    """The worker instance a job goes to, or None for the shared queue.

    ``owners``: per prefix hash (shortest first), the instance the index names, or None;
    ``waiting``: the live routing workers of the model and the tasks waiting in their own queues.
    """
    if not owners or not waiting:
        return None
    least = min(waiting.values())
    for owner in reversed(owners):  # the longest prefix a live worker holds
        if owner is not None and owner in waiting:
            return owner if waiting[owner] - least <= imbalance else None
    # Unknown prefix: the least busy live worker takes it (and its cache will hold it).
    return min(sorted(waiting), key=lambda i: waiting[i])
