"""The dispatcher end to end: events from the outbox POSTed to a receiver on a loopback
port, signatures checked with the ``standardwebhooks`` package, retries, 410,
dead letters, ordering by sequence, endpoints apart, and several nodes on one Redis."""

from __future__ import annotations

import json
import os
from typing import Any

from standardwebhooks.webhooks import Webhook
from twisted.application.service import IService
from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.events.webhooks.directory import WebhookDirectory
from sendarix.events.webhooks.dispatcher import WebhookDispatcher, guarded_agent
from sendarix.events.webhooks.endpoints import Subscriptions, WebhookEndpoint
from sendarix.events.webhooks.signature import generate_secret, parse_secret
from sendarix.events.webhooks.sink import OutboxSink
from sendarix.interfaces import IEventSink
from sendarix.model.event import Event, EventQuery
from sendarix.stores.redis.eventlog import RedisEventLog
from sendarix.stores.redis.outbox import RedisWebhookOutbox
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.eventlog import SQLiteEventLog
from sendarix.stores.sqlite.outbox import SQLiteWebhookOutbox
from tests.support.redisserver import redis_client
from tests.support.relay import until
from tests.support.webhooks import Answer, Received, Receiver, StaticResolver

reactor: Any = _reactor

FAST = (0.0, 0.2, 0.4, 0.6, 0.8)


def events_of(received: Received) -> list[dict[str, Any]]:
    body = json.loads(received.body)
    events: list[dict[str, Any]] = body["data"]["events"]
    return events


