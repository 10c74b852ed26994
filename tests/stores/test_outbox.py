"""The webhook outboxes (SQLite and Redis) pass one contract, and keep their contents
across a restart."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.trial.unittest import TestCase

from sendarix.model.event import EventQuery
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.eventlog import RedisEventLog
from sendarix.stores.redis.outbox import RedisWebhookOutbox
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.eventlog import SQLiteEventLog
from sendarix.stores.sqlite.outbox import SQLiteWebhookOutbox
from tests.support.outbox_contract import T0, OutboxContractMixin, event, payload
from tests.support.redisserver import redis_client, start_redis

reactor: Any = _reactor


class SQLiteOutboxTests(OutboxContractMixin, TestCase):
    async def open_outbox(self) -> tuple[Any, Any]:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "s.db")
        os.makedirs(os.path.dirname(self.path))
        db = SQLiteDatabase(self.path, reactor)
        log, outbox = SQLiteEventLog(db), SQLiteWebhookOutbox(db)
        self.addCleanup(db.close)
        self.db = db
        await db.open()
        return outbox, log

    async def test_kept_across_reopen(self) -> None:
        """Queued events and a leased batch are in the file after it is closed."""
        await self.outbox.add(event(queue_id="Q1"), ["hook"])
        (batch,) = await self.lease(now=T0 + 1)
        await self.outbox.add(event(queue_id="Q2"), ["hook"])
        await self.db.close()
        db = SQLiteDatabase(self.path, reactor)
        outbox = SQLiteWebhookOutbox(db)
        SQLiteEventLog(db)
        self.addCleanup(db.close)
        await db.open()
        batches = await outbox.lease_due("n2", T0 + 100, {"hook": 5}, 60.0, 1.0, 100)
        self.assertEqual(batches[0].id, batch.id)
        self.assertEqual([e["queue_id"] for b in batches for e in payload(b)], ["Q1", "Q2"])


class RedisOutboxTests(OutboxContractMixin, TestCase):
    async def open_outbox(self) -> tuple[Any, Any]:
        self.redis = await redis_client(self)
        log = RedisEventLog(self.redis)
        self.addCleanup(log.close)
        outbox = RedisWebhookOutbox(self.redis)
        self.addCleanup(outbox.close)
        return outbox, log

    async def test_outage_buffers_then_writes(self) -> None:
        """While Redis is down an added event waits in memory; once Redis is back it
        is logged and queued, and its Deferred fires then."""
        self.outbox.writer.retry_delay = 0.1
        self.redis_stop()
        added = self.outbox.add(event(queue_id="Q1"), ["hook"])
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(added.called)
        port, stop = start_redis(self.redis_dir, port=self.redis_port)
        self.redis_stop = stop
        await added
        (batch,) = await self.lease(now=T0 + 5)
        self.assertEqual(payload(batch)[0]["queue_id"], "Q1")
        self.assertEqual(len((await self.log.search(EventQuery(queue_id="Q1"))).events), 1)

    async def test_close_drops_events_during_outage(self) -> None:
        self.redis_stop()
        added = self.outbox.add(event(), ["hook"])
        await task.deferLater(reactor, 0.1, lambda: None)
        await self.outbox.close()
        self.assertTrue(added.called)

    async def test_kept_across_a_crash(self) -> None:
        """After ``add`` fires, the event and its queue entry survive a SIGKILL of Redis
        (append-only file, fsync always), and are logged and queued together."""
        await self.outbox.add(event(queue_id="Q1"), ["hook"])
        await self.redis.disconnect()
        self.redis_stop()
        port, stop = start_redis(self.redis_dir, port=self.redis_port)
        self.redis_stop = stop
        client = connect(f"redis://127.0.0.1:{port}/0", poolsize=2)
        self.addCleanup(client.disconnect)
        await client.wait_connected(reactor, 10.0)
        page = await RedisEventLog(client).search(EventQuery(queue_id="Q1"))
        self.assertEqual(len(page.events), 1)
        (batch,) = await RedisWebhookOutbox(client).lease_due(
            "n1", T0 + 5, {"hook": 1}, 60.0, 1.0, 100
        )
        self.assertEqual(payload(batch)[0]["id"], page.events[0].id)
