"""AUTH lockouts and message rates shared in Redis (sendarix.stores.redis.limits): two
"nodes" (two connection pools) on one private redis-server."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IAuthLimiter, IRateLimiter
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.limits import SharedAuthLimiter, SharedRateLimiter
from tests.support.redisserver import redis_client

IP = "192.0.2.7"


async def _settle() -> None:
    """Let writes that are not waited for reach Redis."""
    await task.deferLater(reactor, 0.1, lambda: None)


class SharedLimitsTests(TestCase):
    """What one node counts, the other sees."""

    async def two_pools(self) -> tuple[Any, Any]:
        one = await redis_client(self)
        two = connect(f"redis://127.0.0.1:{self.redis_port}/0", poolsize=1)  # type: ignore[attr-defined]
        self.addCleanup(two.disconnect)
        await two.wait_connected(reactor, 10.0)
        return one, two

    async def test_auth_failures_lock_out_across_nodes(self) -> None:
        """Failures on two nodes add up to one lockout, seen by both; a success
        forgets the failures everywhere."""
        one_pool, two_pool = await self.two_pools()
        settings = {"max_failures": 3, "window": 300.0, "lockout": 900.0}
        one = SharedAuthLimiter(one_pool, **settings)
        two = SharedAuthLimiter(two_pool, **settings)
        self.assertTrue(verifyObject(IAuthLimiter, one))
        one.failed(IP, 100.0)
        one.failed(IP, 101.0)
        await _settle()
        self.assertFalse(two.is_locked(IP, 102.0))
        await two.refresh(IP, 102.0)
        self.assertEqual(two.failures(IP, 102.0), 2)
        self.assertGreater(two.delay_for(IP, 102.0), 1.0)  # slowed like on node one
        two.failed(IP, 103.0)  # the third failure, on the other node
        await _settle()
        self.assertTrue(two.is_locked(IP, 104.0))
        await one.refresh(IP, 104.0)
        self.assertTrue(one.is_locked(IP, 104.0))
        self.assertFalse(one.is_locked(IP, 103.0 + 900.0))

        other = "198.51.100.9"
        one.failed(other, 100.0)
        one.succeeded(other, 101.0)
        await _settle()
        await two.refresh(other, 102.0)
        self.assertEqual(two.failures(other, 102.0), 0)

    async def test_rates_are_shared(self) -> None:
        """A key paced on one node is paced on the other from the same point (after
        at most one request there, the documented lag)."""
        one_pool, two_pool = await self.two_pools()
        one = SharedRateLimiter(redis=one_pool)
        two = SharedRateLimiter(redis=two_pool)
        self.assertTrue(verifyObject(IRateLimiter, one))
        self.assertTrue(one.allow("cred:app", 1, 60.0, 0.0, burst=1))
        await _settle()
        two.allow("cred:app", 1, 60.0, 1.0, burst=1)  # may pass: it had not heard yet
        await _settle()
        for now in (2.0, 30.0, 59.0):
            self.assertFalse(two.allow("cred:app", 1, 60.0, now, burst=1))
            self.assertFalse(one.allow("cred:app", 1, 60.0, now, burst=1))
        await _settle()
        self.assertTrue(one.allow("cred:app", 1, 60.0, 121.0, burst=1))
