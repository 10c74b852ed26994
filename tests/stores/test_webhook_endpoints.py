"""The stores of webhook endpoints added at run time (SQLite and Redis) pass one
contract."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IWebhookEndpointStore
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE, StoredWebhook, new_endpoint_name
from sendarix.stores.redis.webhooks import RedisWebhookEndpointStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.webhooks import SQLiteWebhookEndpointStore
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

reactor: Any = _reactor
T0 = 1_800_000_000.0


def endpoint(tenant: str = "acme", name: str | None = None, **kw: Any) -> StoredWebhook:
    values: dict[str, Any] = {
        "name": name or new_endpoint_name(T0), "tenant": tenant,
        "url": "https://hooks.example/x", "events": ("delivered", "bounced"),
        "retry_schedule": STANDARD_RETRY_SCHEDULE, "created": T0, "sealed": "c2VhbGVk",
    }  # fmt: skip
    values.update(kw)
    return StoredWebhook(**values)


class WebhookEndpointContractMixin(_Base):
    store: Any

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IWebhookEndpointStore, self.store))

    async def test_add_get_list_remove(self) -> None:
        """An endpoint comes back whole; a taken name is refused; listings are per
        tenant (or all) by name; remove forgets it once."""
        a = endpoint("acme", retry_schedule=(0.0, 1.5))
        b = endpoint("globex")
        c = endpoint("acme", url="http://other.example:8080/p?q=1")
        for e in (a, b, c):
            self.assertTrue(await self.store.add(e))
        self.assertFalse(await self.store.add(endpoint("globex", name=a.name)))
        self.assertEqual(await self.store.get(a.name), a)
        self.assertIsNone(await self.store.get("wh_nope"))
        self.assertEqual(await self.store.list("acme"), sorted([a, c], key=lambda e: e.name))
        self.assertEqual(await self.store.list(), sorted([a, b, c], key=lambda e: e.name))
        self.assertEqual(await self.store.list("initech"), [])
        self.assertTrue(await self.store.remove(a.name))
        self.assertFalse(await self.store.remove(a.name))
        self.assertIsNone(await self.store.get(a.name))
        self.assertEqual(await self.store.list("acme"), [c])

    def test_names_are_unique_and_sort_by_creation(self) -> None:
        names = [new_endpoint_name(T0 + i) for i in range(50)]
        self.assertEqual(len(set(names)), 50)
        self.assertEqual(sorted(names), names)


class SQLiteWebhookEndpointTests(WebhookEndpointContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteWebhookEndpointStore(self.db)
        self.addCleanup(self.db.close)
        return self.db.open()


class RedisWebhookEndpointTests(WebhookEndpointContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        def ready(redis: Any) -> None:
            self.store = RedisWebhookEndpointStore(redis)

        return redis_client(self).addCallback(ready)
