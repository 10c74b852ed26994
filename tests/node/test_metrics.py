"""A running node's metrics: mail sent over SMTP to a smarthost pool moves the
families fed by the intake, the events, the delivery agent and the spool, and a scrape
of ``/metrics`` on the API endpoint shows them with bounded labels."""

from __future__ import annotations

from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.delivery.test_routing import start_relay_on_dns, start_sink, submit_many
from tests.delivery.test_service import RELAY_LISTENER, submit, wait_event
from tests.support.relay import in_thread, start_relay, until

RECIPIENT = "someone@far-away-domain.example"


class NodeMetricsTests(unittest.TestCase):
    async def scrape(self, port: int) -> tuple[str, dict[tuple[str, Any], float]]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{port}/metrics", pool=pool)
        self.assertEqual(response.code, 200)
        text = (await response.content()).decode()
        return text, {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def test_mail_moves_the_metrics(self) -> None:
        sink = await start_sink(self, "127.0.0.3")
        sink_port = sink.addresses[0][1]
        relay = await start_relay(
            self, [{**RELAY_LISTENER, "tenant": "acme"}],
            pool={"sink": {"endpoints": [f"127.0.0.3:{sink_port}"]}},
            route=[{"via": "pool:sink"}],
        )
        await in_thread(submit, relay.ports["relay"], "app@sender.test", [RECIPIENT])
        await wait_event(relay, RECIPIENT, "delivered")
        # One more over HTTP, from an API key of tenant acme.
        key = await relay.add_credential("app", tenant="acme", scopes=["send"])
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.post(
            f"http://127.0.0.1:{relay.api_port}/v1/messages",
            json={"from": "app@sender.test", "to": [RECIPIENT], "subject": "s", "text": "t"},
            headers={"Authorization": f"Bearer {key}"}, pool=pool,
        )
        self.assertEqual(response.code, 202, await response.text())
        endpoint = f"sink/127.0.0.3:{sink_port}"

        got: dict[tuple[str, Any], float] = {}
        text = ""

        async def counted() -> bool:
            # The outcome event reaches the log and the metrics in the same fan-out;
            # wait until this scrape sees it too.
            nonlocal text, got
            text, got = await self.scrape(relay.api_port)
            # The connection's slot is given back after the outcome is logged, a
            # moment after the event was counted.
            return got.get(("sendarix_delivery_latency_seconds_count",
                            (("provider", "other"),))) == 2.0 and got.get(
                ("sendarix_site_connections", (("site", "pool:sink"),))) == 0.0

        await until(
            lambda: Deferred.fromCoroutine(counted()), 10.0, "the delivery counted in /metrics"
        )
        received = "sendarix_messages_received_total"
        self.assertEqual(got[(received, (("listener", "relay"), ("tenant", "acme")))], 1.0)
        self.assertEqual(got[(received, (("listener", "api"), ("tenant", "acme")))], 1.0)
        self.assertEqual(got[("sendarix_messages_accepted_total", (("tenant", "acme"),))], 2.0)
        self.assertEqual(got[("sendarix_outcomes_total", (
            ("outcome", "delivered"), ("provider", "other"), ("tenant", "acme")))], 2.0)
        self.assertGreaterEqual(got[("sendarix_outbound_connections_total",
                                     (("result", "session"), ("site", "pool:sink")))], 1.0)
        self.assertEqual(got[("sendarix_http_requests_total",
                              (("code", "202"), ("route", "messages")))], 1.0)
        self.assertEqual(got[("sendarix_pool_endpoint_state", (
            ("endpoint", endpoint), ("pool", "sink"), ("state", "closed")))], 1.0)
        self.assertEqual(got[("sendarix_site_connections", (("site", "pool:sink"),))], 0.0)
        self.assertIn(("sendarix_queue_oldest_age_seconds", ()), got)
        build = [dict(labels) for name, labels in got if name == "sendarix_build_info"]
        self.assertEqual([b["node"] for b in build], ["test-node"])
        self.assertNotIn("far-away-domain", text)


    async def test_paced_provider(self) -> None:
        """Mail to a provider with a rate limit: its adaptive rate is shown, every
        message it paced is observed in the throttle wait histogram, and the provider
        (from the table) labels the outcomes and the latency."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {"paced.test": {"MX": [(10, "mx.paced.test")]},
             "mx.paced.test": {"A": ["127.0.0.2"]}},
            sink.addresses[0][1],
            provider={"paced": {"mx_suffixes": ["paced.test"], "rate": "2/s"}},
        )
        recipients = [f"user{n}@paced.test" for n in range(4)]
        await in_thread(submit_many, relay.ports["relay"], recipients, b"Subject: p\r\n\r\nx\r\n")
        await sink.wait_for(4, timeout=30)
        got: dict[tuple[str, Any], float] = {}

        async def counted() -> bool:
            nonlocal got
            _, got = await self.scrape(relay.api_port)
            return got.get(("sendarix_outcomes_total", (
                ("outcome", "delivered"), ("provider", "paced"), ("tenant", "default")))) == 4.0

        await until(lambda: Deferred.fromCoroutine(counted()), 10.0, "4 deliveries counted")
        waits = got[("sendarix_throttle_wait_seconds_count", (("site", "paced"),))]
        self.assertGreaterEqual(waits, 4.0)
        # Four messages at 2/s, submitted at once: together they waited a second or so.
        self.assertGreater(got[("sendarix_throttle_wait_seconds_sum", (("site", "paced"),))], 0.5)
        self.assertEqual(got[("sendarix_site_rate_per_second", (("site", "paced"),))], 2.0)
        self.assertEqual(
            got[("sendarix_delivery_latency_seconds_count", (("provider", "paced"),))], 4.0
        )
        self.assertGreaterEqual(got[("sendarix_outbound_connections_total",
                                     (("result", "session"), ("site", "paced")))], 1.0)
