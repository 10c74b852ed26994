"""Two tenants side by side on one running node, over SMTP and the API: their
suppression lists, webhooks, rates, quotas, log, statistics and egress sources stay
apart; the complaint guard holds one tenant's mail (deferred, never lost) while the
other's flows, and ``sendarix tenants resume`` releases it.

acme leaves from its egress pool on 127.0.0.2 (and 127.0.0.5), globex from its own on
127.0.0.3 (and 127.0.0.6); both go through one destination, a sink on 127.0.0.4 that
can be told to answer connections from one source address with a block or a
rate-limit reply."""

from __future__ import annotations

import json
import os
import re
import smtplib
import time
from typing import Any

import treq
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet import reactor as _reactor
from twisted.web.client import HTTPConnectionPool

from sendarix.control.cli.sink import SinkProtocol
from sendarix.events.stats import hour_of
from sendarix.events.webhooks.signature import generate_secret
from sendarix.ingress import policy
from sendarix.model.event import Event
from sendarix.model.message import Reply
from tests.control.api.test_api import ApiTestCase
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import RELAY_LISTENER, wait_event
from tests.support.relay import in_thread, start_relay, until
from tests.support.webhooks import Receiver

reactor: Any = _reactor

DESTINATION = "127.0.0.4"
ACME_SOURCES = ("127.0.0.2", "127.0.0.5")
GLOBEX_SOURCES = ("127.0.0.3", "127.0.0.6")
SITE = "pool:dest"


def _peer_faults(sink: Any) -> dict[str, Reply]:
    """Make ``sink`` answer every RCPT from a client address in the returned table
    with that address's reply (a 421 closes the connection, as the sink does)."""
    factory = sink.factory
    table: dict[str, Reply] = {}

    class PeerFaults(SinkProtocol):
        def do_RCPT(self, arg: str) -> None:  # noqa: N802
            reply = table.get(self.peer_address)
            if reply is None or self._sender is None:
                super().do_RCPT(arg)
                return
            factory.stats.rejected_recipients += 1
            self._reply(reply)
            if reply.code == 421:
                self._close()

        _handlers = {**SinkProtocol._handlers, "RCPT": do_RCPT}

    factory.buildProtocol = lambda addr: PeerFaults(factory)
    return table


def _send_smtp(port: int, sender: str, recipients: list[str], count: int = 1) -> list[Any]:
    """``count`` messages over SMTP, one session each: 250, or (code, text) refused."""
    out: list[Any] = []
    for n in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            try:
                s.sendmail(sender, recipients, f"Subject: m{n}\r\n\r\nhello\r\n".encode())
                out.append(250)
            except smtplib.SMTPSenderRefused as e:
                out.append((e.smtp_code, e.smtp_error))
            except smtplib.SMTPRecipientsRefused as e:
                out.append({a: r for a, r in e.recipients.items()})
    return out


