"""Message templates in Redis, shared by every node: a hash per tenant and template
(``tmpl:<tenant> NUL <name>``, field = version) and a sorted set of each tenant's
template names (``tmpl-names:<tenant>``)."""

from __future__ import annotations

import builtins
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ITemplateStore
from sendarix.model.template import Template

# KEYS: versions hash, names set.  ARGV: name, template JSON without version.
# The new version number and the write happen in one script.
_SAVE = """
local version = redis.call('HLEN', KEYS[1]) + 1
while redis.call('HEXISTS', KEYS[1], tostring(version)) == 1 do version = version + 1 end
local t = cjson.decode(ARGV[2])
t.version = version
local text = cjson.encode(t)
redis.call('HSET', KEYS[1], tostring(version), text)
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return text
"""

# KEYS: versions hash.  The newest version, or nil.
_LATEST = """
local best, text = -1, false
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = tonumber(all[i])
  if v > best then best, text = v, all[i + 1] end
end
return text
"""


@implementer(ITemplateStore)
@define
class RedisTemplateStore:
    """Templates in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")

    def _key(self, tenant: str, name: str) -> str:
        return f"{self._prefix}tmpl:{tenant}\x00{name}"

    def _names(self, tenant: str) -> str:
        return f"{self._prefix}tmpl-names:{tenant}"

    def save(
        self, tenant: str, name: str, subject: str | None, text: str | None,
        html: str | None, now: float,
    ) -> Deferred[Template]:
        draft = Template(tenant, name, 0, subject, text, html, now)
        d: Deferred[Any] = self._redis.eval(
            _SAVE, [self._key(tenant, name), self._names(tenant)], [name, draft.to_json()]
        )
        return d.addCallback(Template.from_json)

    def get(self, tenant: str, name: str, version: int | None = None) -> Deferred[Template | None]:
        d: Deferred[Any]
        if version is None:
            d = self._redis.eval(_LATEST, [self._key(tenant, name)], [])
        else:
            d = self._redis.hget(self._key(tenant, name), str(version))
        return d.addCallback(lambda text: Template.from_json(text) if text else None)

    def list(self, tenant: str) -> Deferred[builtins.list[Template]]:
        return Deferred.fromCoroutine(self._list(tenant))

    async def _list(self, tenant: str) -> builtins.list[Template]:
        names = await self._redis.zrange(self._names(tenant), 0, -1)
        out = []
        for name in names:
            template = await self.get(tenant, name)
            if template is not None:
                out.append(template)
        return out

    def delete(self, tenant: str, name: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._delete(tenant, name))

    async def _delete(self, tenant: str, name: str) -> bool:
        removed = await self._redis.delete(self._key(tenant, name))
        await self._redis.zrem(self._names(tenant), name)
        return bool(removed)
