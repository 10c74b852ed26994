"""IThrottle in Redis: connection caps and GCRA message rates shared by every node, so
provider and tenant limits hold for the cluster, not per node (docs/routing.md).

Keys under ``prefix``:

- ``thr:r:KEY``: a GCRA key's theoretical arrival time (TAT), with an expiry once it
  is in the past;
- ``thr:c:KEY``: a sorted set of connection slots, member a token naming the node,
  score the slot's lease expiry.

Connection slots are leases: a node renews the slots it holds every third of
``slot_ttl`` and a slot not renewed in time (its node died or lost Redis) is dropped
by the next ``acquire_connection``, so a dead node's connections come back.  The
pacing is the relay's one GCRA, :func:`sendarix.model.gcra.step`, written again in Lua
only so that a check and its update are one atomic step in Redis: its parameters come
from :meth:`sendarix.model.gcra.Pacing.of` and times from the caller (``now``), as in
:class:`sendarix.routing.throttle.MemoryThrottle`.  Methods return Deferreds.
"""

from __future__ import annotations

import uuid
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IThrottle
from sendarix.model.gcra import Pacing

log = Logger()

# sendarix.model.gcra.step, line for line: ARGV prefix, key, then Pacing.interval,
# Pacing.tolerance and now.  The TAT is stored and the wait returned as %.17g text,
# which a Python float reads back exactly, so both sides compute with the same bits.
# Answers the wait as text ("0" when admitted).  The key expires a second after its
# TAT has passed: by then step would start afresh from ``now`` anyway.
_ADMIT = """
local key = ARGV[1] .. 'thr:r:' .. ARGV[2]
local interval, tolerance, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', key) or '') or now
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 1e-9 then return string.format('%.17g', wait) end
local new = tat + interval
redis.call('SET', key, string.format('%.17g', new),
           'PX', math.ceil((new - now) * 1000) + 1000)
return '0'
"""

# ARGV: prefix, key, limit, now, expires, token, ttl ms.  1 when a slot was taken.
_ACQUIRE = """
local key = ARGV[1] .. 'thr:c:' .. ARGV[2]
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[4])
if redis.call('ZCARD', key) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', key, ARGV[5], ARGV[6])
redis.call('PEXPIRE', key, ARGV[7])
return 1
"""

# ARGV: prefix, expires, ttl ms, then key, token pairs.  How many were still held.
_RENEW = """
local held = 0
for i = 4, #ARGV, 2 do
  local key = ARGV[1] .. 'thr:c:' .. ARGV[i]
  held = held + redis.call('ZADD', key, 'XX', 'CH', ARGV[2], ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[3])
end
return held
"""


@implementer(IThrottle)
@define(eq=False)  # a node's leases: compared by identity, as a service is
class RedisThrottle:
    """Cluster-wide pacing in Redis (see the module docstring).

    ``node`` names this node in slot tokens (for operators reading Redis);
    ``burst`` is as in :class:`~sendarix.routing.throttle.MemoryThrottle`; ``clock`` drives
    slot renewal.  Call ``stop()`` when the node stops (its slots then expire).
    """

    _redis: Any
    _clock: Any
    _prefix: str = "sendarix:"
    _node: str = "node"
    burst: float = 1.0
    slot_ttl: float = 60.0
    _held: dict[str, list[str]] = field(factory=dict, init=False)
    _renewer: LoopingCall | None = field(default=None, init=False)

    def _run(self, script: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._redis.eval(script, [], [self._prefix, *args])
        return d

    def admit(self, key: str, rate: float, period: float, now: float) -> Deferred[float]:
        """0.0 when one message for ``key`` may go now (it is counted, cluster-wide),
        else the seconds until it may."""
        try:
            pacing = Pacing.of(rate, period, self.burst)
        except ValueError:
            return fail()
        d = self._run(
            _ADMIT, key, repr(pacing.interval), repr(pacing.tolerance), repr(float(now))
        )
        return d.addCallback(float)

    def acquire_connection(self, key: str, limit: int, now: float) -> Deferred[bool]:
        """Take one of ``limit`` cluster-wide connection slots for ``key``."""
        token = f"{self._node}:{uuid.uuid4().hex}"
        expires = float(now) + self.slot_ttl
        d = self._run(
            _ACQUIRE, key, str(int(limit)), repr(float(now)), repr(expires), token,
            str(int(self.slot_ttl * 2000)),
        )

        def taken(reply: Any) -> bool:
            if not int(reply):
                return False
            self._held.setdefault(key, []).append(token)
            self._start_renewing()
            return True

        return d.addCallback(taken)

    def release_connection(self, key: str) -> Deferred[None]:
        """Give back one slot this node took for ``key`` (none held: nothing)."""
        tokens = self._held.get(key)
        if not tokens:
            return succeed(None)
        token = tokens.pop()
        if not tokens:
            del self._held[key]
        d: Deferred[Any] = self._redis.execute_command(
            "ZREM", self._prefix + "thr:c:" + key, token
        )
        return d.addCallback(lambda _: None)

    def held(self) -> int:
        """Slots this node holds now."""
        return sum(len(t) for t in self._held.values())

    def connections(self, key: str) -> int:
        """Connections this node has open for ``key`` now (other nodes' are in Redis)."""
        return len(self._held.get(key, ()))

    def _start_renewing(self) -> None:
        if self._renewer is None or not self._renewer.running:
            self._renewer = LoopingCall(self.renew)
            self._renewer.clock = self._clock
            self._renewer.start(self.slot_ttl / 3.0, now=False).addErrback(
                lambda f: log.failure("renewing connection slots stopped", f)
            )

    def renew(self) -> Deferred[Any]:
        """Extend every slot this node holds by ``slot_ttl`` from now."""
        if not self._held:
            if self._renewer is not None and self._renewer.running:
                self._renewer.stop()
            return succeed(None)
        expires = self._clock.seconds() + self.slot_ttl
        args: list[str] = [repr(expires), str(int(self.slot_ttl * 2000))]
        for key, tokens in self._held.items():
            for token in tokens:
                args += [key, token]
        d = self._run(_RENEW, *args)
        d.addErrback(lambda f: log.warn("renewing connection slots failed: {why}",
                                        why=f.getErrorMessage()))
        return d

    def stop(self) -> None:
        """Stop renewing (slots still held expire after ``slot_ttl``)."""
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
