"""Suspended sites shared through the stores (ISiteSuspensions), the same contract
against SQLite and against a private redis-server."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import ISiteSuspensions
from sendarix.stores.redis.suspensions import RedisSiteSuspensions
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.suspensions import SQLiteSiteSuspensions
from tests.support.redisserver import redis_client


class SiteSuspensionsContract:
    """Mixed into a TestCase whose ``make()`` returns two views of one store (two
    nodes or workers)."""

    async def make(self) -> tuple[Any, Any]:
        raise NotImplementedError

    async def test_shared_until_lifted(self) -> None:
        one, two = await self.make()
        self.assertTrue(verifyObject(ISiteSuspensions, one))
        self.assertEqual(await two.active(100.0), {})
        await one.suspend("gmail", 500.0)
        await one.suspend("pool:relay", 200.0)
        self.assertEqual(await two.active(100.0), {"gmail": 500.0, "pool:relay": 200.0})
        # A new suspension of the same site replaces the old one.
        await two.suspend("gmail", 900.0)
        self.assertEqual((await one.active(100.0))["gmail"], 900.0)
        self.assertTrue(await two.resume("gmail"))
        self.assertFalse(await one.resume("gmail"))
        self.assertEqual(await one.active(100.0), {"pool:relay": 200.0})

    async def test_expired_ones_are_forgotten(self) -> None:
        one, two = await self.make()
        await one.suspend("yahoo", 150.0)
        self.assertEqual(await two.active(150.0), {})
        self.assertFalse(await one.resume("yahoo"))  # gone, not just hidden


class SQLiteSiteSuspensionsTests(SiteSuspensionsContract, TestCase):
    async def make(self) -> tuple[Any, Any]:
        path = os.path.join(os.path.abspath(self.mktemp()), "spool.db")
        dbs = [SQLiteDatabase(path, reactor), SQLiteDatabase(path, reactor)]
        views = [SQLiteSiteSuspensions(db) for db in dbs]
        for db in dbs:
            await db.open()
            self.addCleanup(db.close)
        return views[0], views[1]


class RedisSiteSuspensionsTests(SiteSuspensionsContract, TestCase):
    async def make(self) -> tuple[Any, Any]:
        redis = await redis_client(self)
        return RedisSiteSuspensions(redis, prefix="n:"), RedisSiteSuspensions(redis, prefix="n:")