class TwoTenantsTests(ApiTestCase):
    """Each test starts the node it needs with :meth:`start`."""

    async def setUp(self) -> None:  # type: ignore[override]
        pass

    async def start(self, **tenants: dict[str, Any]) -> None:
        self.sink = await start_sink(self, DESTINATION)
        self.faults = _peer_faults(self.sink)
        self.receiver = Receiver(reactor)
        hooks = reactor.listenTCP(0, self.receiver.site(), interface="127.0.0.1")
        self.addCleanup(hooks.stopListening)
        hook_url = f"http://127.0.0.1:{hooks.getHost().port}"
        self.secrets: dict[str, str] = {}
        webhooks = []
        for tenant in ("acme", "globex"):
            self.secrets[tenant] = generate_secret()
            env = f"SENDARIX_TEST_HOOK_{tenant.upper()}_{os.getpid()}"
            os.environ[env] = self.secrets[tenant]
            self.addCleanup(os.environ.pop, env, None)
            webhooks.append({"tenant": tenant, "url": f"{hook_url}/{tenant}",
                             "secret_env": env, "name": f"{tenant}-hook"})
        settings = {
            "acme": {"egress_pool": "acme-ips", **tenants.get("acme", {})},
            "globex": {"egress_pool": "globex-ips", **tenants.get("globex", {})},
        }
        self.relay = await start_relay(
            self,
            [dict(RELAY_LISTENER, name="acme", tenant="acme"),
             dict(RELAY_LISTENER, name="globex", tenant="globex")],
            pool={"dest": {"endpoints": [f"{DESTINATION}:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:dest"}],
            egress={"source": [
                *({"name": f"acme{n}", "address": a, "pool": "acme-ips"}
                  for n, a in enumerate(ACME_SOURCES)),
                *({"name": f"globex{n}", "address": a, "pool": "globex-ips"}
                  for n, a in enumerate(GLOBEX_SOURCES)),
            ]},
            tenant=settings,
            webhook=webhooks,
            webhooks={"allow_private": True},
            delivery={"retry_schedule": ["1s"]},
        )
        self.key = await self.relay.add_credential("acme-app", tenant="acme",
                                                   scopes=["send", "read"])
        self.other = await self.relay.add_credential("globex-app", tenant="globex",
                                                     scopes=["send", "read"])
        self.operator = await self.relay.add_credential("ops", tenant="*", scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    def hooked(self, tenant: str) -> list[dict[str, Any]]:
        """The events POSTed to ``tenant``'s webhook so far (signatures checked)."""
        out = []
        for got in self.receiver.received:
            if got.path != f"/{tenant}":
                continue
            Webhook(self.secrets[tenant]).verify(got.body, got.headers)
            out.extend(json.loads(got.body)["data"]["events"])
        return out

    async def metrics(self) -> str:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(self.base + "/metrics", pool=pool)
        return str((await response.content()).decode())

    async def test_suppressions_webhooks_log_and_metrics_are_separate(self) -> None:
        """acme suppresses an address: acme cannot send to it, globex still does (over
        SMTP and the API); each webhook hears only its tenant's events; globex's key
        never sees acme's messages, events, suppressions or figures; /metrics names the
        tenants and nothing else of theirs; each tenant's mail left from its own
        sources."""
        await self.start()
        shared = "shared@dest.test"
        status, _, _ = await self.call("POST", "/v1/suppressions",
                                       {"address": shared, "reason": "asked to stop"})
        self.assertEqual(status, 201)
        self.assertError(await self.call("POST", "/v1/messages", self.message(to=shared)),
                         422, "all_recipients_suppressed")
        refused = await in_thread(_send_smtp, self.relay.ports["acme"], "a@acme.test", [shared])
        self.assertEqual(refused[0][shared][0], 550)
        status, acme_sent, _ = await self.call(
            "POST", "/v1/messages", self.message(to="only-acme@dest.test"))
        self.assertEqual(status, 202, acme_sent)
        replies = await in_thread(_send_smtp, self.relay.ports["globex"], "g@globex.test",
                                  [shared])
        self.assertEqual(replies, [250])
        status, globex_sent, _ = await self.call(
            "POST", "/v1/messages", self.message(to=shared), key=self.other)
        self.assertEqual(status, 202, globex_sent)
        await self.sink.wait_for(3, timeout=20)
        by_peer = {(m.peer, r) for m in self.sink.messages for r in m.recipients}
        self.assertEqual({r for _, r in by_peer}, {"only-acme@dest.test", shared})
        for peer, recipient in by_peer:
            self.assertIn(peer, ACME_SOURCES if recipient.startswith("only-acme")
                          else GLOBEX_SOURCES)
        await wait_event(self.relay, "only-acme@dest.test", "delivered")
        await wait_event(self.relay, shared, "delivered")

        # Webhooks: accepted + delivered for acme (1 message), for globex (2 messages).
        await until(lambda: len(self.hooked("acme")) >= 2 and len(self.hooked("globex")) >= 4,
                    15.0, lambda: f"webhook events (got {len(self.receiver.received)} POSTs)")
        self.assertEqual({e["tenant"] for e in self.hooked("acme")}, {"acme"})
        self.assertEqual({e["tenant"] for e in self.hooked("globex")}, {"globex"})
        self.assertNotIn("only-acme@dest.test",
                         {e["recipient"] for e in self.hooked("globex")})
        # acme hears of its own refused attempt to the address, nothing of globex's mail.
        self.assertNotIn((shared, "delivered"),
                         {(e["recipient"], e["type"]) for e in self.hooked("acme")})
        one = next(r for r in self.receiver.received if r.path == "/acme")
        with self.assertRaises(WebhookVerificationError):
            Webhook(self.secrets["globex"]).verify(one.body, one.headers)

        # The log, the messages, the suppressions and the figures, with globex's key.
        status, page, _ = await self.call("GET", "/v1/events?limit=100", key=self.other)
        self.assertEqual(status, 200, page)
        self.assertTrue(page["events"])
        self.assertEqual({e["tenant"] for e in page["events"]}, {"globex"})
        status, page, _ = await self.call(
            "GET", "/v1/events?recipient=only-acme@dest.test", key=self.other)
        self.assertEqual((status, page["events"]), (200, []))
        status, page, _ = await self.call(
            "GET", f"/v1/events?queue_id={acme_sent['id']}", key=self.other)
        self.assertEqual((status, page["events"]), (200, []))
        self.assertError(await self.call("GET", f"/v1/messages/{acme_sent['id']}",
                                         key=self.other), 404, "not_found")
        status, own, _ = await self.call("GET", f"/v1/messages/{acme_sent['id']}")
        self.assertEqual((status, own["tenant"]), (200, "acme"))
        status, listed, _ = await self.call("GET", "/v1/suppressions", key=self.other)
        self.assertEqual((status, listed.get("suppressions")), (200, []), listed)

        async def figures(key: str) -> dict[str, Any]:
            status, body, _ = await self.call("GET", "/v1/stats?granularity=day", key=key)
            self.assertEqual(status, 200, body)
            return body  # type: ignore[no-any-return]

        async def counted() -> bool:
            buckets = (await figures(self.other))["buckets"]
            return bool(buckets) and buckets[-1]["counts"].get("delivered") == 2

        await until(lambda: _deferred(counted()), 10.0, "globex's two deliveries counted")
        for bucket in (await figures(self.other))["buckets"]:
            self.assertLessEqual(set(bucket["by_tenant"]), {"globex"})
        acme_figures = (await figures(self.key))["buckets"][-1]
        self.assertEqual(set(acme_figures["by_tenant"]), {"acme"})
        self.assertEqual(acme_figures["counts"]["delivered"], 1)

        # /metrics: a tenant appears by its name only.
        text = await self.metrics()
        tenants = set(re.findall(r'tenant="([^"]*)"', text))
        self.assertIn("acme", tenants)
        self.assertLessEqual(tenants, {"acme", "globex", "default", "other"})
        for private in ("only-acme@dest.test", shared, "acme.test", "globex.test",
                        "acme-app", "globex-app", acme_sent["id"], SENDER_DOMAIN):
            self.assertNotIn(private, text)

    async def test_rates_and_quotas_are_separate(self) -> None:
        """acme at its rate (2 a minute) gets 429 rate_limited and 450 4.7.1 while
        globex sends on; globex at its daily quota (3) gets 429 quota_exceeded and
        450 4.7.1; neither limit touches the other tenant."""
        await self.start(acme={"rate": "2/min"}, globex={"quota": 3})
        for _ in range(2):
            status, body, _ = await self.call("POST", "/v1/messages", self.message())
            self.assertEqual(status, 202, body)
        self.assertError(await self.call("POST", "/v1/messages", self.message()),
                         429, "rate_limited")
        refused = await in_thread(_send_smtp, self.relay.ports["acme"], "a@acme.test",
                                  ["user@dest.test"])
        self.assertEqual(refused, [(450, b"4.7.1 " + policy.TENANT_RATE.text.encode())])

        replies = await in_thread(_send_smtp, self.relay.ports["globex"], "g@globex.test",
                                  ["user@dest.test"], 2)
        self.assertEqual(replies, [250, 250])
        status, body, _ = await self.call("POST", "/v1/messages", self.message(),
                                          key=self.other)
        self.assertEqual(status, 202, body)
        self.assertError(await self.call("POST", "/v1/messages", self.message(),
                                         key=self.other), 429, "quota_exceeded")
        refused = await in_thread(_send_smtp, self.relay.ports["globex"], "g@globex.test",
                                  ["user@dest.test"])
        self.assertEqual(refused, [(450, b"4.7.1 " + policy.TENANT_QUOTA.text.encode())])
        # Still over its rate, not its quota: acme's refusal names the rate.
        self.assertError(await self.call("POST", "/v1/messages", self.message()),
                         429, "rate_limited")
        await self.sink.wait_for(5, timeout=20)

    async def test_guard_holds_one_tenant_and_resume_releases_it(self) -> None:
        """acme over its complaint limit: its mail is deferred with the reason (an event,
        at its webhook too, and sendarix_tenant_held{tenant="acme"} 1), never lost;
        globex's mail flows; after ``sendarix tenants resume acme`` the held message
        is delivered from acme's source and the metric is 0."""
        await self.start()
        now = time.time()
        await self.relay.stores.stats.add({
            (hour_of(now), "acme", "delivered", "other"): 1000,
            (hour_of(now), "acme", "complained", "other"): 10,
        })
        await self.relay.service.guard.check_now()
        status, sent, _ = await self.call("POST", "/v1/messages",
                                          self.message(to="held@dest.test"))
        self.assertEqual(status, 202, sent)
        event = await wait_event(self.relay, "held@dest.test", "deferred")
        assert event.response is not None
        self.assertEqual((event.response.code, event.response.enhanced), (451, "4.7.1"))
        self.assertIn("complaint rate 1.00%", event.response.text)
        self.assertIn("held", event.response.text)
        await until(lambda: any(e["type"] == "deferred" for e in self.hooked("acme")),
                    15.0, "acme's webhook told of the deferral")
        told = next(e for e in self.hooked("acme") if e["type"] == "deferred")
        self.assertIn("complaint rate", told["response"]["text"])
        text = await self.metrics()
        self.assertIn('sendarix_tenant_held{tenant="acme"} 1.0', text)
        self.assertIn('sendarix_tenant_held{tenant="globex"} 0.0', text)

        replies = await in_thread(_send_smtp, self.relay.ports["globex"], "g@globex.test",
                                  ["flows@dest.test"])
        self.assertEqual(replies, [250])
        await wait_event(self.relay, "flows@dest.test", "delivered")
        self.assertEqual([m.recipients for m in self.sink.messages], [("flows@dest.test",)])
        status, waiting, _ = await self.call("GET", f"/v1/messages/{sent['id']}")
        self.assertEqual([r["status"] for r in waiting["recipients"]], ["deferred"], waiting)

        out, err, code = await self.relay.run_cli("tenants", "resume", "acme")
        self.assertEqual(code, 0, err)
        await self.relay.service.guard.refresh()
        text = await self.metrics()
        self.assertIn('sendarix_tenant_held{tenant="acme"} 0.0', text)
        await self.relay.stores.spool.retry(sent["id"], time.time())
        self.relay.service.delivery.wake()
        delivered = await wait_event(self.relay, "held@dest.test", "delivered", timeout=15)
        self.assertIn(delivered.source_ip, ACME_SOURCES)
        self.assertEqual(sorted(r for m in self.sink.messages for r in m.recipients),
                         ["flows@dest.test", "held@dest.test"])

    async def _one_source_rejected(self, reply: Reply, outcome: str) -> None:
        """The destination answers ``reply`` to every recipient from 127.0.0.2 only:
        acme's first message from there gets it (``outcome``), marking that source for
        the destination; acme's later mail leaves from its other source, globex's from
        both of its own, all delivered; no source of globex is marked."""
        await self.start()
        self.faults[ACME_SOURCES[0]] = reply
        selector = self.relay.service.delivery.selector
        hit: Event | None = None
        for n in range(30):  # the pool picks a source at random: until it picks .2
            recipient = f"probe{n}@dest.test"
            status, _, _ = await self.call("POST", "/v1/messages", self.message(to=recipient))
            self.assertEqual(status, 202)
            event = await _outcome(self.relay, recipient)
            if event.source_ip == ACME_SOURCES[0]:
                hit = event
                break
            self.assertEqual((event.type, event.source_ip), ("delivered", ACME_SOURCES[1]))
        assert hit is not None, "acme's mail never left from 127.0.0.2"
        self.assertEqual(hit.type, outcome)
        now = reactor.seconds()
        self.assertGreater(selector.penalty("acme0", SITE, now), 0)
        for name in ("acme1", "globex0", "globex1"):
            self.assertEqual(selector.penalty(name, SITE, now), 0, name)

        before = self.sink.stats.messages
        acme = [f"a{n}@dest.test" for n in range(8)]
        globex = [f"g{n}@dest.test" for n in range(8)]
        for recipient in acme:
            status, _, _ = await self.call("POST", "/v1/messages", self.message(to=recipient))
            self.assertEqual(status, 202)
        replies = await in_thread(_send_smtp, self.relay.ports["globex"], "g@globex.test",
                                  globex[:1])
        self.assertEqual(replies, [250])
        for recipient in globex[1:]:
            status, _, _ = await self.call("POST", "/v1/messages", self.message(to=recipient),
                                           key=self.other)
            self.assertEqual(status, 202)
        await self.sink.wait_for(before + 16, timeout=30)
        peers: dict[str, set[str]] = {"acme": set(), "globex": set()}
        for m in list(self.sink.messages)[before:]:
            (recipient,) = m.recipients
            peers["acme" if recipient in acme else "globex"].add(m.peer)
        self.assertEqual(peers["acme"], {ACME_SOURCES[1]})
        self.assertLessEqual(peers["globex"], set(GLOBEX_SOURCES))
        for recipient in globex:
            event = await wait_event(self.relay, recipient, "delivered")
            self.assertIn(event.source_ip, GLOBEX_SOURCES)
        for name in ("globex0", "globex1"):
            self.assertEqual(selector.penalty(name, SITE, reactor.seconds()), 0, name)

    async def test_block_marks_only_the_tenants_source(self) -> None:
        await self._one_source_rejected(
            Reply(550, "5.7.1", "Your IP address has been blocked"), "bounced")

    async def test_rate_limit_marks_only_the_tenants_source(self) -> None:
        await self._one_source_rejected(
            Reply(421, "4.7.0", "Too many messages from your IP, slow down"), "deferred")


SENDER_DOMAIN = "sender.test"


def _deferred(coroutine: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coroutine)


async def _outcome(relay: Any, recipient: str, timeout: float = 15.0) -> Event:
    """The first outcome (delivered, bounced or deferred) of ``recipient``."""
    from twisted.internet.task import deferLater

    from sendarix.model.event import EventQuery

    for _ in range(int(timeout / 0.1)):
        for kind in ("delivered", "bounced", "deferred"):
            page = await relay.stores.eventlog.search(EventQuery(recipient=recipient, type=kind))
            if page.events:
                return page.events[0]
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no outcome for {recipient} within {timeout} s")
