"""Hourly event counts: the SQLite and Redis stores pass one contract, and the sink
that feeds them counts in memory and flushes (with a fake clock)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sendarix.events.stats import StatsSink, hour_of
from sendarix.interfaces import IStatsStore
from sendarix.model.event import Event
from sendarix.stores.redis.stats import RedisStatsStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.stats import SQLiteStatsStore
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

reactor: Any = _reactor
H0 = 1_800_000_000.0 // 3600 * 3600


class StatsContractMixin(_Base):
    store: Any

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IStatsStore, self.store))

    async def test_counts_add_up_and_filter(self) -> None:
        await self.store.add({(H0, "acme", "delivered", "gmail"): 2,
                              (H0, "globex", "bounced", "other"): 1})
        await self.store.add({(H0, "acme", "delivered", "gmail"): 3,
                              (H0 + 3600, "acme", "deferred", "other"): 1})
        rows = sorted(await self.store.query(H0, H0 + 7200))
        self.assertEqual(rows, [(H0, "acme", "delivered", "gmail", 5),
                                (H0, "globex", "bounced", "other", 1),
                                (H0 + 3600, "acme", "deferred", "other", 1)])
        self.assertEqual(await self.store.query(H0 + 3600, H0 + 7200, "globex"), [])
        self.assertEqual(len(await self.store.query(H0, H0 + 3600, "acme")), 1)


class SQLiteStatsTests(StatsContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteStatsStore(self.db)
        self.addCleanup(self.db.close)
        return self.db.open()

    async def test_trim(self) -> None:
        await self.store.add({(H0, "a", "delivered", "x"): 1,
                              (H0 + 3600, "a", "delivered", "x"): 1})
        self.assertEqual(await self.store.trim(H0 + 1), 1)
        self.assertEqual(len(await self.store.query(H0, H0 + 7200)), 1)


class RedisStatsTests(StatsContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        def ready(redis: Any) -> None:
            self.store = RedisStatsStore(redis)

        return redis_client(self).addCallback(ready)


@implementer(IStatsStore)
class MemoryStats:
    """A store that keeps what it is given (and can be told to fail)."""

    def __init__(self) -> None:
        self.added: list[dict[Any, int]] = []
        self.failing = False

    def add(self, counts: Any) -> Deferred[None]:
        if self.failing:
            return fail(RuntimeError("down"))
        self.added.append(dict(counts))
        return succeed(None)

    def query(self, since: float, until: float, tenant: str | None = None) -> Any:
        return succeed([])

    def trim(self, before: float) -> Any:
        return succeed(0)


class StatsSinkTests(SynchronousTestCase):
    def test_counts_then_flushes_once_a_second(self) -> None:
        clock = Clock()
        store = MemoryStats()
        sink = StatsSink(store, clock)
        sink.start()
        sink.emit(Event.make("delivered", H0 + 10, tenant="acme", provider="gmail",
                             recipient="a@x"))
        sink.emit(Event.make("accepted", H0 + 20, tenant="acme", recipients=("a@x", "b@x")))
        self.assertEqual(store.added, [])
        clock.advance(1)
        self.assertEqual(store.added, [{(H0, "acme", "delivered", "gmail"): 1,
                                        (H0, "acme", "accepted", "other"): 2}])
        clock.advance(1)
        self.assertEqual(len(store.added), 1)  # nothing new: no write

    def test_failed_write_is_retried(self) -> None:
        clock = Clock()
        store = MemoryStats()
        store.failing = True
        sink = StatsSink(store, clock)
        sink.start()
        sink.emit(Event.make("bounced", H0, tenant="t", recipient="a@x"))
        clock.advance(1)
        store.failing = False
        sink.emit(Event.make("bounced", H0, tenant="t", recipient="b@x"))
        sink.stop()
        self.assertEqual(store.added, [{(H0, "t", "bounced", "other"): 2}])
        self.assertEqual(hour_of(H0 + 3599), H0)
        self.flushLoggedErrors()
