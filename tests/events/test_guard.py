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

from sendarix.control.tenantops import resume_tenant, tenant_summary
from sendarix.events.guard import (
    MIN_DELIVERIES,
    hold_key,
    holds_due,
    should_hold,
    split_hold_key,
)
from sendarix.events.stats import hour_of
from sendarix.interfaces import ITenantHolds
from sendarix.stores.redis.holds import RedisTenantHolds
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.holds import SQLiteTenantHolds
from tests.cleanup.test_domains import SECRET
from tests.control.api.test_api import ApiTestCase
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import submit, wait_event
from tests.ingress.test_feedback import RELAY as FEEDBACK_RELAY
from tests.ingress.test_feedback import _Harness
from tests.support.dnsserver import start_dns
from tests.support.redisserver import redis_client
from tests.support.relay import in_thread, start_relay
from tests.support.reports import arf

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

    def test_provider_holds(self) -> None:
        """acme's complaints come from gmail (1.5 %) and unknown providers (0.5 %),
        0.15 % on the whole (under 0.3 %): only its mail to gmail is held, "other" is
        never held alone.  globex and initech over the limit on the whole are held
        entirely, with no provider hold besides."""
        due = holds_due({
            ("acme", "gmail"): (200, 3),
            ("acme", "outlook"): (3000, 0),
            ("acme", "other"): (1000, 5),
            ("globex", "gmail"): (500, 5),
            ("globex", "yahoo"): (500, 0),
            ("initech", "other"): (300, 3),
        }, lambda tenant: 0.003)
        self.assertEqual(set(due), {"acme/gmail", "globex", "initech"})
        self.assertIn("at gmail", due["acme/gmail"])
        self.assertIn("1.50%", due["acme/gmail"])
        self.assertNotIn(" at ", due["globex"])
        self.assertEqual(split_hold_key(hold_key("acme", "gmail")), ("acme", "gmail"))
        self.assertEqual(split_hold_key(hold_key("acme")), ("acme", None))

    @given(st.dictionaries(
        st.tuples(st.sampled_from(["acme", "globex"]),
                  st.sampled_from(["gmail", "yahoo", "other"])),
        st.tuples(st.integers(0, 5000), st.integers(0, 100)).filter(lambda f: f[1] <= f[0]),
    ), st.sampled_from([0.001, 0.003, 0.01]))
    def test_holds_follow_the_rates(self, figures: dict[tuple[str, str], tuple[int, int]],
                                    limit: float) -> None:
        """A tenant is held whole exactly when its total rate is over (with enough
        deliveries); otherwise exactly its named providers over the limit are held."""
        due = holds_due(figures, lambda tenant: limit)
        for tenant in ("acme", "globex"):
            mine = {p: f for (t, p), f in figures.items() if t == tenant}
            delivered = sum(d for d, _ in mine.values())
            complained = sum(c for _, c in mine.values())
            whole = should_hold(delivered, complained, limit) is not None
            self.assertEqual(tenant in due, whole)
            held = {split_hold_key(k)[1] for k in due if split_hold_key(k)[0] == tenant} - {None}
            expected = set() if whole else {
                p for p, (d, c) in mine.items()
                if p != "other" and should_hold(d, c, limit) is not None
            }
            self.assertEqual(held, expected)


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

        out, err, code = await self.relay.run_cli("tenants", "resume", "acme")
        self.assertEqual(code, 0, err)
        await self.relay.service.guard.refresh()
        self.assertEqual(self.relay.service.delivery.held_tenants, {})
        await self.relay.stores.spool.retry(sent["id"], time.time())
        self.relay.service.delivery.wake()
        await wait_event(self.relay, "user@sink.test", "delivered")
        # Released a moment ago: the guard leaves acme alone despite its figures.
        await self.relay.service.guard.check_now()
        self.assertEqual(self.relay.service.delivery.held_tenants, {})
        out, err, code = await self.relay.run_cli("tenants", "resume", "acme")
        self.assertEqual(code, 1)


class ProviderHoldTests(TestCase):
    """The guard per tenant and provider on a node: complaints are counted against the
    provider the message went to, and a tenant over its limit at one provider has only
    its mail to that provider held."""

    async def test_held_at_one_provider(self) -> None:
        """A complaint about mail delivered to srcmail is a ``complained`` event for
        srcmail; with acme's figures over the limit at srcmail only, its next message
        to srcmail is deferred with the reason while its mail elsewhere is delivered;
        the metric and the tenant summary name the provider; resume releases it."""
        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        sink = await start_sink(self, "127.0.0.2")
        dns_port, stop_dns = start_dns({
            "src.test": {"MX": [(10, "mx.src.test")]}, "mx.src.test": {"A": ["127.0.0.2"]},
            "else.test": {"MX": [(10, "mx.else.test")]}, "mx.else.test": {"A": ["127.0.0.2"]},
        })
        self.addCleanup(stop_dns)
        relay = await start_relay(
            self, [FEEDBACK_RELAY],  # trusts 127.0.0.1 only: reports come from .5
            delivery={"mx_port": sink.addresses[0][1]},
            dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
            provider={"srcmail": {"mx_suffixes": ["src.test"]}},
            tenant={"acme": {}},
            feedback={"domains": ["fbl.relay.test"]},
        )
        harness = _Harness()
        harness.relay, harness.sink, harness.port = relay, sink, relay.ports["relay"]
        original = await harness.delivered("user@src.test")
        first = await wait_event(relay, "user@src.test", "delivered")
        self.assertEqual(first.provider, "srcmail")
        await in_thread(harness.report, "abuse@fbl.relay.test", arf(original, "user@src.test"))
        complaint = await wait_event(relay, "user@src.test", "complained")
        self.assertEqual((complaint.tenant, complaint.provider), ("acme", "srcmail"))

        now = time.time()
        await relay.stores.stats.add({
            (hour_of(now), "acme", "delivered", "srcmail"): 200,
            (hour_of(now), "acme", "complained", "srcmail"): 3,
            (hour_of(now), "acme", "delivered", "other"): 5000,
        })
        await relay.service.guard.check_now()
        self.assertEqual(set(relay.service.delivery.held_tenants), {"acme/srcmail"})
        summary = await tenant_summary(relay.stores, relay.config, "acme", now)
        self.assertIsNone(summary["held"])
        self.assertIn("at srcmail", summary["held_providers"]["srcmail"])
        gauge = relay.service.metrics.tenant_providers_held
        self.assertEqual(gauge.labels("acme", "srcmail")._value.get(), 1)

        await harness.delivered("elsewhere@else.test")
        await in_thread(submit, harness.port, "app@sender.test", ["second@src.test"])
        held = await wait_event(relay, "second@src.test", "deferred")
        assert held.response is not None
        self.assertIn("to srcmail held", held.response.text)
        self.assertIn("complaint rate 1.50% at srcmail", held.response.text)

        self.assertTrue(await resume_tenant(relay.stores, "acme", time.time()))
        self.assertFalse(await resume_tenant(relay.stores, "acme", time.time()))
        await relay.service.guard.refresh()
        self.assertEqual(relay.service.delivery.held_tenants, {})
        self.assertEqual(gauge.labels("acme", "srcmail")._value.get(), 0)
        queue_id = held.queue_id
        assert queue_id is not None
        await relay.stores.spool.retry(queue_id, time.time())
        relay.service.delivery.wake()
        await wait_event(relay, "second@src.test", "delivered", timeout=15)

