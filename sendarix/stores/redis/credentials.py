"""ICredentialStore in Redis: every node reads the same credentials, so ``revoke`` and
``rotate`` apply on all of them at once (the checker re-reads a credential on every
attempt; see :class:`sendarix.ingress.auth.CredentialChecker`).

Keys under ``prefix``: ``cred:c:NAME`` is a hash holding one credential (versioned
JSON fields, as the SQLite store's columns), ``cred:names`` a sorted set of every name
(for listing in name order).  Each change is one Lua script, so it is atomic.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import ICredentialStore
from sendarix.model.credential import Credential
from sendarix.stores.credentials import (
    CredentialExistsError,
    CredentialNotFoundError,
    CredentialStoreBase,
)

log = Logger()

#: Version of the stored record; a newer one is refused rather than misread.
FORMAT = 1

# ARGV: prefix, name, record JSON.
_ADD = """
local key = ARGV[1] .. 'cred:c:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, 'record', ARGV[3], 'revoked_at', '', 'secret_hash', ARGV[4])
redis.call('ZADD', ARGV[1] .. 'cred:names', 0, ARGV[2])
return 1
"""

# ARGV: prefix, name, now.
_REVOKE = """
local key = ARGV[1] .. 'cred:c:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return 0 end
if redis.call('HGET', key, 'revoked_at') == '' then
  redis.call('HSET', key, 'revoked_at', ARGV[3])
end
return 1
"""

# ARGV: prefix, name, new hash.
_ROTATE = """
local key = ARGV[1] .. 'cred:c:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 or redis.call('HGET', key, 'revoked_at') ~= '' then
  return 0
end
redis.call('HSET', key, 'secret_hash', ARGV[3])
return 1
"""

# ARGV: prefix, names.  JSON list of [record, revoked_at, secret_hash] for those found.
_GET = """
local found = {}
for i = 2, #ARGV do
  local v = redis.call('HMGET', ARGV[1] .. 'cred:c:' .. ARGV[i],
                       'record', 'revoked_at', 'secret_hash')
  if v[1] then table.insert(found, v) end
end
return cjson.encode({found = found})
"""


def _record(cred: Credential) -> str:
    d = cred.to_dict()
    for volatile in ("revoked_at", "active"):
        d.pop(volatile)
    d["v"] = FORMAT
    # repr keeps the float exactly (JSON would too, but this is explicit).
    d["created_at"] = repr(cred.created_at)
    return json.dumps(d, separators=(",", ":"))


def _credential(record: str, revoked_at: str, secret_hash: str) -> Credential:
    d = json.loads(record)
    if int(d.get("v", 0)) > FORMAT:
        raise ValueError(f"credential record format {d['v']} is newer than this Sendarix")
    d["created_at"] = float(d["created_at"])
    d["revoked_at"] = float(revoked_at) if revoked_at else None
    d["secret_hash"] = secret_hash
    return Credential.from_dict(d)


@implementer(ICredentialStore)
class RedisCredentialStore(CredentialStoreBase):
    """Credentials in Redis (see the module docstring).

    ``clock`` gives ``created_at``/``revoked_at``; hashing runs in ``threads`` (or the
    clock's thread pool when it is a reactor), never on the reactor thread.
    """

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        prefix: str = "sendarix:",
        threads: IReactorThreads | None = None,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._prefix = prefix
        if threads is None and IReactorThreads.providedBy(clock):
            threads = clock  # type: ignore[assignment]
        self._threads = threads

    def _run(self, script: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._redis.eval(script, [], [self._prefix, *args])
        return d

    async def _insert(self, cred: Credential) -> None:
        if not int(await self._run(_ADD, cred.name, _record(cred), cred.secret_hash)):
            raise CredentialExistsError(f"credential {cred.name!r} already exists")

    async def _get(self, names: builtins.list[str]) -> builtins.list[Credential]:
        if not names:
            return []
        reply = await self._run(_GET, *names)
        found = json.loads(reply).get("found") or []
        return [_credential(*entry) for entry in found]

    def get(self, name: str) -> Deferred[Credential | None]:
        """The credential (active or revoked), or None."""

        async def one() -> Credential | None:
            found = await self._get([name])
            return found[0] if found else None

        return Deferred.fromCoroutine(one())

    def list(self, tenant: str | None = None) -> Deferred[builtins.list[Credential]]:
        """Every credential (of ``tenant``, if given), by name."""

        async def every() -> builtins.list[Credential]:
            names = await self._redis.execute_command(
                "ZRANGE", self._prefix + "cred:names", "0", "-1"
            )
            creds = await self._get([str(n) for n in names or []])
            return [c for c in creds if tenant is None or c.tenant == tenant]

        return Deferred.fromCoroutine(every())

    def revoke(self, name: str) -> Deferred[bool]:
        """Revoke at once; True when the credential exists (the first time is kept)."""
        d = self._run(_REVOKE, name, repr(float(self._clock.seconds())))

        def done(reply: Any) -> bool:
            existed = bool(int(reply))
            if existed:
                log.info("credential {name} revoked", name=name)
            return existed

        return d.addCallback(done)

    async def _replace_hash(self, name: str, hashed: str) -> None:
        if not int(await self._run(_ROTATE, name, hashed)):
            raise CredentialNotFoundError(f"no active credential {name!r}")
