"""The complaint-rate guard: the decision (pure), the hold stores (SQLite and Redis,
one contract), and a node holding then releasing a tenant's mail."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.events.guard import MIN_DELIVERIES, should_hold
from sendarix.events.stats import hour_of
from sendarix.interfaces import ITenantHolds
from sendarix.stores.redis.holds import RedisTenantHolds
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.holds import SQLiteTenantHolds
from tests.control.api.test_api import ApiTestCase
from tests.control.cli.test_main import _run
from tests.delivery.test_service import wait_event
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

reactor: Any = _reactor


class DecisionTests(SynchronousTestCase):
    def test_threshold(self) -> None:
        self.assertIsNone(should_hold(1000, 3, 0.003))
        self.assertIn("0.40%", should_hold(1000, 4, 0.003) or "")
        self.assertIsNone(should_hold(MIN_DELIVERIES - 1, 50, 0.003))

    @given(st.integers(0, 10**6), st.integers(0, 10**4), st.floats(0, 1))
    def test_holds_only_above_the_limit(self, delivered: int, complained: int,
                                        limit: float) -> None:
        why = should_hold(delivered, complained, limit)
        if why is not None:
            self.assertGreaterEqual(delivered, MIN_DELIVERIES)
            self.assertGreater(complained / delivered, limit)
        elif delivered >= MIN_DELIVERIES:
            self.assertLessEqual(complained / delivered, limit)


class HoldsContractMixin(_Base):
    store: Any

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ITenantHolds, self.store))

    async def test_hold_release(self) -> None:
        self.assertTrue(await self.store.hold("acme", "too many complaints", 10.0))
        self.assertFalse(await self.store.hold("acme", "again", 11.0))
        self.assertEqual(await self.store.all(), {"acme": ("too many complaints", 10.0)})
        self.assertIsNone(await self.store.released_at("acme"))
        self.assertTrue(await self.store.release("acme", 20.0))
        self.assertFalse(await self.store.release("acme", 21.0))
        self.assertEqual(await self.store.all(), {})
        self.assertEqual(await self.store.released_at("acme"), 20.0)
        self.assertTrue(await self.store.hold("acme", "once more", 30.0))


class SQLiteHoldsTests(HoldsContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteTenantHolds(self.db)
        self.addCleanup(self.db.close)
        return self.db.open()


class RedisHoldsTests(HoldsContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        def ready(redis: Any) -> None:
            self.store = RedisTenantHolds(redis)

        return redis_client(self).addCallback(ready)


class NodeGuardTests(ApiTestCase):
    async def test_held_then_resumed(self) -> None:
        """With a day of 1,000 deliveries and 10 complaints (1 %) against acme's 0.3 %,
        acme's mail is deferred with the reason; globex's still goes out; after
        ``sendarix tenants resume`` acme's waiting message is delivered."""
        now = time.time()
        await self.relay.stores.stats.add({
            (hour_of(now), "acme", "delivered", "other"): 1000,
            (hour_of(now), "acme", "complained", "other"): 10,
        })
        await self.relay.service.guard.check_now()
        status, body, _ = await self.call("GET", "/v1/tenants/acme", key=self.operator)
        self.assertIn("complaint rate 1.00%", body["held"] or "")
        status, sent, _ = await self.call("POST", "/v1/messages", self.message())
        event = await wait_event(self.relay, "user@sink.test", "deferred")
        self.assertIn("held", event.response.text if event.response else "")
        status, other, _ = await self.call("POST", "/v1/messages",
                                           self.message(to="g@sink.test"), key=self.other)
        await wait_event(self.relay, "g@sink.test", "delivered")
        self.assertEqual(self.sink.stats.messages, 1)

        config = os.path.join(self.relay.directory, "cli.toml")
        with open(config, "w") as f:
            f.write('[spool]\nurl = "sqlite:var/spool.db"\n')
        out, err, code = await _run(["--config", config, "tenants", "resume", "acme"],
                                    self.relay.directory)
        self.assertEqual(code, 0, err)
        await self.relay.service.guard.refresh()
        self.assertEqual(self.relay.service.delivery.held_tenants, {})
        await self.relay.stores.spool.retry(sent["id"], time.time())
        self.relay.service.delivery.wake()
        await wait_event(self.relay, "user@sink.test", "delivered")
        # Released a moment ago: the guard leaves acme alone despite its figures.
        await self.relay.service.guard.check_now()
        self.assertEqual(self.relay.service.delivery.held_tenants, {})
        out, err, code = await _run(["--config", config, "tenants", "resume", "acme"],
                                    self.relay.directory)
        self.assertEqual(code, 1)