class DispatcherTestsMixin:
    """Shared set-up: stores, a receiver, endpoints and the sink in front of the log."""

    outbox: Any
    log: Any

    def start_receiver(self: Any, answer: Any = None) -> Receiver:
        receiver = Receiver(reactor) if answer is None else Receiver(reactor, answer)
        port = reactor.listenTCP(0, receiver.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(receiver.finish_hanging)
        receiver.url = f"http://127.0.0.1:{port.getHost().port}/hook"
        return receiver

    def endpoint(self: Any, name: str, receiver: Receiver, schedule: Any = FAST,
                 secrets: tuple[str, ...] = ()) -> WebhookEndpoint:
        secrets = secrets or (generate_secret(),)
        self.secrets = getattr(self, "secrets", {})
        self.secrets[name] = secrets
        return WebhookEndpoint(
            name, "acme", receiver.url,
            ("accepted", "deferred", "delivered", "bounced"),
            tuple(parse_secret(s) for s in secrets), schedule,
        )

    def dispatcher(self: Any, endpoints: list[WebhookEndpoint] | WebhookDirectory,
                   node: str = "n1",
                   **kw: Any) -> WebhookDispatcher:
        agent, pool = guarded_agent(reactor, allow_private=True, connect_timeout=2.0)
        kw.setdefault("timeout", 2.0)
        d = WebhookDispatcher(
            self.outbox, endpoints, node, reactor, agent, pool,
            interval=0.02, fill_time=0.05, **kw,
        )
        d.startService()
        self.addCleanup(d.stopService)
        return d

    def sink(self: Any, endpoints: list[WebhookEndpoint]) -> OutboxSink:
        return OutboxSink(self.log, self.outbox, Subscriptions.of(endpoints))


def event(type: str, queue_id: str = "Q1", tenant: str = "acme") -> Event:
    return Event.make(type, reactor.seconds(), queue_id=queue_id, tenant=tenant,
                      recipient="rcpt@example.com")


class SQLiteDispatcherTests(DispatcherTestsMixin, TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.log = SQLiteEventLog(self.db)
        self.outbox = SQLiteWebhookOutbox(self.db)
        self.addCleanup(self.db.close)
        await self.db.open()

    async def test_signed_post_verified_by_standardwebhooks(self) -> None:
        """The POST verifies with the independent library (both secrets of a rotation),
        and carries the events of the tenant's subscribed types only."""
        receiver = self.start_receiver()
        old, new = generate_secret(), generate_secret()
        hook = self.endpoint("hook", receiver, secrets=(old, new))
        sink = self.sink([hook])
        self.assertTrue(verifyObject(IEventSink, sink))
        delivered = event("delivered")
        await sink.emit(event("accepted"))
        await sink.emit(event("rejected"))  # not subscribed
        await sink.emit(event("delivered", "Q9", tenant="globex"))  # another tenant
        await sink.emit(delivered)
        dispatcher = self.dispatcher([hook])
        self.assertTrue(verifyObject(IService, dispatcher))
        await receiver.wait_for(1)
        (got,) = receiver.received
        for secret in (old, new):
            body = Webhook(secret).verify(got.body, got.headers)
            self.assertEqual(body["type"], "events")
        self.assertEqual(got.headers["content-type"], "application/json")
        self.assertEqual([e["type"] for e in events_of(got)], ["accepted", "delivered"])
        self.assertEqual(events_of(got)[1], {**delivered.to_json(), "sequence": 3})
        self.assertTrue(got.headers["webhook-id"].startswith("msg_"))
        # Every event is in the delivery log, subscribed or not.
        page = await self.log.search(EventQuery(limit=10))
        self.assertEqual(len(page.events), 4)
        await dispatcher.idle()
        self.assertEqual(await self.outbox.counts("hook"), {"queued": 0, "batches": 0, "dead": 0})

    async def test_500_twice_then_200_same_id(self) -> None:
        """Each retry carries the same webhook-id and body, signed at its own time."""
        answers: list[Answer] = [(500, {}), (500, {}), (200, {})]
        receiver = self.start_receiver(lambda r: answers.pop(0))
        hook = self.endpoint("hook", receiver)
        await self.sink([hook]).emit(event("delivered"))
        dispatcher = self.dispatcher([hook])
        await receiver.wait_for(3)
        await dispatcher.idle()
        first, second, third = receiver.received
        self.assertEqual(len({r.headers["webhook-id"] for r in receiver.received}), 1)
        self.assertEqual(first.body, third.body)
        self.assertGreaterEqual(second.at - first.at, 0.15)
        Webhook(self.secrets["hook"][0]).verify(third.body, third.headers)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(receiver.received), 3)
        self.assertEqual(await self.outbox.counts("hook"), {"queued": 0, "batches": 0, "dead": 0})

    async def test_410_disables_the_endpoint(self) -> None:
        receiver = self.start_receiver(lambda r: (410, {}))
        hook = self.endpoint("hook", receiver)
        sink = self.sink([hook])
        await sink.emit(event("delivered"))
        dispatcher = self.dispatcher([hook])
        await receiver.wait_for(1)
        await dispatcher.idle()
        (off,) = await self.outbox.disabled()
        self.assertEqual(off.endpoint, "hook")
        (dead,) = await self.outbox.list_dead("hook", 10)
        self.assertIn("410", dead.error)
        await sink.emit(event("bounced", queue_id="Q2"))
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(receiver.received), 1)
        self.assertEqual(await self.outbox.counts("hook"), {"queued": 0, "batches": 0, "dead": 1})

    async def test_dead_letter_then_replay(self) -> None:
        """After the schedule's last attempt the batch is dead; replayed, it is sent
        again with the same id."""
        failing = [True]
        receiver = self.start_receiver(lambda r: (500, {}) if failing[0] else (204, {}))
        hook = self.endpoint("hook", receiver, schedule=(0.0, 0.1))
        await self.sink([hook]).emit(event("delivered"))
        dispatcher = self.dispatcher([hook])
        await receiver.wait_for(2)
        await dispatcher.idle()
        await deferLater(reactor, 0.1, lambda: None)
        (dead,) = await self.outbox.list_dead(None, 10)
        self.assertEqual((dead.attempts, dead.error, dead.count), (2, "HTTP 500", 1))
        self.assertEqual(len(receiver.received), 2)
        failing[0] = False
        self.assertTrue(await self.outbox.replay(dead.id, reactor.seconds()))
        await receiver.wait_for(3)
        await dispatcher.idle()
        self.assertEqual(receiver.received[2].headers["webhook-id"], dead.id)
        await until(lambda: self.outbox.list_dead(None, 10).addCallback(lambda d: d == []),
                    5.0, "the dead batch deleted")

    async def test_retry_after_is_honoured(self) -> None:
        answers: list[Answer] = [(503, {"Retry-After": "1"}), (200, {})]
        receiver = self.start_receiver(lambda r: answers.pop(0))
        hook = self.endpoint("hook", receiver, schedule=(0.0, 0.1, 5.0))
        await self.sink([hook]).emit(event("delivered"))
        self.dispatcher([hook])
        await receiver.wait_for(2)
        first, second = receiver.received
        self.assertGreaterEqual(second.at - first.at, 0.95)

    async def test_order_by_sequence(self) -> None:
        """Batches may arrive out of order (here the first one fails once); each
        event's sequence gives its message's order back."""
        failed: list[bool] = []

        def answer(r: Received) -> Answer:
            if not failed and any(e["type"] == "accepted" for e in events_of(r)):
                failed.append(True)
                return (500, {})
            return (200, {})

        receiver = self.start_receiver(answer)
        hook = self.endpoint("hook", receiver)
        sink = self.sink([hook])
        for type in ("accepted", "deferred", "deferred", "delivered"):
            await sink.emit(event(type, queue_id="QX"))
        self.dispatcher([hook], max_events=2)
        await receiver.wait_for(3)
        arrived = [e for r in receiver.received[1:] for e in events_of(r)]
        self.assertEqual([e["type"] for e in arrived],
                         ["deferred", "delivered", "accepted", "deferred"])
        ordered = sorted(arrived, key=lambda e: e["sequence"])
        self.assertEqual([e["type"] for e in ordered],
                         ["accepted", "deferred", "deferred", "delivered"])
        self.assertEqual([e["sequence"] for e in ordered], [1, 2, 3, 4])

    async def test_hanging_endpoint_does_not_hold_up_another(self) -> None:
        """An endpoint that never answers holds its own slots only."""
        slow = self.start_receiver(lambda r: None)
        fast = self.start_receiver()
        a, b = self.endpoint("slow", slow), self.endpoint("fast", fast)
        a = WebhookEndpoint("slow", "acme", slow.url, a.events, a.keys, FAST)
        sink = self.sink([a, b])
        for i in range(3):
            await sink.emit(event("delivered", queue_id=f"Q{i}"))
        self.dispatcher([a, b], timeout=5.0, concurrency=1, max_events=1)
        await gatherResults([slow.wait_for(1), fast.wait_for(3)])
        self.assertEqual(len(slow.received), 1)
        self.assertLess(fast.received[-1].at - slow.received[0].at, 2.0)
        slow.finish_hanging()

    async def test_follows_the_directory(self) -> None:
        """An endpoint added to the directory gets the events that happen from then
        on; once it is removed, its POST under way is let finish (here: time out)
        and no slot stays counted for it."""
        from tests.events.webhooks.test_directory import KEY, stored

        slow = self.start_receiver(lambda r: None)
        directory = WebhookDirectory([], reactor, key=KEY)
        sink = OutboxSink(self.log, self.outbox, directory)
        dispatcher = self.dispatcher(directory, timeout=1.0)
        await sink.emit(event("delivered", queue_id="Q0"))  # no endpoint yet: logged only
        secret = generate_secret()
        value = stored(url=slow.url, secret=secret)
        directory.apply([value])
        await sink.emit(event("delivered", queue_id="Q1"))
        await slow.wait_for(1)
        (got,) = slow.received
        sent = Webhook(secret).verify(got.body, got.headers)
        self.assertEqual([e["queue_id"] for e in sent["data"]["events"]], ["Q1"])
        self.assertEqual(dispatcher.busy(), {value.name: 1})
        directory.apply([])
        await until(lambda: dispatcher.busy() == {}, 5.0,
                    lambda: f"the slot given back (busy: {dispatcher.busy()})")
        await dispatcher.idle()
        await deferLater(reactor, 0.2, lambda: None)  # rounds that would lease it again
        self.assertEqual(len(slow.received), 1)

    async def test_refused_address_is_a_failed_attempt(self) -> None:
        """A name resolving to 10.0.0.1: no connection is made (the HTTP client's
        reactor is a memory reactor), and the attempt fails naming the address."""
        memory = MemoryReactorClock()
        memory.advance(reactor.seconds())
        resolver = StaticResolver({"internal.example": ["10.0.0.1"]})
        agent, pool = guarded_agent(memory, allow_private=False, resolver=resolver)
        hook = WebhookEndpoint(
            "hook", "acme", "https://internal.example/hook", ("delivered",),
            (parse_secret(generate_secret()),), (0.0,),
        )
        ev = Event.make("delivered", memory.seconds() - 5, queue_id="Q1", tenant="acme")
        await self.sink([hook]).emit(ev)
        dispatcher = WebhookDispatcher(self.outbox, [hook], "n1", memory, agent, pool)
        await dispatcher.poll()
        await dispatcher.idle()
        self.assertEqual(memory.tcpClients, [])
        self.assertEqual(resolver.asked, ["internal.example"])
        (dead,) = await self.outbox.list_dead(None, 10)
        self.assertIn("10.0.0.1 is a private address", dead.error)


