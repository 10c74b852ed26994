"""A relay node on the Redis stores: mail accepted into Redis, the ``sendarix`` command
on the same Redis, and Redis outages (451 4.3.0 while Redis is down, reconnection,
nothing accepted lost).  Each test runs its own redis-server with an append-only file.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.control.cli.sink import SinkOptions, SinkServer
from sendarix.interfaces import IBackend
from sendarix.node.service import make_auth_limiter
from sendarix.stores.redis.backend import RedisBackend
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.endpoints import SharedEndpointPool
from sendarix.stores.redis.limits import SharedAuthLimiter, SharedRateLimiter
from sendarix.stores.redis.selector import SharedTieredSelector
from sendarix.stores.redis.spool import RedisSpool
from sendarix.stores.redis.throttle import RedisThrottle
from tests.control.cli.test_main import _run, _write_config
from tests.support.dnsserver import start_dns
from tests.support.redisserver import start_redis
from tests.support.relay import Relay, in_thread, start_relay, until

LISTENER = {
    "name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
    "auth": "none", "trusted_networks": ["127.0.0.0/8"],
}


def _send(port: int, count: int, tag: str, domain: str = "example.org") -> list[Any]:
    """Send ``count`` messages over one session: each one's (code, reply text)."""
    results = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        for i in range(count):
            body = f"Message-ID: <{tag}{i}@test>\r\nSubject: {tag} {i}\r\n\r\nbody\r\n"
            try:
                for reply in (s.mail("app@example.com"), s.rcpt(f"user{i}@{domain}")):
                    if reply[0] != 250:
                        raise smtplib.SMTPResponseException(*reply)
                results.append(s.data(body.encode()))
            except smtplib.SMTPResponseException as e:
                results.append((e.smtp_code, e.smtp_error))
                s.rset()
    return results


