"""HTTP API idempotency keys in Redis, shared by every node: one string per key
(``idem:<scope> NUL <key>``), expiring with the record's lifetime."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IIdempotencyStore
from sendarix.model.idempotency import KEY_LIFETIME, IdempotencyRecord

# KEYS: the record.  ARGV: new record JSON, lifetime ms.  The record already there,
# or nil after storing the new claim (one script: no other claim runs in between).
_CLAIM = """
local old = redis.call('GET', KEYS[1])
if old then return old end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS: the record.  ARGV: status, body.  Keeps the record's remaining lifetime.
_FINISH = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
local rec = cjson.decode(old)
rec.status = tonumber(ARGV[1])
rec.body = ARGV[2]
redis.call('SET', KEYS[1], cjson.encode(rec), 'KEEPTTL')
return 1
"""

# KEYS: the record.  Drops it only while unfinished.
_RELEASE = """
local old = redis.call('GET', KEYS[1])
if old and cjson.decode(old).status == cjson.null then redis.call('DEL', KEYS[1]) end
return 0
"""


@implementer(IIdempotencyStore)
@define
class RedisIdempotencyStore:
    """Idempotency records in Redis; expiry is Redis's, so ``trim`` has nothing to do."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")

    def _key(self, scope: str, key: str) -> str:
        return f"{self._prefix}idem:{scope}\x00{key}"

    def claim(
        self, scope: str, key: str, fingerprint: str, now: float
    ) -> Deferred[IdempotencyRecord | None]:
        record = IdempotencyRecord(fingerprint, now)
        d: Deferred[Any] = self._redis.eval(
            _CLAIM, [self._key(scope, key)], [record.to_json(), int(KEY_LIFETIME * 1000)]
        )
        return d.addCallback(lambda old: IdempotencyRecord.from_json(old) if old else None)

    def finish(self, scope: str, key: str, status: int, body: str) -> Deferred[None]:
        d: Deferred[Any] = self._redis.eval(_FINISH, [self._key(scope, key)], [status, body])
        return d.addCallback(lambda _: None)

    def release(self, scope: str, key: str) -> Deferred[None]:
        d: Deferred[Any] = self._redis.eval(_RELEASE, [self._key(scope, key)], [])
        return d.addCallback(lambda _: None)

    def trim(self, before: float) -> Deferred[int]:
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> int:
    return 0
