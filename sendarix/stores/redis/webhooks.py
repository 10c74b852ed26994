"""Webhook endpoints added at run time, in Redis, shared by every node: one hash
``hook:ep`` (name -> the endpoint's JSON, secrets sealed)."""

from __future__ import annotations

import builtins
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IWebhookEndpointStore
from sendarix.model.webhook import StoredWebhook


@implementer(IWebhookEndpointStore)
@define
class RedisWebhookEndpointStore:
    """Run-time webhook endpoints in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")

    @property
    def _key(self) -> str:
        return f"{self._prefix}hook:ep"

    def add(self, endpoint: StoredWebhook) -> Deferred[bool]:
        d: Deferred[Any] = self._redis.hsetnx(self._key, endpoint.name, endpoint.to_json())
        return d.addCallback(bool)

    def get(self, name: str) -> Deferred[StoredWebhook | None]:
        d: Deferred[Any] = self._redis.hget(self._key, name)
        return d.addCallback(lambda text: StoredWebhook.from_json(text) if text else None)

    def list(self, tenant: str | None = None) -> Deferred[builtins.list[StoredWebhook]]:
        def parse(entries: dict[str, str] | None) -> builtins.list[StoredWebhook]:
            found = [StoredWebhook.from_json(v) for _, v in sorted((entries or {}).items())]
            return [e for e in found if tenant is None or e.tenant == tenant]

        d: Deferred[Any] = self._redis.hgetall(self._key)
        return d.addCallback(parse)

    def remove(self, name: str) -> Deferred[bool]:
        d: Deferred[Any] = self._redis.hdel(self._key, name)
        return d.addCallback(bool)