class RedisDispatcherTests(DispatcherTestsMixin, TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.redis = await redis_client(self)
        self.log = RedisEventLog(self.redis)
        self.addCleanup(self.log.close)
        self.outbox = RedisWebhookOutbox(self.redis)

    async def test_two_nodes_share_the_outbox(self) -> None:
        """Two dispatchers on one Redis: every event arrives once."""
        receiver = self.start_receiver()
        hook = self.endpoint("hook", receiver)
        sink = self.sink([hook])
        for i in range(30):
            await sink.emit(event("delivered", queue_id=f"Q{i}"))
        one = self.dispatcher([hook], "n1", max_events=3)
        two = self.dispatcher([hook], "n2", max_events=3)
        await receiver.wait_for(10)
        await gatherResults([one.idle(), two.idle()])
        ids = [e["queue_id"] for r in receiver.received for e in events_of(r)]
        self.assertEqual(sorted(ids), sorted(f"Q{i}" for i in range(30)))
        self.assertEqual(len({r.headers["webhook-id"] for r in receiver.received}), 10)

    async def test_500_then_200(self) -> None:
        answers: list[Answer] = [(500, {}), (200, {})]
        receiver = self.start_receiver(lambda r: answers.pop(0))
        hook = self.endpoint("hook", receiver)
        await self.sink([hook]).emit(event("delivered"))
        dispatcher = self.dispatcher([hook])
        await receiver.wait_for(2)
        await dispatcher.idle()
        self.assertEqual(len({r.headers["webhook-id"] for r in receiver.received}), 1)
        self.assertEqual(await self.outbox.counts("hook"), {"queued": 0, "batches": 0, "dead": 0})



class RestartTests(DispatcherTestsMixin, TestCase):
    """A dispatcher restarting under the same node name."""

    async def setUp(self) -> None:  # type: ignore[override]
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.log = SQLiteEventLog(self.db)
        self.outbox = SQLiteWebhookOutbox(self.db)
        self.addCleanup(self.db.close)
        await self.db.open()

    async def test_takes_back_its_leases_and_trims_dead(self) -> None:
        """Batches the node held before a restart are sent at once, not after the
        lease runs out; dead batches past the retention are deleted."""
        receiver = self.start_receiver()
        hook = self.endpoint("hook", receiver)
        await self.sink([hook]).emit(Event.make("delivered", reactor.seconds() - 5,
                                                queue_id="Q1", tenant="acme"))
        await self.sink([hook]).emit(Event.make("delivered", reactor.seconds() - 5,
                                                queue_id="Q2", tenant="acme"))
        now = reactor.seconds()
        held, dead = await self.outbox.lease_due("n1", now, {"hook": 2}, 3600.0, 0.05, 1)
        await self.outbox.dead_letter(dead.id, "n1", "HTTP 500", now - 7200)
        self.dispatcher([hook], "n1", dead_retention=3600.0)
        await receiver.wait_for(1)
        self.assertEqual(receiver.received[0].headers["webhook-id"], held.id)
        await until(lambda: self.outbox.list_dead(None, 10).addCallback(lambda d: d == []),
                    5.0, "the dead batch deleted")
