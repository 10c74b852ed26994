"""The webhook outbox in Redis, shared by every node: each batch is leased by one node
at a time, like a delivery.

An event is queued by the same script that writes its delivery-log entry (the steps
of :mod:`sendarix.stores.redis.eventlog`'s emit), so Redis applies both or neither.
Keys under ``prefix``:

- ``hook:p:<endpoint>``: list of events queued and not yet in a batch, each
  ``<timestamp> TAB <event JSON with its sequence>``;
- ``hook:b:<batch id>``: hash of a batch (endpoint, body, count, created, attempts,
  due, state ``ready``/``leased``/``dead``, node, error, failed_at);
- ``hook:due:<endpoint>``: sorted set of the endpoint's ready batches, scored by due time;
- ``hook:leased``: sorted set of leased batches, scored by lease expiry;
- ``hook:live:<endpoint>``: set of the endpoint's batches that are not dead;
- ``hook:dead`` and ``hook:dead:<endpoint>``: sorted sets of dead batches, scored by
  the time they were given up;
- ``hook:off``: hash endpoint -> ``<time> TAB <reason>`` of disabled endpoints.

Events are written by one writer per process, in the order ``add`` was called, so a
message's events get their sequence numbers in the order they happened.  While Redis
is unreachable the writer (the delivery log's kind) keeps them in memory and writes them
once it is back, as the delivery log does; an event id written twice is stored once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IWebhookOutbox
from sendarix.model.event import Event, format_timestamp
from sendarix.model.webhook import DeadBatch, DisabledEndpoint, WebhookBatch, new_batch_id
from sendarix.stores.redis.eventlog import index_keys
from sendarix.stores.redis.writer import BufferedScript

log = Logger()

# ARGV: prefix, then per event: id, timestamp, body, queue id ('' for none),
# index key count, index keys, endpoint count, endpoints.  The number of events stored.
_ADD = """
local P = ARGV[1]
local i = 2
local stored = 0
while i <= #ARGV do
  local id, ts, body, qid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local n = tonumber(ARGV[i + 4])
  local keys = {}
  for j = 1, n do keys[j] = ARGV[i + 4 + j] end
  local m = tonumber(ARGV[i + 5 + n])
  local first = i + 6 + n
  i = first + m
  if redis.call('HSETNX', P .. 'ev:ids', id, '') == 1 then
    -- the delivery log's entry, as its emit script writes it
    local seq = redis.call('INCR', P .. 'ev:seq')
    redis.call('HSET', P .. 'ev:ids', id, seq)
    redis.call('HSET', P .. 'ev:b', seq, body)
    redis.call('ZADD', P .. 'ev:all', seq, seq)
    redis.call('ZADD', P .. 'ev:ts', ts, seq)
    for _, key in ipairs(keys) do redis.call('ZADD', P .. key, seq, seq) end
    table.insert(keys, 1, id)
    redis.call('HSET', P .. 'ev:k', seq, cjson.encode(keys))
    stored = stored + 1
    -- the outbox's entries
    local sequence = 'null'
    if qid ~= '' then sequence = tostring(redis.call('ZCARD', P .. 'ev:x:q:' .. qid)) end
    local item = ts .. '\\t' .. string.sub(body, 1, -2) .. ',"sequence":' .. sequence .. '}'
    for j = first, first + m - 1 do
      if redis.call('HEXISTS', P .. 'hook:off', ARGV[j]) == 0 then
        redis.call('RPUSH', P .. 'hook:p:' .. ARGV[j], item)
      end
    end
  end
end
return stored
"""

# ARGV: prefix, node, now, lease until, fill time, max events, RFC 3339 now, then per
# endpoint: name, limit, that many fresh batch ids.  JSON [[id, endpoint, body,
# created, attempts, count]...].
_LEASE = """
local P, node = ARGV[1], ARGV[2]
local now, fill, maxn, stamp = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'hook:leased', '-inf', ARGV[3])) do
  redis.call('ZREM', P .. 'hook:leased', id)
  local b = redis.call('HMGET', P .. 'hook:b:' .. id, 'endpoint', 'due')
  if b[1] then
    redis.call('HSET', P .. 'hook:b:' .. id, 'state', 'ready', 'node', '')
    redis.call('ZADD', P .. 'hook:due:' .. b[1], b[2], id)
  end
