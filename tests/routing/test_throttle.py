"""Tests for sendarix.routing.throttle (GCRA pacing, connection caps, adaptive rates) and the
IThrottle contract every implementation passes: in memory and in Redis."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IThrottle
from sendarix.routing.throttle import AdaptiveRate, MemoryThrottle, is_rate_signal
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.throttle import RedisThrottle
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


async def call(method: Any, *args: Any) -> Any:
    """Call an IThrottle method, synchronous or Deferred, and wait for its answer."""
    return await maybeDeferred(method, *args)


class ThrottleContractMixin(_Base):
    """The IThrottle contract: MemoryThrottle and RedisThrottle pass these tests.

    A backend's TestCase implements ``make_throttle(burst)``.
    """

    async def make_throttle(self, burst: float = 1.0) -> Any:
        raise NotImplementedError

    async def test_provides_interface(self) -> None:
        """The throttle provides IThrottle."""
        self.assertTrue(verifyObject(IThrottle, await self.make_throttle()))

    async def test_admits_exactly_the_rate(self) -> None:
        """A sender that retries exactly when told sends burst + rate per period over
        time, never more."""
        for rate, period, burst, spans in ((7, 60.0, 1, 3), (3, 1.0, 4, 5), (50, 3600.0, 2, 2)):
            throttle = await self.make_throttle(float(burst))
            key = f"k{rate}"
            now, admitted, end = 0.0, 0, spans * period - period / rate / 2
            for _ in range(10_000):
                if now >= end:
                    break
                wait = await call(throttle.admit, key, rate, period, now)
                if wait == 0.0:
                    admitted += 1
                else:
                    self.assertGreater(wait, 0.0)
                    now += wait
            self.assertEqual(admitted, rate * spans + burst - 1, (rate, period, burst))

    async def test_wait_does_not_count(self) -> None:
        """A refused ask is not counted: asking again early changes nothing."""
        throttle = await self.make_throttle()
        self.assertEqual(await call(throttle.admit, "k", 1, 10.0, 0.0), 0.0)
        self.assertEqual(await call(throttle.admit, "k", 1, 10.0, 1.0), 9.0)
        self.assertEqual(await call(throttle.admit, "k", 1, 10.0, 2.0), 8.0)
        self.assertEqual(await call(throttle.admit, "k", 1, 10.0, 10.0), 0.0)

    async def test_keys_independent(self) -> None:
        """Pacing one key does not delay another."""
        throttle = await self.make_throttle()
        self.assertEqual(await call(throttle.admit, "a", 1, 60.0, 0.0), 0.0)
        self.assertEqual(await call(throttle.admit, "b", 1, 60.0, 0.0), 0.0)
        self.assertGreater(await call(throttle.admit, "a", 1, 60.0, 0.0), 0.0)

    async def test_bad_rate(self) -> None:
        """A non-positive rate or period is refused with ValueError."""
        throttle = await self.make_throttle()
        with self.assertRaises(ValueError):
            await call(throttle.admit, "k", 0, 1.0, 0.0)
        with self.assertRaises(ValueError):
            await call(throttle.admit, "k", 1, 0.0, 0.0)

    async def test_connection_cap_never_exceeded(self) -> None:
        """Whatever the order of acquires and releases, no more than ``limit`` slots
        are granted at once, and a released slot can be taken again."""
        throttle = await self.make_throttle()
        rng = random.Random(5)
        for limit in (1, 3):
            key, held = f"c{limit}", 0
            for _ in range(60):
                if rng.random() < 0.6:
                    granted = await call(throttle.acquire_connection, key, limit, 0.0)
                    self.assertEqual(granted, held < limit)
                    held += bool(granted)
                elif held:
                    await call(throttle.release_connection, key)
                    held -= 1

    async def test_release_without_acquire(self) -> None:
        """Releasing a slot never taken changes nothing."""
        throttle = await self.make_throttle()
        await call(throttle.release_connection, "k")
        self.assertTrue(await call(throttle.acquire_connection, "k", 1, 0.0))
        self.assertFalse(await call(throttle.acquire_connection, "k", 1, 0.0))


class MemoryThrottleContractTests(ThrottleContractMixin, TestCase):
    """MemoryThrottle passes the IThrottle contract."""

    async def make_throttle(self, burst: float = 1.0) -> MemoryThrottle:
        return MemoryThrottle(burst=burst)


class RedisThrottleContractTests(ThrottleContractMixin, TestCase):
    """RedisThrottle passes the IThrottle contract (each test on its own Redis)."""

    async def make_throttle(self, burst: float = 1.0) -> RedisThrottle:
        if not hasattr(self, "redis"):
            self.redis = await redis_client(self)
        self.clock = task.Clock()
        throttle = RedisThrottle(self.redis, self.clock, prefix=f"t{burst}:", burst=burst)
        self.addCleanup(throttle.stop)
        return throttle


class RedisThrottleSharingTests(TestCase):
    """What only a shared throttle does: several nodes, dead nodes."""

    async def two_nodes(self) -> tuple[RedisThrottle, RedisThrottle, task.Clock]:
        redis = await redis_client(self)
        other = connect(f"redis://127.0.0.1:{self.redis_port}/0", poolsize=2)  # type: ignore[attr-defined]
        self.addCleanup(other.disconnect)
        await other.wait_connected(reactor, 10.0)
        clock = task.Clock()
        one = RedisThrottle(redis, clock, node="one", slot_ttl=60.0)
        two = RedisThrottle(other, clock, node="two", slot_ttl=60.0)
        for t in (one, two):
            self.addCleanup(t.stop)
        return one, two, clock

    async def test_rate_is_cluster_wide(self) -> None:
        """Two nodes asking for one key share one rate."""
        one, two, _ = await self.two_nodes()
        self.assertEqual(await one.admit("gmail", 1, 60.0, 0.0), 0.0)
        self.assertEqual(await two.admit("gmail", 1, 60.0, 1.0), 59.0)

    async def test_same_gcra_as_in_memory(self) -> None:
        """The Lua script is :func:`sendarix.model.gcra.step`: over random rates,
        bursts and arrivals (some exactly when told to come back), two nodes sharing
        a key answer with the very same floats as one in-memory throttle.  Random
        cases from fixed seeds: hypothesis does not drive asynchronous tests."""
        one, two, _ = await self.two_nodes()
        for seed in range(40):
            rng = random.Random(seed)
            rate, period = rng.randint(1, 50), rng.choice([1.0, 60.0, 3600.0])
            burst = float(rng.randint(1, 5))
            one.burst = two.burst = burst
            memory = MemoryThrottle(burst=burst)
            key, now = f"same{seed}", rng.uniform(0.0, 1e9)
            for _ in range(40):
                node = rng.choice((one, two))
                expected = memory.admit(key, rate, period, now)
                self.assertEqual(
                    await node.admit(key, rate, period, now), expected, (seed, now)
                )
                if expected and rng.random() < 0.5:
                    now += expected  # back exactly when told
                else:
                    now += rng.expovariate(rate / period)

    async def test_connections_are_cluster_wide(self) -> None:
        """Slots taken on one node count on the other; a release frees one there."""
        one, two, _ = await self.two_nodes()
        self.assertTrue(await one.acquire_connection("gmail", 2, 0.0))
        self.assertTrue(await two.acquire_connection("gmail", 2, 0.0))
        self.assertFalse(await one.acquire_connection("gmail", 2, 0.0))
        await two.release_connection("gmail")
        self.assertTrue(await one.acquire_connection("gmail", 2, 0.0))

    async def test_dead_node_slots_come_back(self) -> None:
        """A node that stops renewing (it died) loses its slots after slot_ttl; a
        live node's renewed slots are kept."""
        one, two, clock = await self.two_nodes()
        self.assertTrue(await one.acquire_connection("k", 2, 0.0))
        self.assertTrue(await two.acquire_connection("k", 2, 0.0))
        one.stop()  # "one" dies: no more renewals
        clock.advance(40.0)  # "two" renews at 20 and 40
        await two.renew()
        self.assertFalse(await two.acquire_connection("k", 2, 59.0))
        self.assertTrue(await two.acquire_connection("k", 2, 61.0))
        self.assertFalse(await two.acquire_connection("k", 2, 61.0))


