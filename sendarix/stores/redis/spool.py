"""The shared spool: ISpool on Redis, for several nodes (docs/scaling.md).

Keys, all under ``prefix`` (``Q`` is a queue id):

- ``format``: the spool's record format;
- ``ids``: sorted set of queue ids (score 0, so listing pages in queue-id order);
- ``m:Q``: hash with the envelope and metadata (versioned JSON), size, receive time
  and the recipients in envelope order;
- ``b:Q``: the body bytes, once per message;
- ``r:Q``: hash address -> recipient record (versioned JSON);
- ``due``: sorted set of deliveries, member ``Q|domain``, score the time it is due;
- ``l:Q``: hash domain -> ``expires|node``, the lease on a delivery;
- ``n:NODE``: set of the deliveries a node holds (for ``reclaim``);
- ``stats``: hash ``status|domain`` -> recipient count.

As in the SQLite spool, a leased delivery's due time is its lease expiry, so the due
set skips deliveries in flight and offers an abandoned one as soon as its lease ends.
Every change is one Lua script, so it is atomic.  What a recipient's record becomes
after an outcome is decided in Python by :mod:`sendarix.stores.codec` (the same code the
SQLite spool uses); the script then writes it only if the lease and the records read
are unchanged (compare and set), and the caller retries otherwise.

Scripts answer JSON text (or an integer) and bodies come back behind a marker byte,
because txredisapi turns numeric-looking replies into numbers.  Times travel as
``repr`` strings, never through Lua's number formatting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sendarix.interfaces import ISelectiveLease, ISpool
from sendarix.model.message import (
    Lease,
    LeasedDelivery,
    NewMessage,
    QueueStats,
    RecipientOutcome,
    RecipientRecord,
    RecipientStatus,
    Reply,
    StoredMessage,
)
from sendarix.stores import codec
from sendarix.stores.errors import DuplicateQueueId, LeaseLost, SpoolError
from sendarix.stores.redis.connection import RedisUnavailable

log = Logger()

_CAS_ATTEMPTS = 20
"""How often a compare-and-set write is retried when another writer got in between."""

_LIST_BATCH = 200

# Functions every script shares.  ARGV[1] is always the key prefix.
_PRELUDE = """
local P = ARGV[1]
local ACTIVE = {pending = true, deferred = true}

local function split(s)
  local i = string.find(s, '|', 1, true)
  return string.sub(s, 1, i - 1), string.sub(s, i + 1)
end

local function count(status, domain, by)
  local field = status .. '|' .. domain
  if redis.call('HINCRBY', P .. 'stats', field, by) <= 0 then
    redis.call('HDEL', P .. 'stats', field)
  end
end

local function holder(q, domain)
  local lease = redis.call('HGET', P .. 'l:' .. q, domain)
  if not lease then return nil end
  local expires, node = split(lease)
  return node, expires
end

local function drop_lease(q, domain)
  local node = holder(q, domain)
  if node then
    redis.call('SREM', P .. 'n:' .. node, q .. '|' .. domain)
    redis.call('HDEL', P .. 'l:' .. q, domain)
  end
end

