"""A node with ``[[webhook]]``: mail through SMTP to the simulator ends as signed POSTs
of its events at a loopback receiver, verified with the ``standardwebhooks`` package."""

from __future__ import annotations

import json
import os
import smtplib
from typing import Any

import treq
from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from sendarix.config.errors import ConfigError
from sendarix.config.loader import parse_config
from sendarix.events.webhooks.signature import generate_secret
from sendarix.model.event import EventQuery
from sendarix.node.service import makeService
from tests.support.relay import in_thread, start_relay, until
from tests.support.webhooks import Receiver

reactor: Any = _reactor

LISTENER = {
    "name": "smtp", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none", "auth": "none",
    "trusted_networks": ["127.0.0.0/8"], "tenant": "acme",
}  # fmt: skip


def send(port: int, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@acme.example", [recipient], b"Subject: hi\r\n\r\nhello\r\n")


class NodeWebhookTests(unittest.TestCase):
    async def test_mail_outcomes_reach_the_receiver(self) -> None:
        receiver = Receiver(reactor)
        port = reactor.listenTCP(0, receiver.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        secret = generate_secret()
        env = f"SENDARIX_TEST_HOOK_{os.getpid()}"
        os.environ[env] = secret
        self.addCleanup(os.environ.pop, env, None)
        relay = await start_relay(
            self, [LISTENER],
            webhook=[{
                "tenant": "acme", "url": f"http://127.0.0.1:{port.getHost().port}/hook",
                "events": ["accepted", "delivered"], "secret_env": env, "name": "acme-hook",
            }],
            webhooks={"allow_private": True},
        )
        self.assertIsNotNone(relay.service.webhooks)
        await in_thread(send, relay.ports["smtp"], "success@simulator.sendarix.invalid")

        def events() -> list[dict[str, Any]]:
            return [e for r in receiver.received for e in json.loads(r.body)["data"]["events"]]

        await until(lambda: len(events()) >= 2, 15.0, lambda: f"two events (got {events()})")
        for got in receiver.received:
            Webhook(secret).verify(got.body, got.headers)
        ordered = sorted(events(), key=lambda e: e["sequence"])
        self.assertEqual([e["type"] for e in ordered], ["accepted", "delivered"])
        self.assertEqual({e["tenant"] for e in ordered}, {"acme"})
        logged = await relay.stores.eventlog.search(EventQuery(queue_id=ordered[0]["queue_id"]))
        self.assertEqual({e.id for e in logged.events}, {e["id"] for e in ordered})
        # Each POST's result counts in the node's metrics (once it is recorded).
        families = relay.service.metrics.webhook_deliveries

        def counted() -> float:
            return sum(families.labels(r)._value.get()
                       for r in ("delivered", "failed", "dead_lettered"))

        await until(lambda: counted() == len(receiver.received), 10.0,
                    lambda: f"{len(receiver.received)} POSTs counted (got {counted()})")
        self.assertGreaterEqual(families.labels("delivered")._value.get(), 1)

    def test_missing_secret_stops_the_node(self) -> None:
        """A webhook whose secret variable is not set fails before the node serves."""
        config = parse_config(
            {"spool": {"url": "sqlite:s.db"},
             "webhook": [{"url": "https://h.example/", "secret_env": "SENDARIX_UNSET_HOOK"}]},
            os.path.abspath(self.mktemp()),
        )
        os.environ.pop("SENDARIX_UNSET_HOOK", None)
        with self.assertRaises(ConfigError) as caught:
            makeService(config, reactor)
        self.assertIn("webhook[0].secret_env", str(caught.exception))



async def call(base: str, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One API call over a fresh connection: (status, parsed JSON)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.request(
        method, base + path, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        pool=pool,
    )
    return response.code, json.loads(await response.content())


class SharedDirectoryTests(unittest.TestCase):
    """Two nodes on one Redis: an endpoint added through one node's API is used by
    the other within seconds, and removing it there stops it on both."""

    timeout = 60

    async def test_added_on_one_node_used_by_another(self) -> None:
        from tests.cleanup.test_domains import SECRET
        from tests.support.redisserver import start_redis

        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        redis_port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        receiver = Receiver(reactor)
        port = reactor.listenTCP(0, receiver.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        a, b = [
            await start_relay(self, [LISTENER], spool={"url": f"redis://127.0.0.1:{redis_port}/0"},
                              node={"name": name, "hostname": "relay.test"},
                              webhooks={"allow_private": True})
            for name in ("node-a", "node-b")
        ]
        admin = await a.add_credential("acme-admin", tenant="acme", scopes=["admin"])
        base = f"http://127.0.0.1:{a.api_port}"
        status, made = await call(base, admin, "POST", "/v1/webhooks", {
            "url": f"http://127.0.0.1:{port.getHost().port}/hook", "events": ["delivered"]})
        self.assertEqual(status, 201, made)
        name = made["name"]
        directory = b.service.webhook_directory
        await until(lambda: directory.get(name) is not None, 10.0, "the endpoint on node b")
        await in_thread(send, b.ports["smtp"], "success@simulator.sendarix.invalid")
        await receiver.wait_for(1)
        (got,) = receiver.received
        (event,) = Webhook(made["secret"]).verify(got.body, got.headers)["data"]["events"]
        self.assertEqual((event["type"], event["node"]), ("delivered", "node-b"))

        status, removed = await call(base, admin, "DELETE", f"/v1/webhooks/{name}")
        self.assertEqual(status, 200, removed)
        await until(lambda: directory.get(name) is None, 10.0, "the removal on node b")
        await in_thread(send, b.ports["smtp"], "success@simulator.sendarix.invalid")

        def delivered() -> Any:
            d = b.stores.eventlog.search(EventQuery(type="delivered"))
            return d.addCallback(lambda page: len(page.events) == 2)

        await until(delivered, 15.0, "the second delivery")
        self.assertEqual(await b.stores.outbox.counts(name),
                         {"queued": 0, "batches": 0, "dead": 0})
        self.assertEqual(len(receiver.received), 1)