class MemoryThrottleTests(SynchronousTestCase):
    """MemoryThrottle paces messages and caps connections."""

    def test_interface(self) -> None:
        """MemoryThrottle provides IThrottle."""
        self.assertTrue(verifyObject(IThrottle, MemoryThrottle()))

    @settings(max_examples=50, deadline=None)
    @given(
        rate=st.integers(1, 50),
        period=st.sampled_from([1.0, 60.0, 3600.0]),
        burst=st.integers(1, 5),
        spans=st.integers(1, 20),
    )
    def test_admits_exactly_the_rate(
        self, rate: int, period: float, burst: int, spans: int
    ) -> None:
        """A sender that retries exactly when told sends burst + rate per period
        over time, never more."""
        throttle = MemoryThrottle(burst=float(burst))
        # Stop half an interval short of the span, away from float ties.
        now, admitted, end = 0.0, 0, spans * period - period / rate / 2
        while now < end:
            wait = throttle.admit("k", rate, period, now)
            if wait == 0.0:
                admitted += 1
            else:
                self.assertGreater(wait, 0.0)
                now += wait
        # Admissions at t = 0, interval, 2*interval, ... before ``end`` plus the burst.
        self.assertEqual(admitted, rate * spans + burst - 1)

    def test_wait_does_not_count(self) -> None:
        """A refused ask is not counted: asking again early changes nothing."""
        throttle = MemoryThrottle()
        self.assertEqual(throttle.admit("k", 1, 10.0, 0.0), 0.0)
        self.assertEqual(throttle.admit("k", 1, 10.0, 1.0), 9.0)
        self.assertEqual(throttle.admit("k", 1, 10.0, 2.0), 8.0)
        self.assertEqual(throttle.admit("k", 1, 10.0, 10.0), 0.0)

    def test_keys_independent(self) -> None:
        """Pacing one key does not delay another."""
        throttle = MemoryThrottle()
        self.assertEqual(throttle.admit("a", 1, 60.0, 0.0), 0.0)
        self.assertEqual(throttle.admit("b", 1, 60.0, 0.0), 0.0)
        self.assertGreater(throttle.admit("a", 1, 60.0, 0.0), 0.0)

    def test_bad_rate(self) -> None:
        """A non-positive rate is a programming error."""
        self.assertRaises(ValueError, MemoryThrottle().admit, "k", 0, 1.0, 0.0)

    @settings(max_examples=50, deadline=None)
    @given(
        limit=st.integers(1, 10),
        ops=st.lists(st.booleans(), max_size=100),
    )
    def test_connection_cap_never_exceeded(self, limit: int, ops: list[bool]) -> None:
        """Whatever the order of acquires and releases, open connections stay
        within the limit and the count matches what was granted."""
        throttle = MemoryThrottle()
        held = 0
        for acquire in ops:
            if acquire:
                granted = throttle.acquire_connection("k", limit, 0.0)
                self.assertEqual(granted, held < limit)
                held += granted
            elif held:
                throttle.release_connection("k")
                held -= 1
            self.assertLessEqual(throttle.connections("k"), limit)
            self.assertEqual(throttle.connections("k"), held)


