"""IEventLog in Redis: the delivery log every node writes and any node searches.

Keys under ``prefix``:

- ``ev:seq``: the counter that numbers events in the order they are stored;
- ``ev:b``: hash seq -> the event's public JSON;
- ``ev:k``: hash seq -> JSON ``[id, index keys...]`` (what ``trim`` must undo);
- ``ev:ids``: hash event id -> seq, so an event emitted twice is stored once;
- ``ev:all`` and one index per searchable value (``ev:x:r:<recipient>``,
  ``ev:x:s:<sender>``, ``ev:x:q:<queue id>``, ``ev:x:m:<Message-ID>``,
  ``ev:x:y:<type>``, ``ev:x:t:<tenant>``, ``ev:x:g:<tag>``): sorted sets of seqs
  (score = seq), newest first when read backwards;
- ``ev:ts``: sorted set of seqs scored by timestamp, for retention.

A search walks the most selective index backwards from the cursor in batches and
checks every other condition on the stored event, like the SQLite log's query plan;
it stops after ``scan_limit`` entries and then returns a short page whose cursor
continues where it stopped.  Events are written in batches by one writer per
process, in the order ``emit`` was called, so seq order is emission order even
though the pool has several connections.  While Redis is unreachable the writer
(:class:`~sendarix.stores.redis.writer.BufferedScript`) keeps events in memory and
writes them once it is back; their Deferreds fire then.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IEventLog
from sendarix.model.event import MAX_LIMIT, Event, EventPage, EventQuery
from sendarix.stores.paging import decode_cursor, encode_cursor
from sendarix.stores.redis.writer import BufferedScript

log = Logger()

# ARGV: prefix, then per event: id, timestamp, body, index key count, index keys.
_EMIT = """
local P = ARGV[1]
local i = 2
local stored = 0
while i <= #ARGV do
  local id, ts, body, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local keys = {}
  for j = 1, n do keys[j] = ARGV[i + 3 + j] end
  i = i + 4 + n
  if redis.call('HSETNX', P .. 'ev:ids', id, '') == 1 then
    local seq = redis.call('INCR', P .. 'ev:seq')
    redis.call('HSET', P .. 'ev:ids', id, seq)
    redis.call('HSET', P .. 'ev:b', seq, body)
    redis.call('ZADD', P .. 'ev:all', seq, seq)
    redis.call('ZADD', P .. 'ev:ts', ts, seq)
    for _, key in ipairs(keys) do redis.call('ZADD', P .. key, seq, seq) end
    table.insert(keys, 1, id)
    redis.call('HSET', P .. 'ev:k', seq, cjson.encode(keys))
    stored = stored + 1
  end
end
return stored
"""

# ARGV: prefix, index key, max seq (exclusive, or '+inf'), count.  JSON: rows [[seq, body]...],
# how many index entries were read, and the last one.
_SCAN = """
local P = ARGV[1]
local seqs = redis.call('ZREVRANGEBYSCORE', P .. ARGV[2], ARGV[3], '-inf',
                        'LIMIT', 0, tonumber(ARGV[4]))
local rows = {}
if #seqs > 0 then
  local bodies = redis.call('HMGET', P .. 'ev:b', unpack(seqs))
  for j, seq in ipairs(seqs) do
    if bodies[j] then table.insert(rows, {seq, bodies[j]}) end
  end
