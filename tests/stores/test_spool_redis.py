"""The Redis spool: the ISpool conformance suite plus what only Redis has.

Each test runs its own redis-server (append-only file, ``appendfsync always``) in
trial's temporary directory; nothing is mocked.
"""

from __future__ import annotations

import os
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from sendarix.interfaces import ISpool
from sendarix.model.message import NewMessage
from sendarix.stores.redis.connection import connect as redis_connect
from sendarix.stores.redis.spool import RedisSpool
from sendarix.stores.spool import SpoolError
from tests.support.redisserver import redis_client, start_redis
from tests.support.spool_contract import BIG_BODY, T0, SpoolContractMixin, sample_message


def connect(port: int) -> Any:
    """A txredisapi pool to the test server (several connections keep writes in flight)."""
    return txredisapi.lazyConnectionPool("127.0.0.1", port, poolsize=4)


class RedisSpoolTests(SpoolContractMixin, TestCase):
    """The Redis spool passes the ISpool conformance suite."""

    def setUp(self) -> None:
        self.port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)

    def make_spool(self) -> ISpool:
        return RedisSpool(connect(self.port), owns_connection=True)


class RedisPersistenceTests(TestCase):
    """The spool checks on start that Redis keeps what it is given."""

    async def started_on(self, aof: bool, **kwargs: Any) -> RedisSpool:
        port, stop = start_redis(os.path.abspath(self.mktemp()), aof=aof)
        self.addCleanup(stop)
        spool = RedisSpool(connect(port), owns_connection=True, **kwargs)
        self.addCleanup(spool.stop)
        await spool.start()
        return spool

    async def test_volatile_redis_refused(self) -> None:
        """A Redis without an append-only file is refused with a clear error."""
        with self.assertRaises(SpoolError) as caught:
            await self.started_on(aof=False)
        self.assertIn("appendonly", str(caught.exception))
        self.assertIn("allow_volatile", str(caught.exception))

    async def test_volatile_redis_allowed(self) -> None:
        """allow_volatile=True accepts such a Redis, and the spool works on it."""
        spool = await self.started_on(aof=False, allow_volatile=True)
        await spool.enqueue(self.message())
        self.assertEqual((await spool.stats()).messages, 1)

    async def test_durable_redis_accepted(self) -> None:
        """A Redis with an append-only file is accepted without allow_volatile."""
        spool = await self.started_on(aof=True)
        self.assertEqual((await spool.stats()).messages, 0)

    def message(self) -> NewMessage:
        return sample_message("0000000000REDIS00001", received_at=T0)


class RedisPrefixTests(TestCase):
    """Spools with different prefixes on one Redis do not see each other's mail."""

    async def test_prefixes_are_separate(self) -> None:
        """A message enqueued under one prefix is invisible under another."""
        port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        one = RedisSpool(connect(port), prefix="one:", owns_connection=True)
        two = RedisSpool(connect(port), prefix="two:", owns_connection=True)
        for spool in (one, two):
            self.addCleanup(spool.stop)
            await spool.start()
        await one.enqueue(sample_message("0000000000PREFIX0001"))
        self.assertIsNone(await two.get("0000000000PREFIX0001"))
        self.assertEqual(await two.lease_due("n1", T0, 10, 60), [])
        self.assertEqual(len(await one.lease_due("n1", T0, 10, 60)), 1)


class RedisRepliesTests(TestCase):
    """Values txredisapi would turn into numbers or text come back exactly."""

    async def test_numeric_looking_values(self) -> None:
        """Numeric bodies and queue ids, and times with many digits, round-trip."""
        port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        spool = RedisSpool(connect(port), owns_connection=True)
        self.addCleanup(spool.stop)
        await spool.start()
        received = T0 + 0.123456789
        bodies = {"00000000000000000001": b"0123", "00000000000000000002": b"1.50"}
        for qid, body in bodies.items():
            await spool.enqueue(sample_message(qid, body=body, received_at=received))
        for qid, body in bodies.items():
            self.assertEqual(await spool.body(qid), body)
        leased = await spool.lease_due("n1", received, 10, 0.5)
        self.assertEqual(sorted(d.queue_id for d in leased), sorted(bodies))
        self.assertEqual({d.lease.expires for d in leased}, {received + 0.5})
        listed = await spool.list_messages()
        self.assertEqual([m.queue_id for m in listed], sorted(bodies))
        self.assertEqual(listed[0].meta.received_at, received)
        self.assertEqual(listed[0].recipients[0].updated_at, received)
        self.assertEqual(await spool.lease_due("n2", received + 0.4999, 10, 60), [])

    async def test_bytes_connection(self) -> None:
        """A connection without a charset (replies as bytes) works the same."""
        port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        connection = txredisapi.lazyConnectionPool(
            "127.0.0.1", port, poolsize=2, charset=None, convertNumbers=False
        )
        spool = RedisSpool(connection, owns_connection=True)
        self.addCleanup(spool.stop)
        await spool.start()
        await spool.enqueue(sample_message("0000000000BYTES00001", body=BIG_BODY))
        self.assertEqual(await spool.body("0000000000BYTES00001"), BIG_BODY)
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        self.assertEqual(delivery.queue_id, "0000000000BYTES00001")
        self.assertEqual((await spool.stats()).by_status, {"pending": 1})