end
local out = {}
local i = 8
while i <= #ARGV do
  local ep, limit = ARGV[i], tonumber(ARGV[i + 1])
  local fresh = i + 2
  i = fresh + limit
  if limit > 0 and redis.call('HEXISTS', P .. 'hook:off', ep) == 0 then
    local ids = redis.call('ZRANGEBYSCORE', P .. 'hook:due:' .. ep, '-inf', ARGV[3],
                           'LIMIT', 0, limit)
    while #ids < limit do
      local items = redis.call('LRANGE', P .. 'hook:p:' .. ep, 0, maxn - 1)
      if #items == 0 then break end
      local oldest = tonumber(string.match(items[1], '^([^\\t]*)\\t'))
      if #items < maxn and oldest > now - fill then break end
      local texts = {}
      for j, it in ipairs(items) do
        texts[j] = string.sub(it, string.find(it, '\\t', 1, true) + 1)
      end
      local id = ARGV[fresh]
      fresh = fresh + 1
      local body = '{"type":"events","timestamp":"' .. stamp .. '","data":{"events":['
                   .. table.concat(texts, ',') .. ']}}'
      redis.call('HSET', P .. 'hook:b:' .. id, 'endpoint', ep, 'body', body,
                 'count', #items, 'created', ARGV[3], 'attempts', 0, 'due', ARGV[3],
                 'state', 'ready')
      redis.call('SADD', P .. 'hook:live:' .. ep, id)
      redis.call('LTRIM', P .. 'hook:p:' .. ep, #items, -1)
      table.insert(ids, id)
    end
    for _, id in ipairs(ids) do
      redis.call('ZREM', P .. 'hook:due:' .. ep, id)
      redis.call('ZADD', P .. 'hook:leased', ARGV[4], id)
      redis.call('HSET', P .. 'hook:b:' .. id, 'state', 'leased', 'node', node)
      local b = redis.call('HMGET', P .. 'hook:b:' .. id, 'body', 'created', 'attempts', 'count')
      table.insert(out, {id, ep, b[1], b[2], b[3], b[4]})
    end
  end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""

# ARGV: prefix, batch id, node, due, error.
_RETRY = """
local P, id = ARGV[1], ARGV[2]
local key = P .. 'hook:b:' .. id
local b = redis.call('HMGET', key, 'state', 'node', 'endpoint')
if b[1] ~= 'leased' or b[2] ~= ARGV[3] then return 0 end
redis.call('ZREM', P .. 'hook:leased', id)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'state', 'ready', 'node', '', 'due', ARGV[4], 'error', ARGV[5])
redis.call('ZADD', P .. 'hook:due:' .. b[3], ARGV[4], id)
return 1
"""

# ARGV: prefix, batch id, node, error, now.
_DEAD = """
local P, id = ARGV[1], ARGV[2]
local key = P .. 'hook:b:' .. id
local b = redis.call('HMGET', key, 'state', 'node', 'endpoint')
if b[1] ~= 'leased' or b[2] ~= ARGV[3] then return 0 end
redis.call('ZREM', P .. 'hook:leased', id)
redis.call('SREM', P .. 'hook:live:' .. b[3], id)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'state', 'dead', 'node', '', 'error', ARGV[4], 'failed_at', ARGV[5])
redis.call('ZADD', P .. 'hook:dead', ARGV[5], id)
redis.call('ZADD', P .. 'hook:dead:' .. b[3], ARGV[5], id)
return 1
"""

# ARGV: prefix, batch id.
_ACK = """
local P, id = ARGV[1], ARGV[2]
local key = P .. 'hook:b:' .. id
local b = redis.call('HMGET', key, 'state', 'endpoint')
if not b[1] or b[1] == 'dead' then return 0 end
redis.call('DEL', key)
redis.call('ZREM', P .. 'hook:leased', id)
redis.call('ZREM', P .. 'hook:due:' .. b[2], id)
redis.call('SREM', P .. 'hook:live:' .. b[2], id)
return 1
"""

# ARGV: prefix, batch id, now.
_REPLAY = """
local P, id = ARGV[1], ARGV[2]
local key = P .. 'hook:b:' .. id
local b = redis.call('HMGET', key, 'state', 'endpoint')
if b[1] ~= 'dead' then return 0 end
redis.call('HSET', key, 'state', 'ready', 'attempts', 0, 'created', ARGV[3], 'due', ARGV[3])
redis.call('HDEL', key, 'failed_at')
redis.call('ZREM', P .. 'hook:dead', id)
redis.call('ZREM', P .. 'hook:dead:' .. b[2], id)
redis.call('SADD', P .. 'hook:live:' .. b[2], id)
redis.call('ZADD', P .. 'hook:due:' .. b[2], ARGV[3], id)
return 1
"""

# ARGV: prefix, dead-set key, limit.  JSON [[id, endpoint, created, attempts,
# failed_at, error, count]...].
_DEAD_LIST = """
local P = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', P .. ARGV[2], 0, tonumber(ARGV[3]) - 1)) do
  local b = redis.call('HMGET', P .. 'hook:b:' .. id, 'endpoint', 'created', 'attempts',
                       'failed_at', 'error', 'count')
  if b[1] then table.insert(out, {id, b[1], b[2], b[3], b[4], b[5] or '', b[6]}) end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""

# ARGV: prefix, node.  The number of batches made due again.
_RECLAIM = """
local P, node = ARGV[1], ARGV[2]
local count = 0
for _, id in ipairs(redis.call('ZRANGE', P .. 'hook:leased', 0, -1)) do
  local b = redis.call('HMGET', P .. 'hook:b:' .. id, 'node', 'endpoint', 'due')
  if b[1] == node then
    redis.call('ZREM', P .. 'hook:leased', id)
    redis.call('HSET', P .. 'hook:b:' .. id, 'state', 'ready', 'node', '')
    redis.call('ZADD', P .. 'hook:due:' .. b[2], b[3], id)
    count = count + 1
  end
end
return count
"""

# ARGV: prefix, before (exclusive), count.  The number of dead batches deleted.
_TRIM = """
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P .. 'hook:dead', '-inf', '(' .. ARGV[2],
                       'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local ep = redis.call('HGET', P .. 'hook:b:' .. id, 'endpoint')
  redis.call('DEL', P .. 'hook:b:' .. id)
  redis.call('ZREM', P .. 'hook:dead', id)
  if ep then redis.call('ZREM', P .. 'hook:dead:' .. ep, id) end
end
return #ids
"""


# ARGV: prefix, endpoint.  {queued events, live batches, dead batches} dropped.  A
# batch leased at the time is dropped too: its sender's ack or retry finds nothing.
_PURGE = """
local P, ep = ARGV[1], ARGV[2]
local queued = redis.call('LLEN', P .. 'hook:p:' .. ep)
local live = redis.call('SMEMBERS', P .. 'hook:live:' .. ep)
local dead = redis.call('ZRANGE', P .. 'hook:dead:' .. ep, 0, -1)
for _, id in ipairs(live) do
  redis.call('DEL', P .. 'hook:b:' .. id)
  redis.call('ZREM', P .. 'hook:leased', id)
end
for _, id in ipairs(dead) do
  redis.call('DEL', P .. 'hook:b:' .. id)
  redis.call('ZREM', P .. 'hook:dead', id)
end
redis.call('DEL', P .. 'hook:p:' .. ep, P .. 'hook:live:' .. ep, P .. 'hook:due:' .. ep,
           P .. 'hook:dead:' .. ep)
return {queued, #live, #dead}
"""

@implementer(IWebhookOutbox)
class RedisWebhookOutbox:
    """IWebhookOutbox in Redis (see the module docstring)."""

    #: Events written per script.
    add_batch = 200
    #: Dead batches deleted per script by ``trim``.
    trim_batch = 1000

    def __init__(self, redis: Any, prefix: str = "sendarix:", clock: Any = None) -> None:
        self._redis = redis
        self._prefix = prefix
        if clock is None:
            from twisted.internet import reactor as clock
        #: The writes of ``add``, kept across an outage.
        self.writer = BufferedScript(
            lambda args: self._run(_ADD, *args), self.add_batch, clock,
            "events not logged or queued for webhooks",
        )

    def _run(self, script: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._redis.eval(script, [], [self._prefix, *args])
        return d

    def add(self, event: Event, endpoints: Sequence[str]) -> Deferred[None]:
        keys = index_keys(event)
        wanted = list(dict.fromkeys(endpoints))
        body = event.stored_json()
        args = [
            event.id, repr(float(event.timestamp)), body, event.queue_id or "",
            str(len(keys)), *keys, str(len(wanted)), *wanted,
        ]  # fmt: skip
        return self.writer.write(args)

    def close(self) -> Deferred[None]:
        """Before the connection closes: fires once the events waiting are written
        (see :meth:`BufferedScript.close`)."""
        return self.writer.close()

    def lease_due(
        self, node: str, now: float, limits: Mapping[str, int], lease_for: float,
        fill_time: float, max_events: int,
    ) -> Deferred[list[WebhookBatch]]:
        args: list[str] = [
            node, repr(float(now)), repr(float(now + lease_for)), repr(float(fill_time)),
            str(max_events), format_timestamp(now),
        ]
        for endpoint, limit in sorted(limits.items()):
            count = max(0, limit)
            args += [endpoint, str(count), *(new_batch_id(now) for _ in range(count))]

        def parse(reply: str) -> list[WebhookBatch]:
            return [
                WebhookBatch(id_, endpoint, body, float(created), int(attempts), int(count))
                for id_, endpoint, body, created, attempts, count in json.loads(reply)
            ]

        return self._run(_LEASE, *args).addCallback(parse)

    def ack(self, batch_id: str) -> Deferred[bool]:
        return self._run(_ACK, batch_id).addCallback(bool)

    def retry(self, batch_id: str, node: str, due: float, error: str) -> Deferred[bool]:
        return self._run(_RETRY, batch_id, node, repr(float(due)), error).addCallback(bool)

    def dead_letter(self, batch_id: str, node: str, error: str, now: float) -> Deferred[bool]:
        return self._run(_DEAD, batch_id, node, error, repr(float(now))).addCallback(bool)

    def list_dead(self, endpoint: str | None, limit: int) -> Deferred[list[DeadBatch]]:
        key = "hook:dead" if endpoint is None else f"hook:dead:{endpoint}"

        def parse(reply: str) -> list[DeadBatch]:
            return [
                DeadBatch(id_, ep, float(created), int(attempts), float(failed), error, int(count))
                for id_, ep, created, attempts, failed, error, count in json.loads(reply)
            ]

        return self._run(_DEAD_LIST, key, str(limit)).addCallback(parse)

    def replay(self, batch_id: str, now: float) -> Deferred[bool]:
        return self._run(_REPLAY, batch_id, repr(float(now))).addCallback(bool)

    def disable(self, endpoint: str, reason: str, now: float) -> Deferred[None]:
        d = self._redis.hsetnx(self._prefix + "hook:off", endpoint, f"{float(now)!r}\t{reason}")
        return d.addCallback(lambda _: None)  # type: ignore[no-any-return]

    def enable(self, endpoint: str) -> Deferred[bool]:
        d = self._redis.hdel(self._prefix + "hook:off", endpoint)
        return d.addCallback(bool)  # type: ignore[no-any-return]

    def disabled(self) -> Deferred[list[DisabledEndpoint]]:
        def parse(entries: dict[str, str]) -> list[DisabledEndpoint]:
            out = []
            for endpoint, value in sorted(entries.items()):
                at, _, reason = value.partition("\t")
                out.append(DisabledEndpoint(endpoint, float(at), reason))
            return out

        d = self._redis.hgetall(self._prefix + "hook:off")
        return d.addCallback(parse)  # type: ignore[no-any-return]

    def reclaim(self, node: str) -> Deferred[int]:
        return self._run(_RECLAIM, node).addCallback(int)

    def trim(self, before: float) -> Deferred[int]:
        batch = self.trim_batch

        async def go() -> int:
            total = 0
            while True:
                deleted = int(await self._run(_TRIM, repr(float(before)), str(batch)))
                total += deleted
                if deleted < batch:
                    return total

        return Deferred.fromCoroutine(go())

    def purge(self, endpoint: str) -> Deferred[dict[str, int]]:
        def parse(reply: list[Any]) -> dict[str, int]:
            queued, live, dead = (int(x) for x in reply)
            return {"queued": queued, "batches": live, "dead": dead}

        return self._run(_PURGE, endpoint).addCallback(parse)

    def counts(self, endpoint: str) -> Deferred[dict[str, int]]:
        async def go() -> dict[str, int]:
            p = self._prefix
            queued = await self._redis.llen(f"{p}hook:p:{endpoint}")
            live = await self._redis.scard(f"{p}hook:live:{endpoint}")
            dead = await self._redis.zcard(f"{p}hook:dead:{endpoint}")
            return {"queued": int(queued), "batches": int(live), "dead": int(dead)}

        return Deferred.fromCoroutine(go())
