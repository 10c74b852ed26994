"""IDomainStore in Redis: sending domains and their (encrypted) DKIM keys, shared by
every node.

One hash under ``prefix``: ``dom:d`` maps each domain to its record, versioned JSON
(times travel as strings so nothing rounds them).  ``add`` is one ``HSETNX``, so two
nodes adding the same domain cannot both win; ``set_verified`` rewrites the record in
a Lua script, atomically.  The client is a txredisapi connection (or pool), or any
object with the same ``execute_command`` and ``eval``.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.domains import DKIMKey, DomainExistsError, SendingDomain
from sendarix.interfaces import IDomainStore

__all__ = ["RedisDomainStore"]

#: Version of the stored record.
FORMAT = 1

# ARGV: prefix, domain, verified_at ("" for not verified).  1 when the domain exists.
_SET_VERIFIED = """
local text = redis.call('HGET', ARGV[1] .. 'dom:d', ARGV[2])
if not text then return 0 end
local record = cjson.decode(text)
if ARGV[3] == '' then record.verified_at = cjson.null else record.verified_at = ARGV[3] end
redis.call('HSET', ARGV[1] .. 'dom:d', ARGV[2], cjson.encode(record))
return 1
"""


def _encode(sd: SendingDomain) -> str:
    return json.dumps({
        "v": FORMAT,
        "domain": sd.domain,
        "tenant": sd.tenant,
        "created_at": repr(float(sd.created_at)),
        "verified_at": None if sd.verified_at is None else repr(float(sd.verified_at)),
        "keys": [
            {"selector": k.selector, "key_type": k.key_type, "public_b64": k.public_b64,
             "private_encrypted": k.private_encrypted, "created_at": repr(float(k.created_at))}
            for k in sd.keys
        ],
    })


def _decode(text: str | bytes) -> SendingDomain:
    d = json.loads(text)
    verified = d.get("verified_at")
    return SendingDomain(
        domain=d["domain"],
        tenant=d.get("tenant"),
        created_at=float(d["created_at"]),
        verified_at=None if verified in (None, "") else float(verified),
        keys=tuple(
            DKIMKey(k["selector"], k["key_type"], k["public_b64"], k["private_encrypted"],
                    float(k["created_at"]))
            for k in d.get("keys", [])
        ),
    )


@implementer(IDomainStore)
class RedisDomainStore:
    """Sending domains in Redis (see the module docstring)."""

    def __init__(self, redis: Any, prefix: str = "sendarix:") -> None:
        self._redis = redis
        self._key = prefix + "dom:d"
        self._prefix = prefix

    def add(
        self, domain: str, tenant: str | None, keys: Sequence[DKIMKey], now: float
    ) -> Deferred[SendingDomain]:
        """Add ``domain`` unverified; L{DomainExistsError} when it is already there."""
        sd = SendingDomain(domain, tenant, now, None, tuple(keys))
        d: Deferred[Any] = self._redis.execute_command("HSETNX", self._key, domain, _encode(sd))

        def added(reply: Any) -> SendingDomain:
            if not int(reply):
                raise DomainExistsError(f"domain {domain} was already added")
            return sd

        return d.addCallback(added)

    def get(self, domain: str) -> Deferred[SendingDomain | None]:
        """The domain with its keys, or None."""
        d: Deferred[Any] = self._redis.execute_command("HGET", self._key, domain)
        return d.addCallback(lambda text: _decode(text) if text else None)

    def list(self) -> Deferred[builtins.list[SendingDomain]]:
        """Every domain, by name."""
        d: Deferred[Any] = self._redis.execute_command("HVALS", self._key)
        return d.addCallback(
            lambda texts: sorted((_decode(t) for t in texts or ()), key=lambda s: s.domain)
        )

    def set_verified(self, domain: str, verified_at: float | None) -> Deferred[bool]:
        """Mark verified at ``verified_at`` (None: not verified); True when it exists."""
        when = "" if verified_at is None else repr(float(verified_at))
        d: Deferred[Any] = self._redis.eval(_SET_VERIFIED, [], [self._prefix, domain, when])
        return d.addCallback(lambda reply: bool(int(reply)))

    def remove(self, domain: str) -> Deferred[bool]:
        """Forget ``domain`` and its keys; True when it existed."""
        d: Deferred[Any] = self._redis.execute_command("HDEL", self._key, domain)
        return d.addCallback(lambda reply: bool(int(reply)))
