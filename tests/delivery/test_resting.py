"""A node that will not connect to a site now (dead, or paused after 421s) leaves the
site's mail in the spool for the other nodes, instead of leasing it only to defer it."""

from __future__ import annotations

import os
from typing import cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial import unittest

from sendarix.cleanup.intake import Intake, Submission
from sendarix.config.loader import parse_config
from sendarix.config.settings import Config
from sendarix.control.cli.sink import SinkOptions, SinkServer
from sendarix.delivery.service import DeliveryService
from sendarix.model.event import EventQuery
from sendarix.model.message import Envelope, RecipientRecord, RecipientStatus
from sendarix.routing.mx import DNSResolver, MXRouter
from sendarix.stores.backends import Stores, open_stores
from sendarix.stores.sqlite.spool import SQLiteSpool
from tests.support.dnsserver import start_dns
from tests.support.relay import until

BODY = b"From: <app@example.com>\r\nSubject: resting\r\n\r\nhello\r\n"


class _OneSpool(unittest.TestCase):
    """A sink reached by MX through the tests' DNS server, and one spool for the
    delivery agents a test starts."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = SinkServer(
            SinkOptions(listen=("tcp:0:interface=127.0.0.2",), hostname="sink.test",
                        idle_timeout=0),
            reactor,
        )
        await self.sink.start()
        self.addCleanup(self.sink.stop)
        self.mx_port = self.sink.addresses[0][1]
        dns_port, stop_dns = start_dns(
            {"rest.test": {"MX": [(10, "mx.rest.test")]}, "mx.rest.test": {"A": ["127.0.0.2"]}}
        )
        self.addCleanup(stop_dns)
        self.dns_port = dns_port
        self.directory = os.path.abspath(self.mktemp())
        self.stores: Stores = open_stores(self.config("n1"), reactor)
        await self.stores.open()
        self.addCleanup(self.stores.close)

    def config(self, node: str) -> Config:
        return parse_config(
            {"node": {"name": node, "hostname": f"{node}.test"},
             "spool": {"url": "sqlite:spool.db"}, "events": {"json_log": False},
             "delivery": {"mx_port": self.mx_port},
             "dns": {"nameservers": [f"127.0.0.1:{self.dns_port}"], "timeout": 2},
             "provider": {"restmail": {"mx_suffixes": ["rest.test"]}}},
            self.directory,
        )


    async def queue_one(self, node: str) -> str:
        """Queue one message to user@rest.test as ``node``'s intake would; its id."""
        intake = Intake(spool=self.stores.spool, events=self.stores.events, clock=reactor,
                        node=node, hostname=f"{node}.test")
        queue_id = intake.new_queue_id()
        await intake.accept(Submission(
            queue_id=queue_id, envelope=Envelope("app@example.com", ("user@rest.test",)),
            body=BODY, tenant="default",
        ))
        return queue_id

    #: Share operators' suspensions through the stores (read every 0.1 s).
    shared_suspensions = False

    def agent(
        self, node: str, dead: str | None = None, held: dict[str, str] | None = None
    ) -> DeliveryService:
        """A started delivery agent named ``node``; ``dead``: a site it holds dead
        from the start, with rest.test known to go there; ``held``: tenants whose
        mail it holds back (as the complaint guard would), with why."""
        config = self.config(node)
        resolver = DNSResolver(config.dns.addresses(), 2.0, 60.0, reactor, reactor)
        service = DeliveryService(
            config, self.stores.spool, self.stores.events, self.stores.suppressions,
            MXRouter(resolver, port=self.mx_port), reactor, poll_interval=0.1,
            suspensions=self.stores.site_suspensions if self.shared_suspensions else None,
        )
        service.suspension_sync = 0.1
        service.held_tenants.update(held or {})
        if dead is not None:
            service.shaping.get(dead).window.dead_until = reactor.seconds() + 600
            service.ready_queues.note_domain("rest.test", dead)
        service.startService()
        self.addCleanup(service.stopService)
        return service


