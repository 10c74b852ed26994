"""Dashboard login sessions in Redis, shared by every node: one string per session
(``dash:<SHA-256 of the id>``, the session as JSON) that Redis expires itself, and a
sorted set ``dash:seen`` (key -> last request) that bounds how many are kept."""

from __future__ import annotations

import json
import math
from typing import Any

from attrs import define, evolve, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IDashboardSessions
from sendarix.model.dashboard import Session, SessionRules, session_key

# Times travel as repr strings inside the JSON (never through Lua's number
# formatting), and scripts answer JSON text or a marked string, because txredisapi
# turns numeric-looking replies into numbers.

# ARGV: prefix, key, session JSON, ttl ms, seen, idle cutoff, limit.  Forgets the
# index entries of sessions idle past the cutoff (their strings have expired), then
# the least recently seen beyond limit - 1, then stores the new session.
_CREATE = """
local seen = ARGV[1] .. 'dash:seen'
for _, old in ipairs(redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. ARGV[6])) do
  redis.call('DEL', ARGV[1] .. 'dash:' .. old)
end
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. ARGV[6])
local over = redis.call('ZCARD', seen) - (tonumber(ARGV[7]) - 1)
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', seen, 0, over - 1)) do
    redis.call('DEL', ARGV[1] .. 'dash:' .. old)
  end
  redis.call('ZREMRANGEBYRANK', seen, 0, over - 1)
end
redis.call('SET', ARGV[1] .. 'dash:' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', seen, ARGV[5], ARGV[2])
return 1
"""

# ARGV: prefix, key, seen (a repr string), ttl ms.  A request: ``seen`` moves on and
# the time to live starts again; 0 when the session is gone meanwhile.
_TOUCH = """
local k = ARGV[1] .. 'dash:' .. ARGV[2]
local old = redis.call('GET', k)
if not old then return 0 end
local s = cjson.decode(old)
s.seen = ARGV[3]
redis.call('SET', k, cjson.encode(s), 'PX', ARGV[4])
redis.call('ZADD', ARGV[1] .. 'dash:seen', ARGV[3], ARGV[2])
return 1
"""

# ARGV: prefix, key, message ('' to take it).  Sets the message, or answers it
# (behind a '=' so that it stays a string) and clears it, keeping the time to live.
_FLASH = """
local k = ARGV[1] .. 'dash:' .. ARGV[2]
local old = redis.call('GET', k)
if not old then return false end
local s = cjson.decode(old)
local was = s.flash
if ARGV[3] ~= '' then s.flash = ARGV[3] else s.flash = nil end
redis.call('SET', k, cjson.encode(s), 'KEEPTTL')
if type(was) == 'string' then return '=' .. was end
return false
"""

# ARGV: prefix, key.
_END = """
redis.call('ZREM', ARGV[1] .. 'dash:seen', ARGV[2])
return redis.call('DEL', ARGV[1] .. 'dash:' .. ARGV[2])
"""

# ARGV: prefix, idle cutoff.  Sessions past their lifetime have already expired
# (their time to live never outlasts it); idle ones are found by the index.
_EXPIRE = """
local seen = ARGV[1] .. 'dash:seen'
local gone = 0
for _, old in ipairs(redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. ARGV[2])) do
  gone = gone + redis.call('DEL', ARGV[1] .. 'dash:' .. old)
end
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. ARGV[2])
return gone
"""


@implementer(IDashboardSessions)
@define
class RedisDashboardSessions:
    """Dashboard sessions in Redis (see the module docstring).

    Each session's string lives ``min(idle, lifetime left)``, set again on every
    request, so Redis forgets ended sessions by itself; the index only serves the
    limit on how many are kept, and its entries of expired sessions are dropped at
    the next login once they are older than the idle time.
    """

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")
    rules: SessionRules = field(factory=SessionRules)

    def create(self, session: Session) -> Deferred[None]:
        d: Deferred[Any] = self._redis.eval(_CREATE, [], [
            self._prefix, session_key(session.id), _to_json(session),
            self._ttl_ms(session, session.seen), repr(session.seen),
            repr(session.seen - self.rules.idle), max(1, self.rules.limit),
        ])
        return d.addCallback(lambda _: None)

    def get(self, session_id: str, now: float) -> Deferred[Session | None]:
        return Deferred.fromCoroutine(self._get(session_id, now))

    async def _get(self, session_id: str, now: float) -> Session | None:
        key = session_key(session_id)
        raw = await self._redis.execute_command("GET", self._prefix + "dash:" + key)
        if raw is None:
            return None
        session = _from_json(session_id, raw)
        if not self.rules.live(session, now):
            await self._redis.eval(_END, [], [self._prefix, key])
            return None
        session = evolve(session, seen=now)
        touched = await self._redis.eval(
            _TOUCH, [], [self._prefix, key, repr(now), self._ttl_ms(session, now)]
        )
        return session if int(touched) else None

    def end(self, session_id: str) -> Deferred[bool]:
        d: Deferred[Any] = self._redis.eval(_END, [], [self._prefix, session_key(session_id)])
        return d.addCallback(lambda removed: bool(int(removed)))

    def set_flash(self, session_id: str, message: str) -> Deferred[None]:
        # An empty message would read as "take it": a space is as good as nothing.
        d: Deferred[Any] = self._redis.eval(
            _FLASH, [], [self._prefix, session_key(session_id), message or " "]
        )
        return d.addCallback(lambda _: None)

    def take_flash(self, session_id: str) -> Deferred[str | None]:
        d: Deferred[Any] = self._redis.eval(_FLASH, [], [self._prefix, session_key(session_id), ""])
        return d.addCallback(lambda was: str(was)[1:] if was else None)

    def expire(self, now: float) -> Deferred[int]:
        d: Deferred[Any] = self._redis.eval(
            _EXPIRE, [], [self._prefix, repr(now - self.rules.idle)]
        )
        return d.addCallback(int)

    def _ttl_ms(self, session: Session, now: float) -> int:
        # At least 1 ms: PX refuses 0, and a session at its very end is still live.
        return max(1, math.ceil(self.rules.left(session, now) * 1000))


def _to_json(session: Session) -> str:
    value: dict[str, Any] = {
        "credential": session.credential, "secret_hash": session.secret_hash,
        "tenant": session.tenant, "operator": session.operator,
        "created": repr(session.created), "seen": repr(session.seen), "csrf": session.csrf,
    }
    if session.flash is not None:
        value["flash"] = session.flash
    return json.dumps(value)


def _from_json(session_id: str, raw: Any) -> Session:
    value = json.loads(raw)
    return Session(
        session_id, value["credential"], value["secret_hash"], value["tenant"],
        bool(value["operator"]), float(value["created"]), float(value["seen"]),
        value["csrf"], value.get("flash"),
    )
