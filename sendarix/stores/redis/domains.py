"""IDomainStore in Redis: sending domains and their (encrypted) DKIM keys, shared by
every node.

One hash under ``prefix``: ``dom:d`` maps each domain to its record, versioned JSON
(times travel as strings so nothing rounds them).  ``add`` is one ``HSETNX``, so two
nodes adding the same domain cannot both win; the changes to a record (``add_keys``,
``set_verified``, removing a key) are Lua scripts, atomic.  The client is a
txredisapi connection (or pool), or any object with the same ``execute_command`` and
``eval``.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IDomainStore
from sendarix.model.domain import DKIMKey, DomainExistsError, DomainNotFoundError, SendingDomain

__all__ = ["RedisDomainStore"]

#: Version of the stored record.
FORMAT = 1

# ARGV: prefix, domain, verified_at ("" for not verified), selector ("" for every key).
# The number of keys changed.
_SET_VERIFIED = """
local text = redis.call('HGET', ARGV[1] .. 'dom:d', ARGV[2])
if not text then return 0 end
local record = cjson.decode(text)
local changed = 0
for _, key in ipairs(record.keys) do
  if ARGV[4] == '' or key.selector == ARGV[4] then
    if ARGV[3] == '' then key.verified_at = cjson.null else key.verified_at = ARGV[3] end
    changed = changed + 1
  end
end
if changed > 0 then redis.call('HSET', ARGV[1] .. 'dom:d', ARGV[2], cjson.encode(record)) end
return changed
"""

# ARGV: prefix, domain, JSON list of new keys.  The record after, "" when there is no
# such domain, "!<selector>" when a selector is taken (nothing changed).
_ADD_KEYS = """
local text = redis.call('HGET', ARGV[1] .. 'dom:d', ARGV[2])
if not text then return '' end
local record = cjson.decode(text)
local new = cjson.decode(ARGV[3])
for _, k in ipairs(new) do
  for _, old in ipairs(record.keys) do
    if old.selector == k.selector then return '!' .. k.selector end
  end
end
for _, k in ipairs(new) do table.insert(record.keys, k) end
local out = cjson.encode(record)
redis.call('HSET', ARGV[1] .. 'dom:d', ARGV[2], out)
return out
"""

# ARGV: prefix, domain, selector.  1 when the key was there.
_REMOVE_KEY = """
local text = redis.call('HGET', ARGV[1] .. 'dom:d', ARGV[2])
if not text then return 0 end
local record = cjson.decode(text)
local kept, found = {}, 0
for _, k in ipairs(record.keys) do
  if k.selector == ARGV[3] then found = 1 else table.insert(kept, k) end
end
if found == 1 then
  record.keys = kept
  if #kept == 0 then record.keys = cjson.decode('[]') end
  redis.call('HSET', ARGV[1] .. 'dom:d', ARGV[2], cjson.encode(record))
end
return found
"""


def _time(value: float | None) -> str | None:
    return None if value is None else repr(float(value))


def _encode_key(k: DKIMKey) -> dict[str, Any]:
    return {"selector": k.selector, "key_type": k.key_type, "public_b64": k.public_b64,
            "private_encrypted": k.private_encrypted, "created_at": _time(k.created_at),
            "verified_at": _time(k.verified_at)}


def _encode(sd: SendingDomain) -> str:
    return json.dumps({
        "v": FORMAT,
        "domain": sd.domain,
        "tenant": sd.tenant,
        "created_at": _time(sd.created_at),
        "keys": [_encode_key(k) for k in sd.keys],
    })


def _float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _decode(text: str | bytes) -> SendingDomain:
    d = json.loads(text)
    keys = d.get("keys") or []  # cjson writes an empty list as {}
    return SendingDomain(
        domain=d["domain"],
        tenant=d.get("tenant"),
        created_at=float(d["created_at"]),
        keys=tuple(
            DKIMKey(k["selector"], k["key_type"], k["public_b64"], k["private_encrypted"],
                    float(k["created_at"]), _float(k.get("verified_at")))
            for k in keys
        ),
    )


@implementer(IDomainStore)
@define
class RedisDomainStore:
    """Sending domains in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")
    _key: str = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._key = self._prefix + "dom:d"

    def add(
        self, domain: str, tenant: str | None, keys: Sequence[DKIMKey], now: float
    ) -> Deferred[SendingDomain]:
        """Add ``domain`` unverified; :obj:`DomainExistsError` when it is already there."""
        sd = SendingDomain(domain, tenant, now, tuple(keys))
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

    def add_keys(self, domain: str, keys: Sequence[DKIMKey]) -> Deferred[SendingDomain]:
        """Add ``keys`` to a domain (rotation); DomainNotFoundError, or
        DomainExistsError when a selector is taken (then nothing is added)."""
        new = json.dumps([_encode_key(k) for k in keys])
        d: Deferred[Any] = self._redis.eval(_ADD_KEYS, [], [self._prefix, domain, new])

        def added(reply: Any) -> SendingDomain:
            text = reply.decode() if isinstance(reply, bytes) else str(reply or "")
            if not text:
                raise DomainNotFoundError(f"no domain {domain}")
            if text.startswith("!"):
                raise DomainExistsError(f"selector {text[1:]} of {domain} already exists")
            return _decode(text)

        return d.addCallback(added)

    def set_verified(
        self, domain: str, verified_at: float | None, selector: str | None = None
    ) -> Deferred[bool]:
        """Mark key ``selector`` (None: every key) verified at ``verified_at`` (None:
        not verified); True when such a key exists."""
        args = [self._prefix, domain, _time(verified_at) or "", selector or ""]
        d: Deferred[Any] = self._redis.eval(_SET_VERIFIED, [], args)
        return d.addCallback(lambda reply: int(reply) > 0)

    def remove(self, domain: str, selector: str | None = None) -> Deferred[bool]:
        """Forget one key (``selector``) or the whole domain; True when it existed."""
        if selector is not None:
            d: Deferred[Any] = self._redis.eval(_REMOVE_KEY, [], [self._prefix, domain, selector])
        else:
            d = self._redis.execute_command("HDEL", self._key, domain)
        return d.addCallback(lambda reply: bool(int(reply)))