class RestingSiteTests(_OneSpool):
    """Two delivery agents share one spool; the first holds the site dead."""

    async def test_dead_site_left_to_another_node(self) -> None:
        """n1 holds the site dead: its polls leave the mail alone (no deferral, no
        attempt); n2, which can reach the site, delivers it."""
        self.agent("n1", dead="restmail")
        queue_id = await self.queue_one("n1")
        await deferLater(reactor, 1.0, lambda: None)  # n1 polls ten times
        stored = await self.stores.spool.get(queue_id)
        assert stored is not None
        (record,) = stored.recipients
        self.assertEqual((record.status, record.attempts), (RecipientStatus.PENDING, 0))
        page = await self.stores.eventlog.search(EventQuery(queue_id=queue_id, type="deferred"))
        self.assertEqual(list(page.events), [])
        self.agent("n2")
        await self.sink.wait_for(1)
        page = await self.stores.eventlog.search(EventQuery(queue_id=queue_id, type="delivered"))
        for _ in range(50):
            if page.events:
                break
            await deferLater(reactor, 0.1, lambda: None)
            page = await self.stores.eventlog.search(
                EventQuery(queue_id=queue_id, type="delivered"))
        (event,) = page.events
        self.assertEqual(event.node, "n2")


class DeadSiteDeferralTests(_OneSpool):
    """Mail deferred because its site is dead is not due again before the site's
    suspension ends."""

    async def test_deferred_until_the_probe(self) -> None:
        """Fresh mail to the dead site and to a domain never routed is handed over
        (not every site it goes to rests); the dead site's delivery is deferred to
        the end of the suspension, not to the schedule's first step (about 60 s)."""
        service = self.agent("n1", dead="restmail")
        dead_until = service.shaping.get("restmail").window.dead_until
        assert dead_until is not None
        # Fresh mail is handed over once the agent polls (after taking back its
        # own leases): before, it goes through the spool.
        await until(lambda: service._loop is not None, 10, "the agent's first poll")
        intake = Intake(spool=self.stores.spool, events=self.stores.events, clock=reactor,
                        node="n1", hostname="n1.test", active_queue=service)
        queue_id = intake.new_queue_id()
        await intake.accept(Submission(
            queue_id=queue_id, body=BODY, tenant="default",
            envelope=Envelope("app@example.com", ("user@rest.test", "user@elsewhere.test")),
        ))
        async def dead_site_record() -> RecipientRecord:
            stored = await self.stores.spool.get(queue_id)
            assert stored is not None
            (record,) = [r for r in stored.recipients if r.address == "user@rest.test"]
            return record

        async def deferred() -> bool:
            return (await dead_site_record()).status is RecipientStatus.DEFERRED

        await until(lambda: Deferred.fromCoroutine(deferred()), 10, "the deferral")
        record = await dead_site_record()
        self.assertEqual(record.attempts, 1)
        assert record.last_reply is not None
        self.assertIn("destination not responding", record.last_reply.text)
        self.assertEqual(record.next_attempt, dead_until)