class RedisReplicaWaitTests(TestCase):
    """wait_replicas: a message counts as stored once replicas have it too."""

    async def test_wait_for_replica(self) -> None:
        """With a replica in sync, enqueue succeeds and the replica has the message;
        with the replica gone, enqueue fails (the client would hear 451)."""
        folder = os.path.abspath(self.mktemp())
        port, stop = start_redis(os.path.join(folder, "master"))
        self.addCleanup(stop)
        replica_port, stop_replica = start_redis(
            os.path.join(folder, "replica"), extra=["--replicaof", "127.0.0.1", str(port)]
        )
        self.addCleanup(lambda: stop_replica())
        client = redis_connect(f"redis://127.0.0.1:{port}/0", poolsize=4)
        self.addCleanup(client.disconnect)
        await client.wait_connected(reactor, 10.0)
        for _ in range(100):  # until the replica is attached
            info = await client.execute_command("INFO", "replication")
            if "connected_slaves:1" in info and "state=online" in info:
                break
            await deferLater(reactor, 0.1, lambda: None)
        # A generous wait while the replica is there (a loaded machine may lag), a
        # short one once it is gone.
        spool = RedisSpool(client, wait_replicas=1, wait_timeout=10.0)
        await spool.start()
        await spool.enqueue(sample_message("0000000000REPLICA001"))
        replica = redis_connect(f"redis://127.0.0.1:{replica_port}/0", poolsize=1)
        self.addCleanup(replica.disconnect)
        await replica.wait_connected(reactor, 10.0)
        self.assertIsNotNone(await RedisSpool(replica).get("0000000000REPLICA001"))
        stop_replica()
        spool = RedisSpool(client, wait_replicas=1, wait_timeout=0.5)
        await spool.start()
        with self.assertRaises(SpoolError) as caught:
            await spool.enqueue(sample_message("0000000000REPLICA002"))
        self.assertIn("wait_replicas", str(caught.exception))


class _LosesAnswers:
    """A connection that forwards every command to Redis but, while ``lose`` > 0,
    drops the answer of a script Redis has run (as when the connection breaks just
    after Redis executed it): fault injection for the network, not a fake Redis."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._factory = inner._factory
        self.lose = 0

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        d = self._inner.eval(*args, **kwargs)
        if self.lose:
            self.lose -= 1

            def lost(_: Any) -> None:
                raise txredisapi.ConnectionError("Lost connection")

            d.addCallback(lost)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RedisLeaseRecoveryTests(TestCase):
    """Leases that a Redis outage leaves behind are released at the node's next
    lease, not after lease_time."""

    async def test_lost_lease_answer(self) -> None:
        """A lease script whose answer was lost leased deliveries nobody works on;
        the node's next lease_due releases and offers them again at once."""
        client = await redis_client(self)
        lossy = _LosesAnswers(client)
        spool = RedisSpool(lossy)
        await spool.start()
        for qid in ("0000000000LOSTANS001", "0000000000LOSTANS002"):
            await spool.enqueue(sample_message(qid))
        lossy.lose = 1
        with self.assertRaises(txredisapi.ConnectionError):
            await spool.lease_due("n1", T0, 10, 300)
        leased = await spool.lease_due("n1", T0 + 1, 10, 300)
        self.assertEqual(len(leased), 2)
        # Deliveries this process does hold are left alone by that clean-up.
        await spool.enqueue(sample_message("0000000000LOSTANS003"))
        lossy.lose = 1
        with self.assertRaises(txredisapi.ConnectionError):
            await spool.lease_due("n1", T0 + 2, 10, 300)
        again = await spool.lease_due("n1", T0 + 3, 10, 300)
        self.assertEqual([d.queue_id for d in again], ["0000000000LOSTANS003"])
        for d in leased:
            self.assertTrue(await spool.renew(d.queue_id, d.domain, "n1", T0 + 600))

    async def test_release_during_outage(self) -> None:
        """A release while Redis is down is postponed (no error); after Redis is back
        the delivery is due again at the node's next lease."""
        client = await redis_client(self)
        spool = RedisSpool(client)
        await spool.start()
        await spool.enqueue(sample_message("0000000000OUTAGE0001"))
        (delivery,) = await spool.lease_due("n1", T0, 10, 300)
        self.redis_stop()  # type: ignore[attr-defined]
        self.assertFalse(await spool.release(delivery.queue_id, delivery.domain, "n1"))
        self.redis_stop = start_redis(self.redis_dir, port=self.redis_port)[1]  # type: ignore[attr-defined]
        await client.wait_connected(reactor, 15.0)
        for _ in range(50):  # connections to the old server fail until noticed
            try:
                leased = await spool.lease_due("n1", T0 + 1, 10, 300)
                break
            except txredisapi.ConnectionError:
                await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([d.queue_id for d in leased], [delivery.queue_id])
        self.flushLoggedErrors(txredisapi.ConnectionError)
