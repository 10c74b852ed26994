"""The template stores (SQLite and Redis) pass one contract."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import ITemplateStore
from sendarix.stores.redis.templates import RedisTemplateStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.templates import SQLiteTemplateStore
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

reactor: Any = _reactor
T0 = 1_800_000_000.0


class TemplateContractMixin(_Base):
    store: Any

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ITemplateStore, self.store))

    async def test_versions(self) -> None:
        """Saving again makes a new version; get gives the newest or the one asked."""
        first = await self.store.save("acme", "welcome", "Hi {{ name }}", "t1", None, T0)
        second = await self.store.save("acme", "welcome", "Hello", "t2", "<p>h</p>", T0 + 1)
        self.assertEqual((first.version, second.version), (1, 2))
        latest = await self.store.get("acme", "welcome")
        self.assertEqual((latest.version, latest.text, latest.html), (2, "t2", "<p>h</p>"))
        old = await self.store.get("acme", "welcome", 1)
        self.assertEqual((old.subject, old.created_at), ("Hi {{ name }}", T0))
        self.assertIsNone(await self.store.get("acme", "welcome", 3))
        self.assertIsNone(await self.store.get("acme", "nope"))

    async def test_tenants_apart_and_delete(self) -> None:
        await self.store.save("acme", "b", "s", "t", None, T0)
        await self.store.save("acme", "a", "s", "t", None, T0)
        await self.store.save("acme", "a", "s2", "t", None, T0)
        await self.store.save("globex", "a", "g", "t", None, T0)
        listed = await self.store.list("acme")
        self.assertEqual([(t.name, t.version) for t in listed], [("a", 2), ("b", 1)])
        self.assertIsNone(await self.store.get("globex", "b"))
        self.assertTrue(await self.store.delete("acme", "a"))
        self.assertFalse(await self.store.delete("acme", "a"))
        self.assertEqual([t.name for t in await self.store.list("acme")], ["b"])
        self.assertEqual((await self.store.get("globex", "a")).subject, "g")
        again = await self.store.save("acme", "a", "new", None, None, T0)
        self.assertEqual(again.version, 1)


class SQLiteTemplateTests(TemplateContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteTemplateStore(self.db)
        self.addCleanup(self.db.close)
        return self.db.open()


class RedisTemplateTests(TemplateContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        def ready(redis: Any) -> None:
            self.store = RedisTemplateStore(redis)

        return redis_client(self).addCallback(ready)