class RedisRelayTests(TestCase):
    """A node whose stores are all in Redis."""

    timeout = 60

    def setUp(self) -> None:
        self.redis_dir = os.path.abspath(self.mktemp())
        self.redis_port, stop = start_redis(self.redis_dir)
        self.addCleanup(lambda: self.stop_redis())
        self.stop_redis = stop
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"

    async def test_accepts_into_redis_and_cli_reads_it(self) -> None:
        """A message answered 250 is in the Redis spool and its accepted event in the
        Redis log; the ``sendarix`` command lists both from the same Redis, and a
        credential it adds is seen by the relay."""
        relay = await start_relay(self, [LISTENER], spool={"url": self.url})
        self.assertIsInstance(relay.stores.backend, RedisBackend)
        self.assertTrue(verifyObject(IBackend, relay.stores.backend))
        self.assertIsInstance(relay.stores.make_throttle("n"), RedisThrottle)
        (code, text), = await in_thread(_send, relay.ports["relay"], 1, "cli")
        self.assertEqual(code, 250, text)
        qid = text.split()[-1].decode()
        self.assertEqual((await relay.stores.spool.stats()).messages, 1)

        folder = os.path.abspath(self.mktemp())
        config = _write_config(folder, text=f'[spool]\nurl = "{self.url}"\n')
        out, err, rc = await _run(["--config", config, "queue", "list", "--json"], folder)
        self.assertEqual(rc, 0, err)
        self.assertEqual([m["queue_id"] for m in json.loads(out)], [qid])
        out, err, rc = await _run(
            ["--config", config, "log", "search", "--queue-id", qid, "--json"], folder
        )
        self.assertEqual(rc, 0, err)
        # (delivery may already have deferred it: no DNS in this test)
        self.assertIn("accepted", [e["type"] for e in json.loads(out)])
        out, err, rc = await _run(
            ["--config", config, "credentials", "add", "app", "--tenant", "acme", "--json"],
            folder,
        )
        self.assertEqual(rc, 0, err)
        cred = await relay.stores.credentials.get("app")
        self.assertEqual(cred and cred.tenant, "acme")

    async def test_shared_routing_state(self) -> None:
        """With the stores in Redis, the node's throttle, egress selector, smarthost
        endpoint health and submission limits are the shared ones."""
        relay = await start_relay(
            self, [LISTENER], spool={"url": self.url},
            egress={"source": [{"name": "s1", "address": "127.0.0.1"}]},
            pool={"relays": {"endpoints": ["127.0.0.2:2525"]}},
        )
        delivery = relay.service.delivery
        self.assertIsInstance(delivery.throttle, RedisThrottle)
        self.assertIsInstance(delivery.selector, SharedTieredSelector)
        self.assertIsInstance(delivery.routes.routers["pool:relays"][1], SharedEndpointPool)
        settings = relay.service.listeners[0].factory.settings
        self.assertIsInstance(settings.rate_limiter, SharedRateLimiter)
        self.assertIsInstance(make_auth_limiter(relay.config, relay.stores), SharedAuthLimiter)

    async def test_waits_for_redis_at_start(self) -> None:
        """A node started while Redis is down opens no listener until Redis is up,
        then starts by itself and takes mail."""
        self.stop_redis()
        relay = Relay(self.mktemp(), [LISTENER], spool={"url": self.url})
        started = ensureDeferred(relay.start())
        self.addCleanup(relay.stop)
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(started.called)
        self.redis_port, self.stop_redis = start_redis(self.redis_dir, port=self.redis_port)
        await started
        (code, text), = await in_thread(_send, relay.ports["relay"], 1, "late")
        self.assertEqual(code, 250, text)

    async def test_stop_hands_back_leases_of_last_poll(self) -> None:
        """A node stopping while its last poll is answered gives those leases back
        before its stop completes, so another node can deliver the mail at once
        (not after lease_time)."""
        relay = Relay(self.mktemp(), [LISTENER], spool={"url": self.url})
        await relay.start()
        delivery = relay.service.delivery
        await until(lambda: delivery._loop is not None, 10, "delivery loop not started")
        delivery._loop.stop()  # this test polls by hand: no timer, and no wake-up
        delivery._loop = None  # when mail is queued (wake() polls only while looping)
        (code, text), = await in_thread(_send, relay.ports["relay"], 1, "handback")
        self.assertEqual(code, 250, text)
        delivery._tick()  # a poll in flight ...
        self.assertIsNotNone(delivery._polling)
        await relay.stop()  # ... when the node stops
        client = connect(self.url, poolsize=1)
        self.addCleanup(client.disconnect)
        await client.wait_connected(reactor, 10.0)
        other = RedisSpool(client)
        leased = await other.lease_due("other-node", time.time(), 10, 60)
        self.assertEqual([d.queue_id for d in leased], [text.split()[-1].decode()])

    async def test_cli_reports_unreachable_redis(self) -> None:
        """With Redis down, the command exits 1 with one line naming Redis."""
        self.stop_redis()
        folder = os.path.abspath(self.mktemp())
        config = _write_config(folder, text=f'[spool]\nurl = "{self.url}"\n')
        out, err, rc = await _run(["--config", config, "queue", "stats"], folder)
        self.assertEqual(rc, 1)
        self.assertIn(b"Redis", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    async def test_outage_answers_451_then_recovers(self) -> None:
        """Redis is killed mid-stream: the relay answers 451 4.3.0 at once (no hang)
        while it is down, reconnects by itself once it is back, and every message
        answered 250 (before, and after) is in the spool and delivered once."""
        sink = SinkServer(
            SinkOptions(listen=("tcp:0:interface=127.0.0.2",), hostname="sink.test",
                        idle_timeout=0),
            reactor,
        )
        await sink.start()
        self.addCleanup(sink.stop)
        dns_port, stop_dns = start_dns(
            {"out.test": {"MX": [(10, "mx.out.test")]}, "mx.out.test": {"A": ["127.0.0.2"]}}
        )
        self.addCleanup(stop_dns)
        relay = await start_relay(
            self, [LISTENER], spool={"url": self.url, "lease_time": "5s"},
            dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
            delivery={"mx_port": sink.addresses[0][1], "retry_schedule": ["1s"]},
        )
        port = relay.ports["relay"]
        before = await in_thread(_send, port, 5, "before", "out.test")
        self.assertEqual([c for c, _ in before], [250] * 5)

        self.stop_redis()
        started = time.monotonic()
        during = await in_thread(_send, port, 3, "during", "out.test")
        self.assertLess(time.monotonic() - started, 20)
        for code, text in during:
            self.assertIn(code, (451,), text)
            self.assertIn(b"4.3.0", text)

        self.redis_port, self.stop_redis = start_redis(self.redis_dir, port=self.redis_port)
        backend = relay.stores.backend
        assert isinstance(backend, RedisBackend)
        await until(lambda: backend.redis.connected, 20, "no reconnection")
        after = await in_thread(_send, port, 5, "after", "out.test")
        self.assertEqual([c for c, _ in after], [250] * 5)

        wanted = {f"<before{i}@test>" for i in range(5)} | {f"<after{i}@test>" for i in range(5)}
        await until(
            lambda: wanted <= set(sink.stats.message_ids), 30,
            f"not all delivered (got {sink.stats.message_ids})",
        )
        await until(lambda: relay.stores.spool.stats().addCallback(
            lambda s: s.messages == 0), 10, "spool not empty")
        delivered = [m for m in sink.stats.message_ids if m in wanted]
        self.assertEqual(sorted(delivered), sorted(wanted))  # each exactly once
        self.assertFalse({f"<during{i}@test>" for i in range(3)} & set(sink.stats.message_ids))