end
local last = false
if #seqs > 0 then last = seqs[#seqs] end
return cjson.encode({rows = rows, scanned = #seqs, last = last})
"""

# ARGV: prefix, before (exclusive), count.  The number of events deleted.
_TRIM = """
local P = ARGV[1]
local seqs = redis.call('ZRANGEBYSCORE', P .. 'ev:ts', '-inf', '(' .. ARGV[2],
                        'LIMIT', 0, tonumber(ARGV[3]))
for _, seq in ipairs(seqs) do
  local k = redis.call('HGET', P .. 'ev:k', seq)
  if k then
    local keys = cjson.decode(k)
    redis.call('HDEL', P .. 'ev:ids', keys[1])
    for j = 2, #keys do redis.call('ZREM', P .. keys[j], seq) end
  end
  redis.call('HDEL', P .. 'ev:b', seq)
  redis.call('HDEL', P .. 'ev:k', seq)
  redis.call('ZREM', P .. 'ev:all', seq)
  redis.call('ZREM', P .. 'ev:ts', seq)
end
return #seqs
"""


def _address(value: str) -> str:
    return value.strip().lower()


def _message_id(value: str) -> str:
    return value.strip().removeprefix("<").removesuffix(">")


def index_keys(event: Event) -> list[str]:
    """The index keys (below the prefix) an event is filed under."""
    keys = [f"ev:x:y:{event.type}"]
    for code, value in (
        ("s", _address(event.sender) if event.sender is not None else None),
        ("q", event.queue_id),
        ("m", _message_id(event.message_id) if event.message_id is not None else None),
        ("t", event.tenant),
    ):
        if value is not None:
            keys.append(f"ev:x:{code}:{value}")
    keys += [f"ev:x:r:{r}" for r in sorted({_address(r) for r in event.all_recipients()})]
    keys += [f"ev:x:g:{t}" for t in sorted(set(event.tags))]
    return keys


def _driving_index(q: EventQuery) -> str:
    """The index a search walks: the most selective condition the query has."""
    for code, value in (
        ("q", q.queue_id),
        ("m", _message_id(q.message_id) if q.message_id is not None else None),
        ("r", _address(q.recipient) if q.recipient is not None else None),
        ("s", _address(q.sender) if q.sender is not None else None),
        ("g", q.tag),
        ("t", q.tenant),
        ("y", q.type),
    ):
        if value is not None:
            return f"ev:x:{code}:{value}"
    return "ev:all"


def matches(event: Event, q: EventQuery) -> bool:
    """True when ``event`` satisfies every condition of ``q`` (cursor aside)."""
    if q.recipient is not None and _address(q.recipient) not in {
        _address(r) for r in event.all_recipients()
    }:
        return False
    if q.sender is not None and (
        event.sender is None or _address(event.sender) != _address(q.sender)
    ):
        return False
    if q.message_id is not None and (
        event.message_id is None or _message_id(event.message_id) != _message_id(q.message_id)
    ):
        return False
    for wanted, actual in (
        (q.queue_id, event.queue_id), (q.type, event.type), (q.tenant, event.tenant)
    ):
        if wanted is not None and wanted != actual:
            return False
    if q.tag is not None and q.tag not in event.tags:
        return False
    if q.since is not None and event.timestamp < q.since:
        return False
    return not (q.until is not None and event.timestamp >= q.until)


@implementer(IEventLog)
class RedisEventLog:
    """The delivery log in Redis (see the module docstring).  ``emit`` is idempotent
    by event id."""

    #: Events deleted per script by ``trim``, so other clients are not held up.
    trim_batch = 1000
    #: Index entries read per round trip while searching.
    scan_batch = 500
    #: Index entries one search reads at most before it returns a short page.
    scan_limit = 100_000
    #: Events written per script.
    emit_batch = 200

    def __init__(self, redis: Any, prefix: str = "sendarix:", clock: Any = None) -> None:
        self._redis = redis
        self._prefix = prefix
        if clock is None:
            from twisted.internet import reactor as clock
        #: The writes of ``emit``, kept across an outage.
        self.writer = BufferedScript(
            lambda args: self._run(_EMIT, *args), self.emit_batch, clock, "events not logged"
        )

    def _run(self, script: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._redis.eval(script, [], [self._prefix, *args])
        return d

    # -- writing --------------------------------------------------------------------

    def emit(self, event: Event) -> Deferred[None]:
        """Store one event; the Deferred fires once Redis has it."""
        keys = index_keys(event)
        body = event.stored_json()
        return self.writer.write(
            [event.id, repr(float(event.timestamp)), body, str(len(keys)), *keys]
        )

    def close(self) -> Deferred[None]:
        """Before the connection closes: fires once the events waiting are written
        (see :meth:`BufferedScript.close`)."""
        return self.writer.close()

    # -- reading --------------------------------------------------------------------

    def search(self, query: EventQuery) -> Deferred[EventPage]:
        """Matching events newest first (at most ``min(query.limit, MAX_LIMIT)``);
        ValueError for a bad cursor."""
        try:
            before = decode_cursor(query.cursor) if query.cursor is not None else None
        except ValueError:
            return fail()
        return Deferred.fromCoroutine(self._search(query, before))

    async def _search(self, query: EventQuery, before: int | None) -> EventPage:
        limit = min(query.limit, MAX_LIMIT)
        index = _driving_index(query)
        found: list[tuple[int, Event]] = []
        bound = "+inf" if before is None else f"({before}"
        scanned = 0
        while True:
            reply = await self._run(_SCAN, index, bound, str(self.scan_batch))
            document = json.loads(reply)
            rows = document.get("rows") or []
            for seq, body in rows:
                event = Event.from_json(json.loads(body))
                if matches(event, query):
                    found.append((int(seq), event))
                    if len(found) > limit:
                        page = tuple(e for _, e in found[:limit])
                        return EventPage(page, encode_cursor(found[limit - 1][0]))
            count = int(document.get("scanned", 0))
            scanned += count
            if count < self.scan_batch:
                return EventPage(tuple(e for _, e in found), None)
            last = int(document["last"])
            bound = f"({last}"
            if scanned >= self.scan_limit:
                # A long walk: hand back what was found and where to go on.
                return EventPage(tuple(e for _, e in found), encode_cursor(last))

    def trim(self, before: float) -> Deferred[int]:
        """Delete events with a timestamp before ``before``; the count deleted."""

        async def go() -> int:
            total = 0
            while True:
                deleted = int(await self._run(_TRIM, repr(float(before)), str(self.trim_batch)))
                total += deleted
                if deleted < self.trim_batch:
                    return total

        return Deferred.fromCoroutine(go())