class GroupDeferralTests(_OneSpool):
    """Deliveries that a poll leases together and that cannot go are deferred
    together."""

    async def test_deferred_together_share_commits(self) -> None:
        """A poll's group for a held tenant is deferred as one: the outcomes and
        events of its deliveries share the spool's commits.  Deferred one after
        another, each took two commits of its own (its outcome, then its event),
        and a dead site's backlog was deferred more slowly than mail came in."""
        intake = Intake(spool=self.stores.spool, events=self.stores.events, clock=reactor,
                        node="n1", hostname="n1.test")
        count = 300
        queue_ids = [intake.new_queue_id() for _ in range(count)]
        await gatherResults([
            intake.accept(Submission(
                queue_id=queue_id, body=BODY, tenant="acme",
                envelope=Envelope("app@example.com", (f"user{i}@rest.test",)),
            ))
            for i, queue_id in enumerate(queue_ids)
        ])
        database = cast(SQLiteSpool, self.stores.spool).database
        before = database.commits
        self.agent("n1", held={"acme": "complaints over the threshold"})

        async def all_deferred() -> bool:
            page = await self.stores.eventlog.search(EventQuery(type="deferred", limit=500))
            return len(page.events) >= count

        await until(lambda: Deferred.fromCoroutine(all_deferred()), 10, "every deferral")
        used = database.commits - before
        page = await self.stores.eventlog.search(EventQuery(type="deferred", limit=500))
        self.assertEqual(len(page.events), count)  # each deferred once
        # The polls (every 0.1 s, and at once after a full one) commit too; one
        # deferral after another took two commits each (243 for 120 deliveries).
        self.assertLess(used, count // 4)
        for queue_id in queue_ids[:: count // 10]:
            stored = await self.stores.spool.get(queue_id)
            assert stored is not None
            (record,) = stored.recipients
            self.assertEqual((record.status, record.attempts), (RecipientStatus.DEFERRED, 1))
            assert record.last_reply is not None
            self.assertIn("held by the operator's guard", record.last_reply.text)


class DownPoolTests(unittest.TestCase):
    """A smarthost pool whose only endpoint refuses connections."""

    async def test_pool_whose_endpoints_stay_down_becomes_dead(self) -> None:
        """Once every endpoint rests, each batch that finds none counts as a failed
        connection: the pool's site is soon dead, and its mail is then left in the
        spool (not leased and deferred over and over)."""
        from sendarix.node.service import make_routers
        from tests.support.relayproc import free_port

        directory = os.path.abspath(self.mktemp())
        config = parse_config(
            {"node": {"name": "n1", "hostname": "n1.test"},
             "spool": {"url": "sqlite:spool.db"}, "events": {"json_log": False},
             "delivery": {"max_messages_per_connection": 1, "connect_timeout": 1},
             "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
             "route": [{"match": {"recipient_domain": "down.test"}, "via": "pool:down"}],
             "pool": {"down": {"endpoints": [{"host": "127.0.0.1", "port": free_port()}],
                               "cooldown": "10m"}}},
            directory,
        )
        stores = open_stores(config, reactor)
        await stores.open()
        self.addCleanup(stores.close)
        resolver = DNSResolver(config.dns.addresses(), 0.5, 60.0, reactor, reactor)
        service = DeliveryService(
            config, stores.spool, stores.events, stores.suppressions,
            MXRouter(resolver), reactor, poll_interval=0.1,
            routers=make_routers(config, resolver, stores),
        )
        service.startService()
        self.addCleanup(service.stopService)
        intake = Intake(spool=stores.spool, events=stores.events, clock=reactor,
                        node="n1", hostname="n1.test")
        for i in range(12):
            await intake.accept(Submission(
                queue_id=intake.new_queue_id(),
                envelope=Envelope("app@example.com", (f"user{i}@down.test",)),
                body=BODY, tenant="default",
            ))
        window = service.shaping.get("pool:down").window
        for _ in range(100):
            if window.is_dead(reactor.seconds()):
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(window.is_dead(reactor.seconds()))
        # Mail queued now stays in the spool: the poll leaves the dead site out.
        queue_id = intake.new_queue_id()
        await intake.accept(Submission(
            queue_id=queue_id, envelope=Envelope("app@example.com", ("late@down.test",)),
            body=BODY, tenant="default",
        ))
        await deferLater(reactor, 0.5, lambda: None)
        stored = await stores.spool.get(queue_id)
        assert stored is not None
        (record,) = stored.recipients
        self.assertEqual((record.status, record.attempts), (RecipientStatus.PENDING, 0))


class SharedSuspensionTests(_OneSpool):
    """An operator's suspension, made through one delivery agent, holds on every agent
    of the stores (two nodes, or two workers of one machine)."""

    shared_suspensions = True

    async def test_suspension_reaches_the_other_agent(self) -> None:
        one, two = self.agent("n1"), self.agent("n2")
        until = reactor.seconds() + 600
        one.suspend("restmail", until)
        for _ in range(50):
            if two.scheduler.suspensions(reactor.seconds()).get("restmail") == until:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(two.scheduler.suspensions(reactor.seconds()), {"restmail": until})
        # Mail to the site waits on both (deferred with the operator's reason).
        queue_id = await self.queue_one("n2")
        for _ in range(50):
            page = await self.stores.eventlog.search(
                EventQuery(queue_id=queue_id, type="deferred"))
            if page.events:
                break
            await deferLater(reactor, 0.1, lambda: None)
        (event,) = page.events
        assert event.response is not None
        self.assertIn("suspended by the operator", event.response.text)
        self.assertEqual(self.sink.stats.message_ids, [])
        # Lifted through the other agent: lifted on both.
        self.assertTrue(two.resume("restmail"))
        for _ in range(50):
            if not one.scheduler.suspensions(reactor.seconds()):
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(one.scheduler.suspensions(reactor.seconds()), {})
        self.assertEqual(await self.stores.site_suspensions.active(reactor.seconds()), {})
