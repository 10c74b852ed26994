"""Tests for sendarix.routing.pool: endpoint health (circuit breaker), failover order by
priority and weight, and the pool router."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.config.errors import ConfigError
from sendarix.config.loader import parse_config
from sendarix.config.settings import PoolConfig
from sendarix.interfaces import IFailoverStrategy, IRouter
from sendarix.routing.mx import Hop
from sendarix.routing.pool import (
    BreakerState,
    CircuitBreaker,
    EndpointPool,
    OrderedFallback,
    PoolRouter,
)
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.endpoints import SharedEndpointPool
from tests.support.redisserver import redis_client


def pool(**table: Any) -> PoolConfig:
    """A ``[pool.relays]`` validated like the configuration."""
    return parse_config({"pool": {"relays": table}}, ".").pools["relays"]


def hops_of(config: PoolConfig) -> tuple[Hop, ...]:
    router = PoolRouter(config, environ={"RELAY_PW": "s3cret"})
    return SynchronousTestCase().successResultOf(router.route("example.org")).hops


class CircuitBreakerTests(SynchronousTestCase):
    """closed → open (on failure) → half-open (after the cooldown) → closed/open."""

    def test_transitions(self) -> None:
        """A failure opens the breaker for the cooldown; then it may be probed; a
        success closes it, another failure opens it again for a full cooldown."""
        clock = Clock()
        b = CircuitBreaker(cooldown=30.0)
        self.assertEqual(b.state(clock.seconds()), BreakerState.CLOSED)
        b.failure(clock.seconds())
        self.assertEqual(b.state(clock.seconds()), BreakerState.OPEN)
        self.assertFalse(b.available(clock.seconds()))
        clock.advance(29.9)
        self.assertEqual(b.state(clock.seconds()), BreakerState.OPEN)
        clock.advance(0.1)
        self.assertEqual(b.state(clock.seconds()), BreakerState.HALF_OPEN)
        self.assertTrue(b.available(clock.seconds()))
        b.failure(clock.seconds())  # the probe failed
        self.assertEqual(b.state(clock.seconds()), BreakerState.OPEN)
        clock.advance(30.0)
        self.assertEqual(b.state(clock.seconds()), BreakerState.HALF_OPEN)
        b.success()  # the probe held a session
        self.assertEqual(b.state(clock.seconds()), BreakerState.CLOSED)
        self.assertEqual(b.failures, 0)

    @given(st.lists(st.tuples(st.booleans(), st.floats(0, 100)), max_size=30))
    def test_open_exactly_cooldown_after_last_failure(
        self, events: list[tuple[bool, float]]
    ) -> None:
        """Whatever happened before, the breaker is unavailable exactly until
        ``cooldown`` after the last failure, unless a success followed it."""
        clock = Clock()
        b = CircuitBreaker(cooldown=10.0)
        last_failure: float | None = None
        for failed, wait in events:
            clock.advance(wait)
            if failed:
                b.failure(clock.seconds())
                last_failure = clock.seconds()
            else:
                b.success()
                last_failure = None
            now = clock.seconds()
            expected = last_failure is None or now >= last_failure + 10.0
            self.assertEqual(b.available(now), expected)


class EndpointPoolTests(SynchronousTestCase):
    """The failover order of a pool and its endpoint health."""

    def test_interfaces(self) -> None:
        """EndpointPool and OrderedFallback provide IFailoverStrategy; PoolRouter
        provides IRouter."""
        config = pool(endpoints=["127.0.0.2:25"])
        verifyObject(IFailoverStrategy, EndpointPool(config))
        verifyObject(IFailoverStrategy, OrderedFallback())
        verifyObject(IRouter, PoolRouter(config))

    def test_priority_order(self) -> None:
        """Lower priority first, whatever the configured order."""
        config = pool(endpoints=[
            {"host": "127.0.0.3", "priority": 20},
            {"host": "127.0.0.2", "priority": 10},
            {"host": "127.0.0.4", "priority": 30},
        ])
        order = EndpointPool(config).order(hops_of(config), 0.0)
        self.assertEqual([h.address for h in order], ["127.0.0.2", "127.0.0.3", "127.0.0.4"])

    def test_failed_endpoint_rests_then_is_probed(self) -> None:
        """A failed endpoint is left out for the cooldown, so the next one is first at
        once; after the cooldown it is back in its place."""
        clock = Clock()
        config = pool(endpoints=[
            {"host": "127.0.0.2", "priority": 10},
            {"host": "127.0.0.3", "priority": 20},
        ], cooldown="60s")
        strategy = EndpointPool(config)
        hops = hops_of(config)
        first = strategy.order(hops, clock.seconds())[0]
        strategy.failed(first, clock.seconds())
        self.assertEqual(
            [h.address for h in strategy.order(hops, clock.seconds())], ["127.0.0.3"]
        )
        self.assertEqual(strategy.states(clock.seconds())["relays/127.0.0.2:25"], "open")
        clock.advance(60)
        self.assertEqual(
            [h.address for h in strategy.order(hops, clock.seconds())],
            ["127.0.0.2", "127.0.0.3"],
        )
        self.assertEqual(
            strategy.states(clock.seconds())["relays/127.0.0.2:25"], "half-open"
        )
        strategy.succeeded(first, clock.seconds())
        self.assertEqual(strategy.states(clock.seconds())["relays/127.0.0.2:25"], "closed")

    def test_all_resting(self) -> None:
        """When every endpoint rests, nothing may be tried."""
        config = pool(endpoints=["127.0.0.2:25", "127.0.0.3:25"])
        strategy = EndpointPool(config)
        for hop in hops_of(config):
            strategy.failed(hop, 0.0)
        self.assertEqual(strategy.order(hops_of(config), 1.0), ())

    def test_weight_shares_equal_priorities(self) -> None:
        """Among equal priorities, an endpoint of weight 3 comes first about three
        times as often as one of weight 1."""
        config = pool(endpoints=[
            {"host": "127.0.0.2", "weight": 3},
            {"host": "127.0.0.3", "weight": 1},
        ])
        strategy = EndpointPool(config, rng=random.Random(7))
        hops = hops_of(config)
        firsts = Counter(strategy.order(hops, 0.0)[0].address for _ in range(4000))
        share = firsts["127.0.0.2"] / 4000
        self.assertTrue(0.70 < share < 0.80, share)

    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=6),
           st.integers(0, 2**32 - 1))
    def test_order_is_a_priority_sorted_permutation(
        self, specs: list[tuple[int, int]], seed: int
    ) -> None:
        """Every healthy endpoint appears once, in non-decreasing priority."""
        config = pool(endpoints=[
            {"host": f"127.0.1.{i}", "priority": p, "weight": w}
            for i, (p, w) in enumerate(specs)
        ])
        hops = hops_of(config)
        order = EndpointPool(config, rng=random.Random(seed)).order(hops, 0.0)
        self.assertEqual(sorted(order, key=lambda h: h.address),
                         sorted(hops, key=lambda h: h.address))
        priorities = [h.preference for h in order]
        self.assertEqual(priorities, sorted(priorities))


    def test_merge_open(self) -> None:
        """A breaker opened elsewhere rests here until then, unless ours rests
        longer; past times and unknown endpoints change nothing."""
        config = pool(endpoints=["127.0.0.2:25", "127.0.0.3:25"], cooldown="60s")
        strategy = EndpointPool(config)
        first, second = hops_of(config)
        strategy.merge_open("relays/127.0.0.2:25", 50.0, 10.0)
        strategy.merge_open("relays/127.0.0.3:25", 5.0, 10.0)
        strategy.merge_open("elsewhere/127.0.0.9:25", 50.0, 10.0)
        self.assertEqual((strategy.opened_until(first), strategy.opened_until(second)),
                         (50.0, None))
        self.assertEqual(strategy.order((first, second), 49.0), (second,))
        strategy.failed(first, 40.0)  # now resting until 100
        strategy.merge_open("relays/127.0.0.2:25", 70.0, 41.0)
        self.assertEqual(strategy.opened_until(first), 100.0)
        self.assertNotIn("elsewhere/127.0.0.9:25", strategy.states(41.0))


class PoolRouterTests(SynchronousTestCase):
    """Hops carry the endpoint's TLS policy and AUTH credentials."""

    def test_hops(self) -> None:
        """Endpoint settings override the pool's; the password comes from the
        environment variable named by password_env."""
        config = pool(
            endpoints=[
                {"host": "127.0.0.2", "port": 2525, "tls": "verify"},
                {"host": "127.0.0.3", "username": "other", "password_env": "RELAY_PW"},
            ],
            tls="required", username="relay", password_env="RELAY_PW",
        )
        first, second = hops_of(config)
        self.assertEqual((first.address, first.port, first.tls), ("127.0.0.2", 2525, "verify"))
        self.assertEqual((first.username, first.password), ("relay", "s3cret"))
        self.assertEqual(first.endpoint, "relays/127.0.0.2:2525")
        self.assertEqual((second.tls, second.username), ("encrypt", "other"))
        self.assertNotIn("s3cret", repr(first))

    def test_missing_password_env(self) -> None:
        """An unset password variable fails at start, naming the key."""
        config = pool(endpoints=["127.0.0.2:25"], username="u", password_env="NOPE_PW")
        e = self.assertRaises(ConfigError, PoolRouter, config, None, {})
        self.assertIn("pool.relays.password_env", str(e))
        self.assertIn("NOPE_PW", str(e))

    def test_unresolvable_without_resolver(self) -> None:
        """A host name endpoint with no resolver gives a temporary route error."""
        config = pool(endpoints=["relay.example.org:25"])
        route = self.successResultOf(PoolRouter(config).route("example.org"))
        assert route.error is not None
        self.assertFalse(route.error.permanent)

    def test_address_endpoints_route_every_domain_alike(self) -> None:
        """A pool of addresses gives each domain its own route over the same hops."""
        router = PoolRouter(pool(endpoints=["127.0.0.2:25", "127.0.0.3:25"]))
        one = self.successResultOf(router.route("example.org"))
        two = self.successResultOf(router.route("example.net"))
        self.assertEqual((one.domain, two.domain), ("example.org", "example.net"))
        self.assertEqual([h.address for h in one.hops], ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(one.hops, two.hops)

    def test_names_beside_addresses_are_looked_up_per_message(self) -> None:
        """With a host name among the endpoints the route is made per message: here
        the name cannot be looked up (no resolver), and the address alone is left."""
        router = PoolRouter(pool(endpoints=["relay.example.org:25", "127.0.0.3:25"]))
        route = self.successResultOf(router.route("example.org"))
        self.assertIsNone(route.error)
        self.assertEqual([h.address for h in route.hops], ["127.0.0.3"])


class SharedEndpointPoolTests(TestCase):
    """Two nodes' endpoint pools on one Redis share endpoint health."""

    async def test_health_is_shared(self) -> None:
        """An endpoint that failed on one node rests on the other too (for the same
        cooldown), and a success on either closes it for both."""
        redis = await redis_client(self)
        other = connect(f"redis://127.0.0.1:{self.redis_port}/0", poolsize=1)  # type: ignore[attr-defined]
        self.addCleanup(other.disconnect)
        await other.wait_connected(reactor, 10.0)
        config = pool(endpoints=[
            {"host": "127.0.0.2", "priority": 10},
            {"host": "127.0.0.3", "priority": 20},
        ], cooldown="60s")
        one = SharedEndpointPool(config, redis=redis, sync_interval=0.0)
        two = SharedEndpointPool(config, redis=other, sync_interval=0.0)
        self.assertTrue(verifyObject(IFailoverStrategy, one))
        hops = hops_of(config)
        one.failed(one.order(hops, 100.0)[0], 100.0)
        await task.deferLater(reactor, 0.1, lambda: None)  # the write is not waited for
        await two.sync(110.0)
        self.assertEqual([h.address for h in two.order(hops, 110.0)], ["127.0.0.3"])
        self.assertEqual(
            [h.address for h in two.order(hops, 160.0)], ["127.0.0.2", "127.0.0.3"]
        )  # the cooldown ends at 160 for every node
        two.failed(hops[0], 170.0)
        await task.deferLater(reactor, 0.1, lambda: None)
        await one.sync(171.0)
        self.assertEqual(one.states(171.0)["relays/127.0.0.2:25"], "open")
        two.succeeded(hops[0], 172.0)
        await task.deferLater(reactor, 0.1, lambda: None)
        fresh = SharedEndpointPool(config, redis=redis)
        await fresh.sync(173.0)
        self.assertEqual(fresh.states(173.0)["relays/127.0.0.2:25"], "closed")
