"""Dashboard sessions shared through the stores (IDashboardSessions), the same
contract against SQLite and against a private redis-server: two views of one store
stand for two workers or nodes."""

from __future__ import annotations

import os
from typing import Any

from attrs import evolve
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IDashboardSessions
from sendarix.model.dashboard import SessionRules, session_key
from sendarix.stores.redis.connection import hash_pairs
from sendarix.stores.redis.dashboard import RedisDashboardSessions
from sendarix.stores.sqlite.dashboard import SQLiteDashboardSessions
from sendarix.stores.sqlite.database import SQLiteDatabase
from tests.support.redisserver import redis_client

RULES = SessionRules(idle=100.0, lifetime=250.0, limit=3)
T0 = 1_800_000_000.0


class DashboardSessionsContract:
    """Mixed into a TestCase whose ``make()`` returns two views of one store (two
    nodes or workers) and ``stored()`` every value the store holds, as text."""

    async def make(self) -> tuple[Any, Any]:
        raise NotImplementedError

    async def stored(self) -> str:
        raise NotImplementedError

    async def test_shared_until_ended(self) -> None:
        one, two = await self.make()
        self.assertTrue(verifyObject(IDashboardSessions, one))
        s = RULES.new("ops", "hash-1", "*", True, T0)
        await one.create(s)
        found = await two.get(s.id, T0 + 10)
        self.assertEqual(found, evolve(s, seen=T0 + 10))
        self.assertIsNone(await two.get(s.id + "x", T0 + 10))
        self.assertTrue(await two.end(s.id))  # a logout on one ...
        self.assertIsNone(await one.get(s.id, T0 + 11))  # ... ends it on the other
        self.assertFalse(await one.end(s.id))

    async def test_only_a_hash_of_the_id_is_stored(self) -> None:
        """Whoever reads the stores cannot present the cookie: the id is nowhere."""
        one, _ = await self.make()
        s = RULES.new("ops", "hash-1", "*", True, T0)
        await one.create(s)
        held = await self.stored()
        self.assertNotIn(s.id, held)
        self.assertIn(session_key(s.id), held)
        self.assertIn(s.csrf, held)  # needed to check forms

    async def test_idle_time_restarts_on_each_request(self) -> None:
        one, two = await self.make()
        s = RULES.new("acme-admin", "h", "acme", False, T0)
        await one.create(s)
        for step in (90, 180):  # each within the idle time of the last request
            found = await (one if step == 90 else two).get(s.id, T0 + step)
            self.assertIsNotNone(found)
        self.assertIsNone(await one.get(s.id, T0 + 281))  # idle for 101 s
        self.assertFalse(await two.end(s.id))  # forgotten, not just hidden

    async def test_lifetime_ends_a_busy_session(self) -> None:
        one, two = await self.make()
        s = RULES.new("ops", "h", "*", True, T0)
        await one.create(s)
        for step in (80, 160, 240):
            self.assertIsNotNone(await two.get(s.id, T0 + step))
        self.assertIsNone(await one.get(s.id, T0 + 251))

    async def test_flash_is_shown_once(self) -> None:
        one, two = await self.make()
        s = RULES.new("ops", "h", "*", True, T0)
        await one.create(s)
        self.assertIsNone(await two.take_flash(s.id))
        await one.set_flash(s.id, "gmail is resumed.")
        await one.set_flash(s.id, "12")  # replaces it; numbers stay text
        self.assertEqual((await two.get(s.id, T0 + 1)).flash, "12")
        self.assertEqual(await two.take_flash(s.id), "12")
        self.assertIsNone(await one.take_flash(s.id))
        self.assertIsNone((await one.get(s.id, T0 + 2)).flash)
        # A gone session takes no message.
        await one.set_flash("nobody", "lost")
        self.assertIsNone(await one.take_flash("nobody"))

    async def test_least_recently_seen_goes_beyond_the_limit(self) -> None:
        one, two = await self.make()
        a, b, c = (RULES.new(n, "h", "t", False, T0 + i) for i, n in enumerate("abc"))
        for s in (a, b, c):
            await one.create(s)
        self.assertIsNotNone(await two.get(a.id, T0 + 5))  # a is now the most recent
        d = RULES.new("d", "h", "t", False, T0 + 6)
        await two.create(d)
        self.assertIsNone(await one.get(b.id, T0 + 7))
        for s in (a, c, d):
            self.assertIsNotNone(await one.get(s.id, T0 + 7), s.credential)

    async def test_expire_forgets_ended_sessions(self) -> None:
        one, two = await self.make()
        old = RULES.new("old", "h", "t", False, T0)
        new = RULES.new("new", "h", "t", False, T0 + 50)
        await one.create(old)
        await one.create(new)
        self.assertEqual(await two.expire(T0 + 120), 1)
        self.assertFalse(await one.end(old.id))
        self.assertTrue(await one.end(new.id))


class SQLiteDashboardSessionsTests(DashboardSessionsContract, TestCase):
    async def make(self) -> tuple[Any, Any]:
        path = os.path.join(os.path.abspath(self.mktemp()), "spool.db")
        dbs = [SQLiteDatabase(path, reactor), SQLiteDatabase(path, reactor)]
        views = [SQLiteDashboardSessions(db, RULES) for db in dbs]
        for db in dbs:
            await db.open()
            self.addCleanup(db.close)
        self.db = dbs[0]
        return views[0], views[1]

    async def stored(self) -> str:
        rows = await self.db.run(
            lambda conn: conn.execute("SELECT * FROM dashboard_session").fetchall()
        )
        return repr(rows)


class RedisDashboardSessionsTests(DashboardSessionsContract, TestCase):
    async def make(self) -> tuple[Any, Any]:
        self.redis = await redis_client(self)
        return (RedisDashboardSessions(self.redis, prefix="n:", rules=RULES),
                RedisDashboardSessions(self.redis, prefix="n:", rules=RULES))

    async def stored(self) -> str:
        held = []
        for key in await self.redis.execute_command("KEYS", "*"):
            kind = await self.redis.execute_command("TYPE", key)
            if kind == "string":
                held.append((key, await self.redis.execute_command("GET", key)))
            elif kind == "zset":
                held.append((key, await self.redis.execute_command("ZRANGE", key, 0, -1)))
            else:
                held.append((key, hash_pairs(await self.redis.execute_command("HGETALL", key))))
        return repr(held)

    async def test_redis_expires_them_itself(self) -> None:
        """Each session's time to live is what it has left: the idle time after a
        request, but never past its lifetime."""
        one, _ = await self.make()
        s = RULES.new("ops", "h", "*", True, T0)
        await one.create(s)
        name = "n:dash:" + session_key(s.id)
        ttl = await self.redis.execute_command("PTTL", name)
        self.assertTrue(99_000 < ttl <= 100_000, ttl)
        for step in (90, 180, 200):
            self.assertIsNotNone(await one.get(s.id, T0 + step))
        # 50 s of its lifetime left, less than the idle time.
        ttl = await self.redis.execute_command("PTTL", name)
        self.assertTrue(49_000 < ttl <= 50_000, ttl)
