"""ISuppressionStore in Redis: one suppression list per tenant, shared by every node.

Keys under ``prefix``: ``supp:e`` is a hash from ``tenant NUL address`` to the entry
(versioned JSON); ``supp:idx`` a sorted set of the same members, all with score 0, so
ZRANGEBYLEX lists them in (tenant, address) order, byte for byte the order the SQLite
store uses.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from sendarix.interfaces import ISuppressionStore
from sendarix.model.suppression import Suppression
from sendarix.stores.paging import page_start

#: Version of the stored entry.
FORMAT = 1

_SEP = "\x00"

# ARGV: prefix, member, entry JSON, reason.
_ADD = """
local P = ARGV[1]
local old = redis.call('HGET', P .. 'supp:e', ARGV[2])
if old then
  if ARGV[4] ~= '' then
    local entry = cjson.decode(old)
    entry.reason = ARGV[4]
    -- created_at travels as a string, so re-encoding cannot round it.
    redis.call('HSET', P .. 'supp:e', ARGV[2], cjson.encode(entry))
  end
  return 0
end
redis.call('HSET', P .. 'supp:e', ARGV[2], ARGV[3])
redis.call('ZADD', P .. 'supp:idx', 0, ARGV[2])
return 1
"""

# ARGV: prefix, member.
_REMOVE = """
local removed = redis.call('HDEL', ARGV[1] .. 'supp:e', ARGV[2])
redis.call('ZREM', ARGV[1] .. 'supp:idx', ARGV[2])
return removed
"""

# ARGV: prefix, min, max, count.  The entries of a ZRANGEBYLEX page, as JSON.
_LIST = """
local members = redis.call('ZRANGEBYLEX', ARGV[1] .. 'supp:idx', ARGV[2], ARGV[3],
                           'LIMIT', 0, tonumber(ARGV[4]))
local entries = {}
if #members > 0 then entries = redis.call('HMGET', ARGV[1] .. 'supp:e', unpack(members)) end
return cjson.encode({entries = entries})
"""


def _member(tenant: str, address: str) -> str:
    return f"{tenant}{_SEP}{address.strip().lower()}"


def _entry(text: str) -> Suppression:
    d = json.loads(text)
    return Suppression(d["tenant"], d["address"], d["reason"], d["source"], float(d["created_at"]))


@implementer(ISuppressionStore)
@define
class RedisSuppressionStore:
    """Per-tenant suppression lists in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")

    def _run(self, script: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._redis.eval(script, [], [self._prefix, *args])
        return d

    def add(
        self, tenant: str, address: str, reason: str, source: str, now: float
    ) -> Deferred[bool]:
        """Suppress ``address`` for ``tenant``; True when new, False when it was there
        (a non-empty reason replaces the old one)."""
        try:
            entry = Suppression(tenant, address, reason, source, now)
        except ValueError:
            return fail()
        record = entry.to_dict()
        record["created_at"] = repr(float(entry.created_at))
        record["v"] = FORMAT
        d = self._run(
            _ADD, _member(entry.tenant, entry.address), json.dumps(record), entry.reason
        )
        return d.addCallback(lambda reply: bool(int(reply)))

    def is_suppressed(self, tenant: str, address: str) -> Deferred[Suppression | None]:
        """The entry for ``address`` in ``tenant``'s list, or None."""
        d: Deferred[Any] = self._redis.execute_command(
            "HGET", self._prefix + "supp:e", _member(tenant, address)
        )
        return d.addCallback(lambda text: _entry(text) if text else None)

    def remove(self, tenant: str, address: str) -> Deferred[bool]:
        """Lift the suppression; True when there was one."""
        d = self._run(_REMOVE, _member(tenant, address))
        return d.addCallback(lambda reply: bool(int(reply)))

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        after: str | tuple[str, str] | None = None,
    ) -> Deferred[builtins.list[Suppression]]:
        """Up to ``limit`` entries in (tenant, address) order (all tenants' when
        ``tenant`` is None), after an address of ``tenant`` or a (tenant, address)."""
        try:
            after = page_start(tenant, after)
        except ValueError:
            return fail()
        low = "-" if tenant is None else "[" + tenant + _SEP
        high = "+" if tenant is None else "(" + tenant + chr(1)
        if after is not None:
            start = _member(after[0], after[1])
            if low == "-" or start >= low[1:]:
                low = "(" + start
        count = max(0, int(limit))
        if count == 0:
            return Deferred.fromCoroutine(_empty())
        d = self._run(_LIST, low, high, str(count))

        def entries(reply: Any) -> builtins.list[Suppression]:
            found = json.loads(reply).get("entries") or []
            return [_entry(t) for t in found if isinstance(t, str)]

        return d.addCallback(entries)


async def _empty() -> builtins.list[Suppression]:
    return []