-- Clear the lease and make the delivery due at its earliest active recipient's time
-- (a pending one at the message's receive time); false when none is active.
local function reschedule(q, domain)
  drop_lease(q, domain)
  local created = tonumber(redis.call('HGET', P .. 'm:' .. q, 'created') or '0')
  local earliest = nil
  local records = redis.call('HVALS', P .. 'r:' .. q)
  for _, text in ipairs(records) do
    local r = cjson.decode(text)
    if r.domain == domain and ACTIVE[r.status] then
      local t = created
      if r.next_attempt ~= cjson.null and r.next_attempt ~= nil then t = r.next_attempt end
      if earliest == nil or t < earliest then earliest = t end
    end
  end
  if earliest == nil then
    redis.call('ZREM', P .. 'due', q .. '|' .. domain)
    return false
  end
  redis.call('ZADD', P .. 'due', earliest, q .. '|' .. domain)
  return true
end

local function remove_message(q)
  local existed = redis.call('EXISTS', P .. 'm:' .. q) == 1
  local leases = redis.call('HGETALL', P .. 'l:' .. q)
  for i = 1, #leases, 2 do
    local _, node = split(leases[i + 1])
    redis.call('SREM', P .. 'n:' .. node, q .. '|' .. leases[i])
  end
  for _, text in ipairs(redis.call('HVALS', P .. 'r:' .. q)) do
    local r = cjson.decode(text)
    count(r.status, r.domain, -1)
    redis.call('ZREM', P .. 'due', q .. '|' .. r.domain)
  end
  redis.call('DEL', P .. 'm:' .. q, P .. 'b:' .. q, P .. 'r:' .. q, P .. 'l:' .. q)
  redis.call('ZREM', P .. 'ids', q)
  return existed
end

local function remove_if_finished(q)
  for _, text in ipairs(redis.call('HVALS', P .. 'r:' .. q)) do
    if ACTIVE[cjson.decode(text).status] then return false end
  end
  remove_message(q)
  return true
end

local function settle(q, domain)
  if not reschedule(q, domain) then remove_if_finished(q) end
end
"""

# ARGV: prefix, q, envelope, meta, size, created, order, body, due, then address,
# domain, record for each recipient.
_ENQUEUE = (
    _PRELUDE
    + """
local q = ARGV[2]
if redis.call('EXISTS', P .. 'm:' .. q) == 1 then return 0 end
redis.call('HSET', P .. 'm:' .. q, 'envelope', ARGV[3], 'meta', ARGV[4], 'size', ARGV[5],
           'created', ARGV[6], 'order', ARGV[7])
redis.call('SET', P .. 'b:' .. q, ARGV[8])
-- ARGV[9]: when the first attempt is due (a scheduled send's time, or now).
for i = 10, #ARGV, 3 do
  redis.call('HSET', P .. 'r:' .. q, ARGV[i], ARGV[i + 2])
  count('pending', ARGV[i + 1], 1)
  redis.call('ZADD', P .. 'due', ARGV[9], q .. '|' .. ARGV[i + 1])
end
redis.call('ZADD', P .. 'ids', 0, q)
return 1
"""
)

#: Most domains one lease poll leaves out (ARGV of one script call).
_MAX_SKIP = 500

# ARGV: prefix, node, now, expires, limit, look-past budget, domains to skip...
_LEASE = (
    _PRELUDE
    + """
local node, now, expires, limit = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
-- ARGV[7..]: domains to leave alone (ISelectiveLease).  At most ``budget`` of their
-- deliveries are looked past; beyond that they are leased like the others (the
-- delivery agent parks them), so one huge backlog cannot hide the rest for long.
local skip, skipped, budget = {}, 0, tonumber(ARGV[6])
for i = 7, #ARGV do skip[ARGV[i]] = true end
local leased = {}
while #leased < limit do
  local members = redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', ARGV[3],
                             'LIMIT', skipped, math.max(limit - #leased, 100))
  if #members == 0 then break end
  -- A member that yields no delivery is rescheduled past now or removed, and a
  -- skipped one is counted in the offset, so no pass sees one again: the loop ends.
  for _, member in ipairs(members) do
    if #leased >= limit then break end
    local q, domain = split(member)
    local message = nil
    if skip[domain] and skipped < budget then
      skipped = skipped + 1
    else
      message = redis.call('HMGET', P .. 'm:' .. q, 'envelope', 'meta', 'order')
    end
    if message == nil then
      -- left in the spool for a later poll
    elseif not message[1] then
      redis.call('ZREM', P .. 'due', member)
      remove_message(q)
    else
      local records = {}
      local order = cjson.decode(message[3])
      for _, address in ipairs(order) do
        local text = redis.call('HGET', P .. 'r:' .. q, address)
        local r = cjson.decode(text)
        if r.domain == domain and ACTIVE[r.status] and (r.next_attempt == cjson.null
            or r.next_attempt == nil or r.next_attempt <= now) then
          table.insert(records, text)
        end
      end
      if #records == 0 then
        settle(q, domain)
      else
        drop_lease(q, domain)
        redis.call('HSET', P .. 'l:' .. q, domain, expires .. '|' .. node)
        redis.call('SADD', P .. 'n:' .. node, member)
        redis.call('ZADD', P .. 'due', expires, member)
        table.insert(leased, {q, domain, message[1], message[2], records})
      end
    end
  end
end
return cjson.encode({leased = leased})
"""
)

# ARGV: prefix, q, domain, node, expires.
_RENEW = (
    _PRELUDE
    + """
local q, domain, node, expires = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if holder(q, domain) ~= node then return 0 end
redis.call('HSET', P .. 'l:' .. q, domain, expires .. '|' .. node)
redis.call('ZADD', P .. 'due', expires, q .. '|' .. domain)
return 1
"""
)

# ARGV: prefix, q, domain, node.
_RELEASE = (
    _PRELUDE
    + """
local q, domain, node = ARGV[2], ARGV[3], ARGV[4]
if holder(q, domain) ~= node then return 0 end
settle(q, domain)
return 1
"""
)

# ARGV: prefix, node.
_RECLAIM = (
    _PRELUDE
    + """
local node = ARGV[2]
local released = 0
for _, member in ipairs(redis.call('SMEMBERS', P .. 'n:' .. node)) do
  local q, domain = split(member)
  if holder(q, domain) == node then
    settle(q, domain)
    released = released + 1
  end
end
redis.call('DEL', P .. 'n:' .. node)
return released
"""
)

# ARGV: prefix, node, then the deliveries the node's process still holds.  Release
# every other lease the node has: ones granted by a lease script whose answer was
# lost, and ones whose release failed while Redis was unreachable.
_RELEASE_UNKNOWN = (
    _PRELUDE
    + """
local node = ARGV[2]
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local released = 0
for _, member in ipairs(redis.call('SMEMBERS', P .. 'n:' .. node)) do
  if not keep[member] then
    local q, domain = split(member)
    if holder(q, domain) == node then
      settle(q, domain)
      released = released + 1
    else
      redis.call('SREM', P .. 'n:' .. node, member)
    end
  end
end
return released
"""
)

# Compare and set recipient records.  ARGV: prefix, q, mode, domain, node, now, then
# address, expected record, new record for each change.  Mode "complete": the node
# must hold the lease on the domain, which is then settled; mode "retry": deliveries
# of the changed recipients that are not leased become due at now.
_UPDATE = (
    _PRELUDE
    + """
local q, mode, domain, node, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if mode == 'complete' and holder(q, domain) ~= node then return 'lost' end
for i = 7, #ARGV, 3 do
  if redis.call('HGET', P .. 'r:' .. q, ARGV[i]) ~= ARGV[i + 1] then return 'conflict' end
end
local touched = {}
for i = 7, #ARGV, 3 do
  local old, new = cjson.decode(ARGV[i + 1]), cjson.decode(ARGV[i + 2])
  count(old.status, old.domain, -1)
  count(new.status, new.domain, 1)
  redis.call('HSET', P .. 'r:' .. q, ARGV[i], ARGV[i + 2])
  touched[new.domain] = true
end
if mode == 'complete' then
  settle(q, domain)
else
  for d, _ in pairs(touched) do
    if not holder(q, d) then redis.call('ZADD', P .. 'due', now, q .. '|' .. d) end
  end
end
return 'ok'
"""
)

# ARGV: prefix, queue ids.  The stored documents of those that exist.
_READ = """
local P = ARGV[1]
local found = {}
for i = 2, #ARGV do
  local q = ARGV[i]
  local m = redis.call('HMGET', P .. 'm:' .. q, 'envelope', 'meta', 'size', 'order')
  if m[1] then
    local records = {}
    for _, address in ipairs(cjson.decode(m[4])) do
      table.insert(records, redis.call('HGET', P .. 'r:' .. q, address))
    end
    table.insert(found, {q, m[1], m[2], m[3], records})
  end
end
return cjson.encode({found = found})
"""

# ARGV: prefix, q.
_DELETE = (
    _PRELUDE
    + """
if remove_message(ARGV[2]) then return 1 end
return 0
"""
)

# ARGV: prefix, q.  The body behind a marker byte (see the module docstring).
_BODY = """
local body = redis.call('GET', ARGV[1] .. 'b:' .. ARGV[2])
if not body then return false end
return 'B' .. body
"""

# ARGV: prefix.
_STATS = """
local P = ARGV[1]
return cjson.encode({messages = redis.call('ZCARD', P .. 'ids'),
                     counts = redis.call('HGETALL', P .. 'stats')})
"""

# ARGV: prefix, after (exclusive, or "-" for the start), count.
_IDS = """
local start = '-'
if ARGV[2] ~= '' then start = '(' .. ARGV[2] end
return cjson.encode({ids = redis.call('ZRANGEBYLEX', ARGV[1] .. 'ids', start, '+',
                                      'LIMIT', 0, tonumber(ARGV[3]))})
"""


async def _sleep(clock: IReactorTime, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    await d


def _time(value: float) -> str:
    # repr round-trips a float exactly; txredisapi would format it with 6 decimals.
    return repr(float(value))


def _encode_record(record: RecipientRecord) -> str:
    return codec.dump(record.to_dict())


def _decode_record(text: str) -> RecipientRecord:
    d = codec.load(text)
    return RecipientRecord(
        address=d["address"],
        domain=d["domain"],
        status=RecipientStatus(d["status"]),
        attempts=int(d["attempts"]),
        next_attempt=d.get("next_attempt"),
        last_reply=Reply.from_dict(d.get("last_reply")),
        updated_at=d.get("updated_at"),
    )


def _document(reply: Any, charset: str) -> dict[str, Any]:
    """A script's JSON answer (txredisapi hands bulk strings back as str or bytes)."""
    if isinstance(reply, bytes):
        reply = reply.decode(charset)
    document = json.loads(reply)
    return document if isinstance(document, dict) else {}


def _items(document: dict[str, Any], key: str) -> list[Any]:
    # cjson encodes an empty Lua table as {} rather than [].
    value = document.get(key) or []
    return list(value) if isinstance(value, list) else []


@implementer(ISpool, ISelectiveLease)
class RedisSpool:
    """ISpool on a txredisapi connection (or pool): many writes stay in flight at once.

    The connection must use txredisapi's default ``charset`` ("utf-8") or None.
    ``allow_volatile``: accept a Redis that does not keep an append-only file (mail
    accepted there is lost if Redis restarts).  ``owns_connection``: disconnect on
    ``stop()``.

    While Redis is unreachable every method fails at once (see
    :mod:`sendarix.stores.redis.connection`), except ``complete``: mail that was just
    delivered must not be delivered again, so it retries for up to
    ``outage_patience`` seconds (on ``clock``) until Redis answers.

    ``wait_replicas``: after storing a message, wait (at most ``wait_timeout``
    seconds) until that many replicas have it too (Redis ``WAIT``, on a connection
    taken out of the pool for the two commands, so nothing queues behind it), and
    fail the enqueue (the client hears 451 and sends again) when they do not confirm.
    """

    def __init__(
        self,
        connection: Any,
        prefix: str = "sendarix:",
        allow_volatile: bool = False,
        *,
        owns_connection: bool = False,
        clock: IReactorTime | None = None,
        outage_patience: float = 300.0,
        wait_replicas: int = 0,
        wait_timeout: float = 2.0,
    ) -> None:
        self._redis = connection
        self._prefix = prefix
        self._allow_volatile = allow_volatile
        self._owns_connection = owns_connection
        self._stopped = False
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self._clock: IReactorTime = clock  # type: ignore[assignment]
        self._outage_patience = outage_patience
        self._wait_replicas = wait_replicas
        self._wait_timeout = wait_timeout
        # Per node: the deliveries this process holds a lease on, and whether Redis
        # may hold leases for the node that this process does not know about.
        self._held: dict[str, set[str]] = {}
        self._unsure: set[str] = set()
        factory = getattr(connection, "_factory", None)
        self._charset: str = getattr(factory, "charset", None) or "utf-8"

    # -- plumbing -------------------------------------------------------------------

    def _run(self, script: str, *args: Any) -> Deferred[Any]:
        """Run a script (EVALSHA once txredisapi has loaded it) with the prefix first."""
        d: Deferred[Any] = self._redis.eval(script, [], [self._prefix, *args])
        return d

    async def _json(self, script: str, *args: Any) -> dict[str, Any]:
        return _document(await self._run(script, *args), self._charset)

    def _text(self, value: Any) -> str:
        if isinstance(value, bytes):
            return value.decode(self._charset)
        return str(value)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Check that Redis keeps what it is given, and the spool's record format."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await self._check_persistence()
        key = self._prefix + "format"
        await self._redis.execute_command("SET", key, str(codec.FORMAT), "NX")
        stored = int(self._text(await self._redis.execute_command("GET", key)))
        if stored > codec.FORMAT:
            raise SpoolError(f"spool format {stored} is newer than this Sendarix knows")

    async def _check_persistence(self) -> None:
        try:
            appendonly = await self._config("appendonly")
            fsync = await self._config("appendfsync")
        except Exception as e:
            if self._allow_volatile:
                return
            raise SpoolError(
                f"cannot read the Redis persistence settings ({e}); set allow_volatile"
                " to run the spool without that check"
            ) from e
        if appendonly != "yes":
            if self._allow_volatile:
                log.warn("Redis spool runs without an append-only file: mail can be lost")
                return
            raise SpoolError(
                "Redis does not keep an append-only file (appendonly is"
                f" {appendonly!r}): accepted mail would be lost when Redis restarts;"
                " enable appendonly (appendfsync always) or set allow_volatile"
            )
        if fsync != "always":
            log.warn(
                "Redis appendfsync is {fsync!r}: the last writes before a crash can be"
                " lost; 'always' is recommended",
                fsync=fsync,
            )

    async def _config(self, name: str) -> str:
        reply = await self._redis.execute_command("CONFIG", "GET", name)
        values = [self._text(v) for v in reply or []]
        return values[1].lower() if len(values) >= 2 else ""

    def stop(self) -> Deferred[None]:
        """Disconnect if this spool owns the connection (a second call does nothing)."""
        if self._stopped or not self._owns_connection:
            self._stopped = True
            return succeed(None)
        self._stopped = True
        d: Deferred[Any] = self._redis.disconnect()
        d.addCallback(lambda _: None)
        return d

    # -- accepting mail -------------------------------------------------------------

    def enqueue(self, message: NewMessage) -> Deferred[None]:
        """Store message, body, recipients and one delivery per domain atomically."""
        return Deferred.fromCoroutine(self._enqueue(message))

    async def _enqueue(self, message: NewMessage) -> None:
        recipients = codec.unique_recipients(message.envelope.recipients)
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        received = message.meta.received_at
        args: list[Any] = [
            message.queue_id,
            codec.encode_envelope(message.envelope),
            codec.encode_meta(message.meta),
            str(len(message.body)),
            _time(received),
            json.dumps(list(recipients)),
            message.body,
            _time(message.due),
        ]
        for address in recipients:
            domain = codec.recipient_domain(address)
            record = RecipientRecord(
                address=address,
                domain=domain,
                status=RecipientStatus.PENDING,
                attempts=0,
                next_attempt=message.not_before,
                updated_at=received,
            )
            args += [address, domain, _encode_record(record)]
        if self._wait_replicas > 0:
            stored = await self._run_replicated(_ENQUEUE, *args)
        else:
            stored = await self._run(_ENQUEUE, *args)
        if not int(stored):
            raise DuplicateQueueId(message.queue_id)

    async def _run_replicated(self, script: str, *args: Any) -> Any:
        """Run a script, then WAIT for ``wait_replicas`` replicas, on one connection
        of our own (WAIT counts that connection's writes, and blocks it)."""
        if not getattr(self._redis, "connected", True):
            raise RedisUnavailable("Redis is unreachable")
        factory = self._redis._factory
        connection = await factory.getConnection(peek=False)
        try:
            reply = await connection.eval(script, [], [self._prefix, *args])
            acked = await connection.execute_command(
                "WAIT", str(self._wait_replicas), str(int(self._wait_timeout * 1000))
            )
        finally:
            factory.connectionQueue.put(connection)
        if int(acked) < self._wait_replicas:
            raise SpoolError(
                f"only {int(acked)} of {self._wait_replicas} Redis replicas confirmed the"
                f" write within {self._wait_timeout:g} s (spool.wait_replicas)"
            )
        return reply

    # -- leases ---------------------------------------------------------------------

    def lease_due(
        self, node: str, now: float, limit: int, lease_for: float
    ) -> Deferred[list[LeasedDelivery]]:
        """Lease up to ``limit`` due deliveries, oldest due first."""
        return Deferred.fromCoroutine(self._lease_due(node, now, limit, lease_for))

    def lease_due_except(
        self, node: str, now: float, limit: int, lease_for: float,
        skip_domains: Sequence[str],
    ) -> Deferred[list[LeasedDelivery]]:
        """Lease up to ``limit`` due deliveries, oldest due first, looking past those
        to ``skip_domains`` (at most :func:`codec.look_past_limit` of them in one
        call; past that they are leased too)."""
        skip = sorted({d.lower() for d in skip_domains})[:_MAX_SKIP]
        return Deferred.fromCoroutine(self._lease_due(node, now, limit, lease_for, skip))

    async def _lease_due(
        self, node: str, now: float, limit: int, lease_for: float,
        skip: Sequence[str] = (),
    ) -> list[LeasedDelivery]:
        if lease_for <= 0:
            raise ValueError("lease_for must be positive")
        if limit <= 0:
            return []
        expires = now + lease_for
        held = self._held.setdefault(node, set())
        if node in self._unsure:
            released = int(await self._run(_RELEASE_UNKNOWN, node, *sorted(held)))
            self._unsure.discard(node)
            if released:
                log.info("released {count} leases left behind by a Redis outage",
                         count=released)
        try:
            document = await self._json(
                _LEASE, node, _time(now), _time(expires), str(int(limit)),
                str(codec.look_past_limit(limit)), *skip,
            )
        except txredisapi.ConnectionError:
            # The script may have run without our hearing the answer: leases we do
            # not know of would wait for their expiry.  Release them next time.
            self._unsure.add(node)
            raise
        leased = _items(document, "leased")
        held.update(f"{qid}|{domain}" for qid, domain, *_ in leased)
        return [
            LeasedDelivery(
                queue_id=qid,
                domain=domain,
                envelope=codec.decode_envelope(envelope),
                meta=codec.decode_meta(meta),
                recipients=tuple(_decode_record(r) for r in records),
                lease=Lease(node=node, expires=expires),
            )
            for qid, domain, envelope, meta, records in leased
        ]

    def _let_go(self, queue_id: str, domain: str, node: str, applied: bool) -> None:
        """Forget a lease we held; ``applied``: Redis has dropped it too, else it is
        released before the node's next lease."""
        self._held.get(node, set()).discard(f"{queue_id}|{domain}")
        if not applied:
            self._unsure.add(node)

    def renew(self, queue_id: str, domain: str, node: str, expires: float) -> Deferred[bool]:
        """Move ``node``'s lease expiry to ``expires``; False when it is not ours."""
        d = self._run(_RENEW, queue_id, domain, node, _time(expires))
        d.addCallback(lambda reply: bool(int(reply)))
        return d

    def release(self, queue_id: str, domain: str, node: str) -> Deferred[bool]:
        """Drop ``node``'s lease; the delivery is due again as it was before the lease.

        While Redis is unreachable the release is remembered and done before the
        node's next ``lease_due`` (so the delivery does not wait for its lease to
        expire); the Deferred then fires with False.
        """

        def released(reply: Any) -> bool:
            self._let_go(queue_id, domain, node, True)
            return bool(int(reply))

        def later(failure: Any) -> bool:
            failure.trap(txredisapi.ConnectionError)
            self._let_go(queue_id, domain, node, False)
            log.warn("releasing {queue_id} postponed: {why}", queue_id=queue_id,
                     why=failure.getErrorMessage())
            return False

        return self._run(_RELEASE, queue_id, domain, node).addCallbacks(released, later)

    def reclaim(self, node: str) -> Deferred[int]:
        """Release every lease ``node`` holds; the number released."""
        d = self._run(_RECLAIM, node)

        def done(reply: Any) -> int:
            self._held.pop(node, None)
            self._unsure.discard(node)
            return int(reply)

        d.addCallback(done)
        return d

    def complete(
        self,
        queue_id: str,
        domain: str,
        node: str,
        outcomes: Sequence[RecipientOutcome],
        now: float,
    ) -> Deferred[None]:
        """Record outcomes, release the lease; fails with LeaseLost if it is not ours.

        Outcomes for recipients that are not active at this domain (unknown, or
        already final) are ignored: a final state is never overwritten.
        """
        d = Deferred.fromCoroutine(self._complete(queue_id, domain, node, tuple(outcomes), now))

        def settled(result: Any) -> Any:
            unreachable = isinstance(result, Failure) and result.check(txredisapi.ConnectionError)
            self._let_go(queue_id, domain, node, not unreachable)
            return result

        return d.addBoth(settled)

    async def _complete(
        self,
        queue_id: str,
        domain: str,
        node: str,
        outcomes: tuple[RecipientOutcome, ...],
        now: float,
    ) -> None:
        codec.check_outcomes(outcomes)
        # What the last attempt tried to write, once an attempt may have been applied
        # without our hearing the answer (its connection dropped or timed out).
        intended: dict[str, str] = {}
        ambiguous = False
        started = self._clock.seconds()
        delay = 0.1
        while True:
            try:
                await self._complete_once(
                    queue_id, domain, node, outcomes, now, intended, ambiguous
                )
                return
            except txredisapi.ConnectionError as e:
                if self._stopped or self._clock.seconds() - started >= self._outage_patience:
                    raise
                if not isinstance(e, RedisUnavailable):
                    ambiguous = True
                if delay == 0.1:
                    log.warn(
                        "Redis unavailable recording the outcome of {queue_id}; retrying"
                        " ({error})", queue_id=queue_id, error=e,
                    )
                await _sleep(self._clock, delay)
                delay = min(delay * 2, 2.0)

    async def _complete_once(
        self,
        queue_id: str,
        domain: str,
        node: str,
        outcomes: tuple[RecipientOutcome, ...],
        now: float,
        intended: dict[str, str],
        ambiguous: bool,
    ) -> None:
        for _ in range(_CAS_ATTEMPTS):
            current = await self._records(queue_id)
            if current is None:
                if ambiguous and intended:
                    return  # our write finished the message, which is gone now
                raise LeaseLost(queue_id, domain, node)
            if ambiguous and intended and all(
                address in current and current[address][0] == text
                for address, text in intended.items()
            ):
                return  # our earlier write was applied
            changed: dict[str, RecipientRecord] = {}
            for outcome in outcomes:
                record = changed.get(outcome.address)
                if record is None and outcome.address in current:
                    record = current[outcome.address][1]
                if (
                    record is None
                    or record.domain != domain
                    or record.status not in codec.ACTIVE_STATUSES
                ):
                    continue
                changed[outcome.address] = codec.apply_outcome(record, outcome, now)
            intended.clear()
            intended.update((a, _encode_record(r)) for a, r in changed.items())
            result = await self._update(queue_id, "complete", domain, node, now, current, changed)
            if result == "lost":
                raise LeaseLost(queue_id, domain, node)
            if result == "ok":
                return
        raise SpoolError(f"too much contention recording outcomes for {queue_id}")

    async def _records(self, queue_id: str) -> dict[str, tuple[str, RecipientRecord]] | None:
        """The message's recipient records by address, each with its stored text
        (what the compare and set expects), or None."""
        found = _items(await self._json(_READ, queue_id), "found")
        if not found:
            return None
        return {r.address: (text, r) for text, r in ((t, _decode_record(t)) for t in found[0][4])}

    async def _update(
        self,
        queue_id: str,
        mode: str,
        domain: str,
        node: str,
        now: float,
        current: dict[str, tuple[str, RecipientRecord]],
        changed: dict[str, RecipientRecord],
    ) -> str:
        args: list[Any] = [queue_id, mode, domain, node, _time(now)]
        for address, new in changed.items():
            args += [address, current[address][0], _encode_record(new)]
        return self._text(await self._run(_UPDATE, *args))

    # -- inspection and operator actions ----------------------------------------------

    def get(self, queue_id: str) -> Deferred[StoredMessage | None]:
        """The stored message without its body, or None."""
        return Deferred.fromCoroutine(self._get(queue_id))

    async def _get(self, queue_id: str) -> StoredMessage | None:
        found = await self._read([queue_id])
        return found[0] if found else None

    async def _read(self, queue_ids: Sequence[str]) -> list[StoredMessage]:
        if not queue_ids:
            return []
        document = await self._json(_READ, *queue_ids)
        return [
            StoredMessage(
                queue_id=qid,
                envelope=codec.decode_envelope(envelope),
                meta=codec.decode_meta(meta),
                size=int(size),
                recipients=tuple(_decode_record(r) for r in records),
            )
            for qid, envelope, meta, size, records in _items(document, "found")
        ]

    def body(self, queue_id: str) -> Deferred[bytes | None]:
        """The message bytes exactly as enqueued, or None."""
        d = self._run(_BODY, queue_id)
        d.addCallback(self._body)
        return d

    def _body(self, reply: Any) -> bytes | None:
        if reply is None:
            return None
        data = reply.encode(self._charset) if isinstance(reply, str) else bytes(reply)
        return data[1:]

    def list_messages(
        self,
        status: RecipientStatus | str | None = None,
        domain: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Deferred[list[StoredMessage]]:
        """Messages in queue-id order after ``after`` that have a recipient with
        ``status`` (and/or) at ``domain``."""
        return Deferred.fromCoroutine(self._list(status, domain, limit, after))

    async def _list(
        self,
        status: RecipientStatus | str | None,
        domain: str | None,
        limit: int,
        after: str | None,
    ) -> list[StoredMessage]:
        wanted = None if status is None else RecipientStatus(status)
        domain = None if domain is None else domain.lower()
        limit = max(0, int(limit))
        listed: list[StoredMessage] = []
        cursor = after or ""
        while len(listed) < limit:
            ids = [
                self._text(q)
                for q in _items(await self._json(_IDS, cursor, str(_LIST_BATCH)), "ids")
            ]
            if not ids:
                break
            cursor = ids[-1]
            for message in await self._read(ids):
                if any(
                    (wanted is None or r.status is wanted)
                    and (domain is None or r.domain == domain)
                    for r in message.recipients
                ):
                    listed.append(message)
        return listed[:limit]

    def stats(self) -> Deferred[QueueStats]:
        """Messages spooled, recipients by status and by domain (non-zero counts only)."""
        return Deferred.fromCoroutine(self._stats())

    async def _stats(self) -> QueueStats:
        document = await self._json(_STATS)
        counts = _items(document, "counts")
        by_status: dict[str, int] = {}
        by_domain: dict[str, dict[str, int]] = {}
        for field, value in zip(counts[::2], counts[1::2], strict=True):
            number = int(value)
            if number <= 0:
                continue
            status, _, domain = str(field).partition("|")
            by_status[status] = by_status.get(status, 0) + number
            by_domain.setdefault(domain, {})[status] = number
        return QueueStats(
            messages=int(document.get("messages", 0)), by_status=by_status, by_domain=by_domain
        )

    def retry(self, queue_id: str, now: float) -> Deferred[int]:
        """Make every active recipient due at ``now``; how many there were.

        A delivery in flight keeps its lease; its recipients are due once it completes.
        """
        return Deferred.fromCoroutine(self._retry(queue_id, now))

    async def _retry(self, queue_id: str, now: float) -> int:
        for _ in range(_CAS_ATTEMPTS):
            current = await self._records(queue_id)
            if current is None:
                return 0
            changed = {
                address: RecipientRecord(
                    address=r.address,
                    domain=r.domain,
                    status=r.status,
                    attempts=r.attempts,
                    next_attempt=now,
                    last_reply=r.last_reply,
                    updated_at=r.updated_at,
                )
                for address, (_, r) in current.items()
                if r.status in codec.ACTIVE_STATUSES
            }
            if await self._update(queue_id, "retry", "", "", now, current, changed) == "ok":
                return len(changed)
        raise SpoolError(f"too much contention retrying {queue_id}")

    def delete(self, queue_id: str) -> Deferred[bool]:
        """Remove a message, its body and all its keys; True when it existed.

        A node delivering it at the time gets LeaseLost when it completes.
        """
        d = self._run(_DELETE, queue_id)
        d.addCallback(lambda reply: bool(int(reply)))
        return d
