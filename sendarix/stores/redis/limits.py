"""Submission limits shared in Redis: AUTH failure lockouts and message rates per
credential and tenant, counted for the whole cluster (every node and worker) rather
than per process.

The ingress server asks its limiters synchronously, so the decision stays local and
immediate; what each process counts is also written to Redis (not waited for), and
the answer brings back what the other processes counted:

- :class:`SharedAuthLimiter` (around an :class:`~sendarix.ingress.authlimit.AuthLimiter`): each AUTH
  failure is added to ``auth:f:<client>`` (a sorted set of failure times within the
  window) and a lockout to ``auth:l:<client>``; asking about a client fetches both,
  so the next attempt of a client that failed on other nodes is slowed or refused
  here too.
- :class:`SharedRateLimiter` (around a :class:`~sendarix.ingress.ratelimit.RateLimiter`): each
  admission pushes the key's theoretical arrival time to ``rate:<key>`` (the later
  one wins) and takes back the cluster's, so every process paces from the same point.

Both lag by one request per process: a burst spread over N processes can exceed a
limit by at most N-1 requests before every process has caught up.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.ingress.authlimit import AuthLimiter, ClientRecord, client_key
from sendarix.ingress.ratelimit import RateLimiter
from sendarix.interfaces import IAuthLimiter, IRateLimiter

log = Logger()

# KEYS: failures, lockout.  ARGV: now, window, member, max failures, lockout seconds.
# The failure times within the window and the lockout end, after adding this failure.
_FAILED = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  local lockout = tonumber(ARGV[5])
  redis.call('SET', KEYS[2], string.format('%.17g', now + lockout),
             'PX', math.max(1, math.ceil(lockout * 1000)))
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS: failures, lockout.  ARGV: now, window.
_STATE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local times = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - window), '+inf', 'WITHSCORES')
local scores = {}
for i = 2, #times, 2 do table.insert(scores, times[i]) end
return cjson.encode({failures = scores, locked_until = redis.call('GET', KEYS[2]) or false})
"""

# KEYS: the key's TAT.  ARGV: our TAT, expiry ms.  The later of the two, as text:
# GcraTable.merge on the Redis side (the pacing itself stays sendarix.model.gcra's).
_TAT = """
local ours = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '') or ours
local tat = math.max(ours, stored)
redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', ARGV[2])
return string.format('%.17g', tat)
"""


def _warn(failure: Any) -> None:
    log.warn("submission limits not shared: {why}", why=failure.getErrorMessage())


@implementer(IAuthLimiter)
class SharedAuthLimiter:
    """An :class:`AuthLimiter` whose failures and lockouts every process shares via
    ``redis``: the local limiter answers, Redis tells it what the others counted."""

    # Written by hand rather than with attrs: it takes the AuthLimiter's own settings
    # (max_failures, window, ...) and builds the core from them, as the backend does.
    def __init__(self, redis: Any, *args: Any, prefix: str = "sendarix:", **kwargs: Any) -> None:
        self.local = AuthLimiter(*args, **kwargs)
        self.redis = redis
        self.prefix = prefix
        self._tag = uuid.uuid4().hex[:12]
        self._count = itertools.count()
        # Writes go out one after the other: the pool's connections would not keep
        # a failure and the success after it in order.
        self._writes: Deferred[Any] = succeed(None)

    @property
    def window(self) -> float:
        return self.local.window

    def __len__(self) -> int:
        return len(self.local)

    def _write(self, send: Callable[[], Deferred[Any]]) -> None:
        def next_write(_: Any) -> Deferred[Any]:
            return send().addErrback(_warn)

        self._writes = self._writes.addCallback(next_write)

    def _keys(self, ip: str) -> list[str]:
        key = client_key(ip)
        return [f"{self.prefix}auth:f:{key}", f"{self.prefix}auth:l:{key}"]

    def is_locked(self, ip: str, now: float) -> bool:
        """As AuthLimiter's; also fetches what other processes counted for ``ip``."""
        self.refresh(ip, now).addErrback(_warn)
        return self.local.is_locked(ip, now)

    def refresh(self, ip: str, now: float) -> Deferred[None]:
        """Take the cluster's failures and lockout of ``ip`` (the larger wins)."""
        d: Deferred[Any] = self.redis.eval(
            _STATE, self._keys(ip), [repr(float(now)), repr(float(self.local.window))]
        )
        return d.addCallback(self._merge, ip, now)

    def _merge(self, reply: Any, ip: str, now: float) -> None:
        shared = json.loads(reply)
        failures = [float(t) for t in shared.get("failures") or []]
        locked_until = float(shared["locked_until"]) if shared.get("locked_until") else 0.0
        self.local.merge(ip, ClientRecord(failures, locked_until), now)

    def failures(self, ip: str, now: float) -> int:
        """As AuthLimiter's (what this process knows)."""
        return self.local.failures(ip, now)

    def delay_for(self, ip: str, now: float) -> float:
        """As AuthLimiter's."""
        return self.local.delay_for(ip, now)

    def failed(self, ip: str, now: float) -> None:
        """Count a failure here and for the cluster."""
        self.local.failed(ip, now)
        local = self.local
        member = f"{now!r}|{self._tag}|{next(self._count)}"
        args = [repr(float(now)), repr(float(local.window)), member, str(local.max_failures),
                repr(float(local.lockout))]
        self._write(lambda: self.redis.eval(_FAILED, self._keys(ip), args))

    def succeeded(self, ip: str, now: float) -> None:
        """Forget ``ip``'s failures here and for the cluster (a lockout stays)."""
        self.local.succeeded(ip, now)
        key = self._keys(ip)[0]
        self._write(lambda: self.redis.execute_command("DEL", key))


@implementer(IRateLimiter)
@define
class SharedRateLimiter:
    """A :class:`RateLimiter` whose per-key pacing every process shares via ``redis``."""

    redis: Any = None
    prefix: str = "sendarix:"
    local: RateLimiter = field(factory=RateLimiter)

    def allow(
        self, key: str, rate: float, period: float, now: float, burst: float | None = None
    ) -> bool:
        """As RateLimiter's, from the cluster's latest pacing point for ``key``."""
        admitted = self.local.allow(key, rate, period, now, burst)
        tat = self.local.table.arrival(key)
        if tat is not None:
            ttl = max(1, int((tat - now + period) * 1000))
            d: Deferred[Any] = self.redis.eval(
                _TAT, [f"{self.prefix}rate:{key}"], [repr(float(tat)), str(ttl)]
            )
            d.addCallback(lambda reply: self.local.table.merge(key, float(reply)))
            d.addErrback(_warn)
        return admitted
