"""Webhook endpoints managed over the API on a running node: added with
``POST /v1/webhooks`` (the secret returned once signs what a loopback receiver gets,
checked with the ``standardwebhooks`` package), tested, listed per tenant, removed
(nothing more is queued for it), with scopes, tenants and bad input refused."""

from __future__ import annotations

import json
import os
from typing import Any

from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from sendarix.events.webhooks.signature import generate_secret
from tests.control.api.test_api import ApiTestCase
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import RELAY_LISTENER, wait_event
from tests.support.relay import start_relay, until
from tests.support.webhooks import Receiver

reactor: Any = _reactor


class WebhookEndpointApiTests(ApiTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        from tests.cleanup.test_domains import SECRET

        env = f"SENDARIX_TEST_API_HOOK_{os.getpid()}"
        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET,
                                       **{env: generate_secret()}))
        self.receiver = self.start_receiver(lambda r: (200, {}))
        self.failing = self.start_receiver(lambda r: (500, {}))
        self.sink = await start_sink(self, "127.0.0.3")
        self.relay = await start_relay(
            self, [RELAY_LISTENER],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
            webhook=[{"tenant": "acme", "url": "http://127.0.0.1:9/cfg", "name": "cfg-hook",
                      "events": ["bounced"], "secret_env": env}],
            webhooks={"allow_private": True},
        )
        self.key = await self.relay.add_credential("app", tenant="acme", scopes=["send", "read"])
        self.admin = await self.relay.add_credential("acme-admin", tenant="acme",
                                                     scopes=["admin"])
        self.rival = await self.relay.add_credential("globex-admin", tenant="globex",
                                                     scopes=["admin"])
        self.operator = await self.relay.add_credential("ops", tenant="*", scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    def start_receiver(self, answer: Any) -> Receiver:
        receiver = Receiver(reactor, answer)
        port = reactor.listenTCP(0, receiver.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        receiver.url = f"http://127.0.0.1:{port.getHost().port}/hook"
        return receiver

    def events(self) -> list[dict[str, Any]]:
        return [e for r in self.receiver.received
                for e in json.loads(r.body)["data"].get("events", [])]

    async def known_to_node(self, name: str, present: bool = True) -> None:
        """Wait until the node's directory has (or no longer has) ``name``."""
        directory = self.relay.service.webhook_directory
        await until(lambda: (directory.get(name) is not None) == present, 10.0,
                    f"webhook {name} {'added to' if present else 'removed from'} the node")

    async def test_add_send_test_remove(self) -> None:
        status, made, _ = await self.call("POST", "/v1/webhooks", {
            "url": self.receiver.url, "events": ["accepted", "delivered"]}, key=self.admin)
        self.assertEqual(status, 201, made)
        self.assertMatchesDocument("/v1/webhooks", "post", "201", made)
        self.assertEqual((made["tenant"], made["source"], made["events"]),
                         ("acme", "stored", ["accepted", "delivered"]))
        self.assertTrue(made["secret"].startswith("whsec_"))
        name, secret = made["name"], made["secret"]

        # Listed for its tenant, never with the secret; not for another tenant.
        status, listed, _ = await self.call("GET", "/v1/webhooks", key=self.admin)
        self.assertMatchesDocument("/v1/webhooks", "get", "200", listed)
        rows = {r["name"]: r for r in listed["webhooks"]}
        self.assertEqual((rows[name]["source"], rows["cfg-hook"]["source"]), ("stored", "config"))
        self.assertNotIn(secret, json.dumps(listed))
        self.assertNotIn(secret.removeprefix("whsec_"),
                         open(os.path.join(self.relay.directory, "var", "spool.db"), "rb")
                         .read().decode("latin-1"))
        status, theirs, _ = await self.call("GET", "/v1/webhooks", key=self.rival)
        self.assertEqual(theirs["webhooks"], [])

        # The running node picks it up; mail's events reach the receiver, signed.
        await self.known_to_node(name)
        status, sent, _ = await self.call("POST", "/v1/messages", self.message())
        self.assertEqual(status, 202, sent)
        await until(lambda: len(self.events()) >= 2, 15.0,
                    lambda: f"two events at the receiver (got {self.events()})")
        for got in self.receiver.received:
            Webhook(secret).verify(got.body, got.headers)
        self.assertEqual(sorted(e["type"] for e in self.events()), ["accepted", "delivered"])
        self.assertEqual({e["queue_id"] for e in self.events()}, {sent["id"]})

        # A test POST now, signed the same way; the answer is reported.
        before = len(self.receiver.received)
        status, tested, _ = await self.call("POST", f"/v1/webhooks/{name}/test", {},
                                            key=self.admin)
        self.assertEqual((status, tested["ok"], tested["status"]), (200, True, 200), tested)
        self.assertMatchesDocument("/v1/webhooks/{name}/test", "post", "200", tested)
        probe = self.receiver.received[before]
        self.assertEqual(Webhook(secret).verify(probe.body, probe.headers)["type"], "test")
        self.assertEqual(probe.headers["webhook-id"], tested["webhook_id"])

        # Removed: at once nothing more is queued for it, even before the node's
        # directory has caught up.
        count = len(self.receiver.received)
        status, removed, _ = await self.call("DELETE", f"/v1/webhooks/{name}", key=self.admin)
        self.assertEqual((status, removed["removed"]), (200, True), removed)
        self.assertMatchesDocument("/v1/webhooks/{name}", "delete", "200", removed)
        self.assertEqual(set(removed["dropped"]), {"queued", "batches", "dead"})
        status, sent, _ = await self.call("POST", "/v1/messages", self.message())
        await wait_event(self.relay, "user@sink.test", "delivered")
        await self.known_to_node(name, present=False)
        status, sent2, _ = await self.call("POST", "/v1/messages", self.message(
            to=["other@sink.test"]))
        await wait_event(self.relay, "other@sink.test", "delivered")
        await deferLater(reactor, 1.5, lambda: None)  # a batch would have formed by now
        self.assertEqual(len(self.receiver.received), count)
        self.assertEqual(await self.relay.stores.outbox.counts(name),
                         {"queued": 0, "batches": 0, "dead": 0})
        self.assertError(await self.call("DELETE", f"/v1/webhooks/{name}", key=self.admin),
                         404, "not_found")
        status, listed, _ = await self.call("GET", "/v1/webhooks", key=self.admin)
        self.assertNotIn(name, {r["name"] for r in listed["webhooks"]})

    async def test_receiver_failure_is_reported(self) -> None:
        status, made, _ = await self.call("POST", "/v1/webhooks", {
            "tenant": "acme", "url": self.failing.url, "events": "*"}, key=self.operator)
        self.assertEqual(status, 201, made)
        self.assertEqual(len(made["events"]), 9)
        status, tested, _ = await self.call("POST", f"/v1/webhooks/{made['name']}/test", {},
                                            key=self.operator)
        self.assertEqual((status, tested["ok"], tested["status"], tested["error"]),
                         (200, False, 500, "HTTP 500"))
        status, tested, _ = await self.call("POST", "/v1/webhooks/cfg-hook/test", {},
                                            key=self.admin)
        self.assertEqual((status, tested["ok"], tested["status"]), (200, False, None))
        self.assertIn("ConnectionRefused", tested["error"])

    async def test_tenants_and_scopes(self) -> None:
        """Another tenant's admin key gets 404 for the endpoint; send and read keys
        get 403; an operator names the tenant, an admin key only its own."""
        status, made, _ = await self.call("POST", "/v1/webhooks", {
            "url": self.receiver.url, "events": ["delivered"]}, key=self.admin)
        name = made["name"]
        for method, path in (("DELETE", f"/v1/webhooks/{name}"),
                             ("POST", f"/v1/webhooks/{name}/test"),
                             ("POST", f"/v1/webhooks/{name}/replay")):
            self.assertError(await self.call(method, path, {}, key=self.rival), 404, "not_found")
            self.assertError(await self.call(method, path, {}, key=self.key), 403,
                             "forbidden_scope")
        self.assertEqual(len(self.receiver.received), 0)
        self.assertError(await self.call("POST", "/v1/webhooks", {
            "url": self.receiver.url, "events": ["delivered"]}, key=self.key),
            403, "forbidden_scope")
        self.assertError(await self.call("POST", "/v1/webhooks", {
            "tenant": "acme", "url": self.receiver.url, "events": ["delivered"]},
            key=self.rival), 403, "forbidden_tenant")
        message = self.assertError(await self.call("POST", "/v1/webhooks", {
            "url": self.receiver.url, "events": ["delivered"]}, key=self.operator),
            400, "invalid_request")
        self.assertTrue(message.startswith("tenant:"), message)
        for tenant in ("nosuch", "*"):
            message = self.assertError(await self.call("POST", "/v1/webhooks", {
                "tenant": tenant, "url": self.receiver.url, "events": ["delivered"]},
                key=self.operator), 400, "invalid_request")
            self.assertTrue(message.startswith("tenant:"), message)
        # The configuration's endpoint cannot be removed here.
        message = self.assertError(await self.call("DELETE", "/v1/webhooks/cfg-hook",
                                                   key=self.operator), 409, "conflict")
        self.assertIn("[[webhook]]", message)
        status, listed, _ = await self.call("GET", "/v1/webhooks", key=self.operator)
        self.assertEqual({r["name"] for r in listed["webhooks"]}, {name, "cfg-hook"})
        status, removed, _ = await self.call("DELETE", f"/v1/webhooks/{name}",
                                             key=self.operator)
        self.assertEqual(status, 200, removed)

    async def test_bad_input_names_the_field(self) -> None:
        for body, field in (
            ({"url": "ftp://h.example/x", "events": ["delivered"]}, "url"),
            ({"url": "http:///nohost", "events": ["delivered"]}, "url"),
            ({"url": "not a url", "events": ["delivered"]}, "url"),
            ({"events": ["delivered"]}, "url"),
            ({"url": self.receiver.url, "events": ["delivered", "opened"]}, "events"),
            ({"url": self.receiver.url, "events": []}, "events"),
            ({"url": self.receiver.url}, "events"),
            ({"url": self.receiver.url, "events": [3]}, "events"),
            ({"url": self.receiver.url, "events": ["delivered"], "secret": "x"}, "secret"),
            ({"url": self.receiver.url, "events": ["delivered"],
              "retry_schedule": ["5s", "1s"]}, "retry_schedule[1]"),
            ({"url": self.receiver.url, "events": ["delivered"],
              "retry_schedule": ["soon"]}, "retry_schedule[0]"),
        ):
            message = self.assertError(await self.call("POST", "/v1/webhooks", body,
                                                       key=self.admin), 400, "invalid_request")
            self.assertTrue(message.startswith(f"{field}:"), (body, message))
        status, listed, _ = await self.call("GET", "/v1/webhooks", key=self.admin)
        self.assertEqual([r["name"] for r in listed["webhooks"]], ["cfg-hook"])
        status, made, _ = await self.call("POST", "/v1/webhooks", {
            "url": self.receiver.url, "events": ["delivered"],
            "retry_schedule": ["0s", "5s", "1m"]}, key=self.admin)
        self.assertEqual((status, made["retry_schedule"]), (201, [0.0, 5.0, 60.0]), made)


class NoSecretTests(ApiTestCase):
    """Without a node secret nothing can seal a webhook secret: 503, nothing stored."""

    async def test_add_refused(self) -> None:
        admin = await self.relay.add_credential("acme-admin", tenant="acme", scopes=["admin"])
        if os.environ.get("SENDARIX_SECRET_KEY"):
            self.skipTest("SENDARIX_SECRET_KEY is set in this environment")
        self.assertError(await self.call("POST", "/v1/webhooks", {
            "url": "https://hooks.example/x", "events": ["delivered"]}, key=admin),
            503, "no_node_secret")
        self.assertEqual(await self.relay.stores.webhook_endpoints.list(), [])
