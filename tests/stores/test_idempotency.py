"""The idempotency-key stores (SQLite and Redis) pass one contract."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IIdempotencyStore
from sendarix.model.idempotency import KEY_LIFETIME, IdempotencyRecord, fingerprint
from sendarix.stores.redis.idempotency import RedisIdempotencyStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.idempotency import SQLiteIdempotencyStore
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

reactor: Any = _reactor
T0 = 1_800_000_000.0


class FingerprintTests(SynchronousTestCase):
    def test_parts_do_not_run_together(self) -> None:
        """Method, path and body are length-prefixed: moving a byte between them
        changes the fingerprint."""
        self.assertNotEqual(fingerprint("POST", "/v1/a", b"b"), fingerprint("POST", "/v1/ab", b""))
        self.assertEqual(fingerprint("POST", "/x", b"{}"), fingerprint("POST", "/x", b"{}"))

    def test_record_round_trip(self) -> None:
        record = IdempotencyRecord("f", T0, 202, '{"id": "x"}')
        self.assertEqual(IdempotencyRecord.from_json(record.to_json()), record)


class IdempotencyContractMixin(_Base):
    """What every IIdempotencyStore does; the TestCase sets ``self.store``."""

    store: Any

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IIdempotencyStore, self.store))

    async def test_first_claim_then_answer(self) -> None:
        """The first claim runs; a second one sees it running, then its answer."""
        self.assertIsNone(await self.store.claim("acme", "k1", "fp", T0))
        running = await self.store.claim("acme", "k1", "fp", T0 + 1)
        self.assertEqual((running.fingerprint, running.status), ("fp", None))
        self.assertFalse(running.finished)
        await self.store.finish("acme", "k1", 202, '{"id": "q1"}')
        done = await self.store.claim("acme", "k1", "other", T0 + 2)
        self.assertEqual((done.fingerprint, done.status, done.body), ("fp", 202, '{"id": "q1"}'))
        self.assertEqual(done.created_at, T0)

    async def test_scopes_are_apart(self) -> None:
        """Two tenants may use the same key."""
        self.assertIsNone(await self.store.claim("acme", "k", "a", T0))
        self.assertIsNone(await self.store.claim("globex", "k", "b", T0))

    async def test_release_lets_a_retry_run(self) -> None:
        """A claim released (the request failed) can be claimed again; a finished
        record is never released."""
        self.assertIsNone(await self.store.claim("acme", "k", "fp", T0))
        await self.store.release("acme", "k")
        self.assertIsNone(await self.store.claim("acme", "k", "fp", T0))
        await self.store.finish("acme", "k", 400, "{}")
        await self.store.release("acme", "k")
        kept = await self.store.claim("acme", "k", "fp", T0)
        self.assertEqual(kept.status, 400)

    async def test_unusual_keys(self) -> None:
        """Keys are the client's: any printable text, NUL-free, up to 255 characters."""
        for key in ("a" * 255, "ключ", "with space", "a:b\\c"):
            self.assertIsNone(await self.store.claim("acme", key, "fp", T0), key)
            self.assertIsNotNone(await self.store.claim("acme", key, "fp", T0), key)


class SQLiteIdempotencyTests(IdempotencyContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteIdempotencyStore(self.db)
        self.addCleanup(self.db.close)
        return self.db.open()

    async def test_expired_records_count_as_absent(self) -> None:
        """After the lifetime a key is new again, and ``trim`` removes old records."""
        self.assertIsNone(await self.store.claim("acme", "k", "fp", T0))
        await self.store.finish("acme", "k", 202, "{}")
        self.assertIsNone(await self.store.claim("acme", "k", "fp2", T0 + KEY_LIFETIME + 1))
        self.assertIsNone(await self.store.claim("acme", "old", "fp", T0))
        self.assertEqual(await self.store.trim(T0 + 1), 1)


class RedisIdempotencyTests(IdempotencyContractMixin, TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        def ready(redis: Any) -> None:
            self.redis = redis
            self.store = RedisIdempotencyStore(redis)

        return redis_client(self).addCallback(ready)

    async def test_records_expire_in_redis(self) -> None:
        """Each record carries the lifetime as its Redis expiry."""
        self.assertIsNone(await self.store.claim("acme", "k", "fp", T0))
        await self.store.finish("acme", "k", 202, "{}")
        ttl = await self.redis.execute_command("PTTL", "sendarix:idem:acme\x00k")
        self.assertGreater(ttl, (KEY_LIFETIME - 60) * 1000)
