"""Atomic delivery from kombu's Redis queue lists, and the bells that wake idle consumers.

kombu's consumer takes a task with BRPOP and only then, in the worker process, records it in its
``unacked`` hash. Between the two the task exists only in the BRPOP reply: in flight, or waiting in
the worker's socket while kombu pauses the reply until the worker has room for another task
(prefetch). A worker process that dies then takes the task with it, where neither Redis's
redelivery nor the recovery loop can see it.

Here a task is taken by `POP_SCRIPT`, one Lua script (atomic in Redis): it pops the first waiting
message of the lists, in the order BRPOP would look at them, and records it in ``unacked``,
``unacked_index`` and the owner hash (``UNACKED_OWNER_KEY``) before its reply leaves Redis. At every
instant a task is in its queue or recorded as delivered to a named worker instance.

A script cannot block, so an idle consumer waits on its queues' *bells* instead: one Redis stream
per queue (``QUEUE_BELL_KEY``, one entry kept) to which every push into the queue adds an entry
(`ring`). When the script finds nothing it returns the last entry id of each bell, and the consumer
waits with ``XREAD BLOCK`` for an entry after those ids, which takes nothing away (several consumers
may wait on one bell; a push between the script and the wait still wakes them). A push that does
not ring (a producer other than tokenmill's transport) is found at the wait's timeout, kombu's
``brpop_timeout`` (1 s).
"""

from __future__ import annotations

from typing import Any

from contract.redis_keys import QUEUE_BELL_KEY, QUEUE_BELL_TTL_S

# KEYS: the n queue lists in the order to look at them, kombu's unacked hash, its unacked index,
# the owner hash, then the m bells. ARGV: n, m, the consumer's instance id ('' records no owner),
# the delivery time. Returns {1, index of the list (1-based), message, 1 if recorded} or {0, last id
# of each bell}.
# The unacked entry is kombu's own: JSON [payload, exchange, routing key], the payload verbatim. A
# message that is not kombu's JSON is popped and returned unrecorded, as kombu's BRPOP would.
POP_SCRIPT = """
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
for i = 1, n do
    local item = redis.call('RPOP', KEYS[i])
    if item then
        local recorded = 0
        local ok, msg = pcall(cjson.decode, item)
        if ok and type(msg) == 'table' and type(msg.properties) == 'table' then
            local tag = msg.properties.delivery_tag
            local info = msg.properties.delivery_info
            if type(tag) == 'string' and type(info) == 'table' then
                redis.call('ZADD', KEYS[n + 2], ARGV[4], tag)
                redis.call('HSET', KEYS[n + 1], tag,
                           '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' ..
                           cjson.encode(info.routing_key) .. ']')
                if ARGV[3] ~= '' then
                    redis.call('HSET', KEYS[n + 3], tag, ARGV[3])
                end
                recorded = 1
            end
        end
        return {1, i, item, recorded}
    end
end
local ids = {0}
for j = 1, m do
    local last = redis.call('XREVRANGE', KEYS[n + 3 + j], '+', '-', 'COUNT', 1)
    ids[j + 1] = last[1] and last[1][1] or '0-0'
end
return ids
"""

# The same ring as `ring`, for Lua scripts that push into a queue: ``bell`` is the key.
RING_LUA = ("redis.call('XADD', {bell}, 'MAXLEN', '1', '*', 'r', '1') "
            f"redis.call('EXPIRE', {{bell}}, {QUEUE_BELL_TTL_S})")


def bell_key(queue: str) -> str:
    """The bell of a queue (all its priority lists share it)."""
    return QUEUE_BELL_KEY.format(queue=queue)


def ring_commands(queue: str) -> list[tuple[str, tuple[Any, ...]]]:
    """The Redis commands that ring ``queue``'s bell, as (redis-py method name, arguments): to run
    after the push, never before it (in the same pipeline is fine)."""
    key = bell_key(queue)
    # MAXLEN 1, exact: the last entry is all that counts. The TTL lets the bell of a queue nobody
    # pushes to any more (a dead worker's own queue) go.
    return [("xadd", (key, {"r": "1"}, "*", 1, False)), ("expire", (key, QUEUE_BELL_TTL_S))]


def ring(pipe: Any, queue: str) -> None:
    """Adds the commands that ring ``queue``'s bell to ``pipe`` (a redis-py pipeline)."""
    for name, args in ring_commands(queue):
        getattr(pipe, name)(*args)


class Commands:
    """Collects Redis commands as kombu's publish batch does (``add(name, *args)``), to run them in
    one round trip."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))

    def run(self, client: Any) -> None:
        with client.pipeline(transaction=False) as pipe:
            for name, args in self.commands:
                getattr(pipe, name)(*args)
            pipe.execute()
