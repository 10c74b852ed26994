"""A node with ``[[webhook]]``: mail through SMTP to the simulator ends as signed POSTs
of its events at a loopback receiver, verified with the ``standardwebhooks`` package."""

from __future__ import annotations

import json
import os
import smtplib
from typing import Any

from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

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