class AdaptiveRateTests(SynchronousTestCase):
    """AdaptiveRate halves on rate signals and recovers on success."""

    def test_halves_to_floor(self) -> None:
        """Each rate signal halves the rate, never below the floor."""
        rate = AdaptiveRate(100.0, 20.0)
        rate.throttled(0.0)
        self.assertEqual(rate.rate, 50.0)
        rate.throttled(0.0)
        self.assertEqual(rate.rate, 25.0)
        rate.throttled(0.0)
        self.assertEqual(rate.rate, 20.0)

    def test_recovers_additively(self) -> None:
        """Each success adds a twentieth of the base rate, up to the base rate."""
        rate = AdaptiveRate(100.0, 1.0)
        rate.throttled(0.0)
        for expected in (55.0, 60.0, 65.0):
            rate.success()
            self.assertAlmostEqual(rate.rate, expected)
        for _ in range(20):
            rate.success()
        self.assertEqual(rate.rate, 100.0)

    def test_suspension(self) -> None:
        """A throttle with suspend_for suspends until then."""
        rate = AdaptiveRate(10.0, 1.0)
        rate.throttled(100.0, suspend_for=60.0)
        self.assertTrue(rate.is_suspended(159.0))
        self.assertFalse(rate.is_suspended(160.0))

    def test_on_reply(self) -> None:
        """421 and 4.7.x throttle; 2xx recovers; other replies change nothing."""
        rate = AdaptiveRate(40.0, 1.0)
        self.assertTrue(rate.on_reply(421, None, 0.0))
        self.assertEqual(rate.rate, 20.0)
        self.assertTrue(rate.on_reply(451, "4.7.1", 0.0))
        self.assertEqual(rate.rate, 10.0)
        self.assertFalse(rate.on_reply(450, "4.2.0", 0.0))
        self.assertEqual(rate.rate, 10.0)
        self.assertFalse(rate.on_reply(250, "2.0.0", 0.0))
        self.assertEqual(rate.rate, 12.0)

    def test_is_rate_signal(self) -> None:
        """Only 421 and 4.7.x are rate signals."""
        self.assertTrue(is_rate_signal(421))
        self.assertTrue(is_rate_signal(450, "4.7.0"))
        self.assertFalse(is_rate_signal(550, "5.7.1"))
        self.assertFalse(is_rate_signal(451, "4.3.0"))

    def test_bad_floor(self) -> None:
        """The floor must be positive and at most the base rate."""
        self.assertRaises(ValueError, AdaptiveRate, 10.0, 20.0)
        self.assertRaises(ValueError, AdaptiveRate, 10.0, 0.0)
