"""The HTTP API end to end: a running node, real HTTP over loopback (treq), a sink
as the destination.  Each case checks the status and the error code it promises."""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from sendarix.model.credential import api_key_name
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import RELAY_LISTENER, wait_event
from tests.support.relay import Relay, in_thread, start_relay

SENDER = "app@sender.test"


class ApiTestCase(unittest.TestCase):
    """A node whose mail for ``sink.test`` (and anything else) goes to a sink on
    127.0.0.3, with API keys for tenants ``acme`` and ``globex`` and an operator."""

    relay: Relay
    sink_faults: tuple[str, ...] = ()

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = await start_sink(self, "127.0.0.3", 0, *self.sink_faults)
        port = self.sink.addresses[0][1]
        self.relay = await start_relay(
            self, [RELAY_LISTENER],
            pool={"sink": {"endpoints": [f"127.0.0.3:{port}"]}},
            route=[{"via": "pool:sink"}],
            delivery={"retry_schedule": ["1s"]},
            limits={"max_message_size": "1MiB"},
        )
        self.key = await self.relay.add_credential(
            "app", tenant="acme", scopes=["send", "read"]
        )
        self.other = await self.relay.add_credential(
            "rival", tenant="globex", scopes=["send", "read"]
        )
        self.reader = await self.relay.add_credential("reader", tenant="acme", scopes=["read"])
        self.operator = await self.relay.add_credential("ops", tenant="*", scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = None,
        headers: dict[str, str] | None = None, raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any, Any]:
        """(status, parsed JSON body, response headers)."""
        sent = {"Content-Type": content_type, **(headers or {})}
        if key is not False:
            sent["Authorization"] = f"Bearer {key or self.key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        # A fresh connection per request: nothing stays open after the test.
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.request(
            method, self.base + path, data=data, headers=sent, pool=pool
        )
        content = await response.content()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = content
        return response.code, parsed, response.headers

    def message(self, **fields: Any) -> dict[str, Any]:
        out = {"from": f"App <{SENDER}>", "to": ["user@sink.test"], "subject": "Hello",
               "text": "Hi there"}
        out.update(fields)
        return out

    def assertMatchesDocument(  # noqa: N802
        self, path: str, method: str, status: str, body: Any
    ) -> None:
        """``body`` is valid for that answer in the OpenAPI document."""
        import jsonschema

        from sendarix.control.api.app import load_openapi

        document = load_openapi()
        schema = document["paths"][path][method]["responses"][status]["content"][
            "application/json"]["schema"]
        jsonschema.validate(body, {**schema, "components": document["components"]})

    def assertError(self, result: tuple[int, Any, Any], status: int, code: str) -> str:  # noqa: N802
        got, body, _ = result
        self.assertEqual((got, body["error"]["code"]), (status, code), body)
        return str(body["error"]["message"])


class SendTests(ApiTestCase):
    async def test_send_delivers_and_status_follows(self) -> None:
        """202 after the spool commit; the sink gets the message; GET shows it delivered
        with its events."""
        status, body, _ = await self.call("POST", "/v1/messages", self.message(
            to=["Zoë <user@sink.test>"], cc="copy@sink.test", bcc=["hidden@sink.test"],
            subject="Grüße ✓", html="<p>Hi</p>", tags=["welcome"],
            attachments=[{"filename": "r.csv", "content_type": "text/csv",
                          "content_b64": base64.b64encode(b"a,b\n1,2\n").decode()}],
        ))
        self.assertEqual(status, 202, body)
        self.assertEqual(
            body["recipients"],
            [{"address": a, "status": "queued"}
             for a in ("user@sink.test", "copy@sink.test", "hidden@sink.test")],
        )
        queue_id = body["id"]
        (received,) = await self.sink.wait_for(1)
        self.assertEqual(received.sender, SENDER)
        self.assertEqual(set(received.recipients),
                         {"user@sink.test", "copy@sink.test", "hidden@sink.test"})
        self.assertIn(f"<{body['message_id']}>".encode(), received.body)
        self.assertNotIn(b"hidden@sink.test", received.body.split(b"\r\n\r\n")[0])
        self.assertIn(b"filename=\"r.csv\"", received.body)
        await wait_event(self.relay, "user@sink.test", "delivered")
        status, found, _ = await self.call("GET", f"/v1/messages/{queue_id}")
        self.assertEqual(status, 200, found)
        self.assertEqual(found["tenant"], "acme")
        self.assertEqual(found["tags"], ["welcome"])
        by_address = {r["address"]: r["status"] for r in found["recipients"]}
        for address in ("user@sink.test", "copy@sink.test", "hidden@sink.test"):
            await wait_event(self.relay, address, "delivered")
        status, found, _ = await self.call("GET", f"/v1/messages/{queue_id}")
        by_address = {r["address"]: r["status"] for r in found["recipients"]}
        self.assertEqual(set(by_address.values()), {"delivered"}, found)
        types = [e["type"] for e in found["events"]]
        self.assertEqual(types[0], "accepted")
        self.assertEqual(types.count("delivered"), 3)

    async def test_raw_message(self) -> None:
        """``raw_b64`` is sent as given (bare LF made CR LF); the envelope comes from
        ``from`` and ``to``."""
        raw = b"From: app@sender.test\nTo: list@sink.test\nSubject: raw\n\nline one\n"
        status, body, _ = await self.call("POST", "/v1/messages", {
            "from": SENDER, "to": "user@sink.test",
            "raw_b64": base64.b64encode(raw).decode(),
        })
        self.assertEqual(status, 202, body)
        (received,) = await self.sink.wait_for(1)
        self.assertEqual(received.recipients, ("user@sink.test",))
        self.assertIn(b"Subject: raw\r\n", received.body)
        self.assertIn(b"\r\n\r\nline one\r\n", received.body)

    async def test_idempotency_key(self) -> None:
        """The same key and body twice: one message at the sink, the same answer; the
        same key with another body: 409."""
        headers = {"Idempotency-Key": "order-42"}
        first = await self.call("POST", "/v1/messages", self.message(), headers=headers)
        second = await self.call("POST", "/v1/messages", self.message(), headers=headers)
        self.assertEqual(first[0], 202)
        self.assertEqual((second[0], second[1]), (first[0], first[1]))
        self.assertEqual(second[2].getRawHeaders("idempotent-replayed"), ["true"])
        self.assertError(
            await self.call("POST", "/v1/messages", self.message(subject="other"),
                            headers=headers),
            409, "idempotency_key_reused",
        )
        # Another tenant's same key is its own.
        third = await self.call("POST", "/v1/messages", self.message(), key=self.other,
                                headers=headers)
        self.assertEqual(third[0], 202)
        self.assertNotEqual(third[1]["id"], first[1]["id"])
        await self.sink.wait_for(2)
        await wait_event(self.relay, "user@sink.test", "delivered")
        self.assertEqual(self.sink.stats.messages, 2)

    async def test_suppressed_recipient(self) -> None:
        """A suppressed recipient is reported and not sent to; all suppressed is 422."""
        status, _, _ = await self.call(
            "POST", "/v1/suppressions", {"address": "gone@sink.test", "reason": "left"}
        )
        self.assertEqual(status, 201)
        status, body, _ = await self.call(
            "POST", "/v1/messages", self.message(to=["gone@sink.test", "user@sink.test"])
        )
        self.assertEqual(status, 202, body)
        self.assertEqual([r["status"] for r in body["recipients"]], ["suppressed", "queued"])
        (received,) = await self.sink.wait_for(1)
        self.assertEqual(received.recipients, ("user@sink.test",))
        self.assertError(
            await self.call("POST", "/v1/messages", self.message(to="Gone@sink.test")),
            422, "all_recipients_suppressed",
        )
        # Globex has its own list: the address is not suppressed for it.
        status, body, _ = await self.call(
            "POST", "/v1/messages", self.message(to="gone@sink.test"), key=self.other
        )
        self.assertEqual(status, 202, body)


    async def test_simulator_recipients(self) -> None:
        """The simulator's ``suppressed`` address is listed as suppressed, as a listed
        address is; its ``success`` one is delivered by the simulator, although a rule
        sends everything else to the pool."""
        domain = "simulator.sendarix.invalid"
        status, body, _ = await self.call(
            "POST", "/v1/messages",
            self.message(to=[f"suppressed@{domain}", f"success@{domain}"]),
        )
        self.assertEqual(status, 202, body)
        self.assertEqual([r["status"] for r in body["recipients"]], ["suppressed", "queued"])
        await wait_event(self.relay, f"suppressed@{domain}", "suppressed")
        delivered = await wait_event(self.relay, f"success@{domain}", "delivered")
        self.assertEqual(delivered.mx, "simulator")
        self.assertEqual(len(self.sink.messages), 0)


class BounceStatusTests(ApiTestCase):
    sink_faults = ("rcpt:550:nobody@*",)

    async def test_status_after_a_550(self) -> None:
        """A 550 from the destination shows as bounced with its reply and category."""
        status, body, _ = await self.call(
            "POST", "/v1/messages", self.message(to=["nobody@sink.test", "user@sink.test"])
        )
        self.assertEqual(status, 202, body)
        await wait_event(self.relay, "nobody@sink.test", "bounced")
        await wait_event(self.relay, "user@sink.test", "delivered")
        status, found, _ = await self.call("GET", f"/v1/messages/{body['id']}")
        recipients = {r["address"]: r for r in found["recipients"]}
        self.assertEqual(recipients["nobody@sink.test"]["status"], "bounced")
        self.assertEqual(recipients["nobody@sink.test"]["last_response"]["code"], 550)
        self.assertIsNotNone(recipients["nobody@sink.test"]["bounce_category"])
        self.assertEqual(recipients["user@sink.test"]["status"], "delivered")


class AccessTests(ApiTestCase):
    async def test_tenant_isolation(self) -> None:
        """Tenant B gets 404 for tenant A's message and none of A's events; the
        operator sees both."""
        status, body, _ = await self.call("POST", "/v1/messages", self.message())
        queue_id = body["id"]
        await wait_event(self.relay, "user@sink.test", "delivered")
        self.assertError(await self.call("GET", f"/v1/messages/{queue_id}", key=self.other),
                         404, "not_found")
        status, page, _ = await self.call("GET", "/v1/events?recipient=user@sink.test",
                                          key=self.other)
        self.assertEqual((status, page["events"]), (200, []))
        self.assertError(await self.call("GET", "/v1/events?tenant=acme", key=self.other),
                         403, "forbidden_tenant")
        status, page, _ = await self.call("GET", "/v1/events?recipient=user@sink.test")
        self.assertEqual({e["tenant"] for e in page["events"]}, {"acme"})
        self.assertIn("delivered", [e["type"] for e in page["events"]])
        status, found, _ = await self.call("GET", f"/v1/messages/{queue_id}", key=self.operator)
        self.assertEqual((status, found["tenant"]), (200, "acme"))

    async def test_keys_and_scopes(self) -> None:
        """No key, a wrong key, an old-style secret: 401; a read-only key cannot send:
        403; a revoked key stops at once."""
        self.assertError(await self.call("GET", "/v1/events", key=False), 401, "unauthorized")
        self.assertError(await self.call("GET", "/v1/events", key=self.key + "x"),
                         401, "unauthorized")
        self.assertError(await self.call("GET", "/v1/events", key="plain-old-secret"),
                         401, "unauthorized")
        self.assertEqual(api_key_name(self.key), "app")
        self.assertError(await self.call("POST", "/v1/messages", self.message(),
                                         key=self.reader), 403, "forbidden_scope")
        self.assertError(await self.call("GET", "/v1/queue"), 403, "forbidden_scope")
        status, _, _ = await self.call("GET", "/v1/queue", key=self.operator)
        self.assertEqual(status, 200)
        await self.relay.stores.credentials.revoke("app")
        self.assertError(await self.call("GET", "/v1/events"), 401, "unauthorized")

    async def test_same_secret_for_smtp_auth(self) -> None:
        """The API key is also the SMTP AUTH password of the credential."""
        self.assertTrue(self.key.startswith("sx1."))
        cred = await self.relay.stores.credentials.get("app")
        from sendarix.stores.credentials import verify_secret

        self.assertTrue(await in_thread(verify_secret, self.key, cred.secret_hash))


class BadRequestTests(ApiTestCase):
    async def test_bad_bodies(self) -> None:
        """Each kind of bad request gets its status and code, and nothing is queued."""
        post = "/v1/messages"
        self.assertError(await self.call("POST", post, raw=b"{not json"), 400, "invalid_json")
        self.assertError(await self.call("POST", post, raw=b"[1, 2]"), 400, "invalid_json")
        self.assertError(await self.call("POST", post, self.message(), content_type="text/plain"),
                         415, "unsupported_media_type")
        message = self.assertError(
            await self.call("POST", post, self.message(htlm="<p>")), 400, "invalid_request"
        )
        self.assertIn("htlm", message)
        message = self.assertError(
            await self.call("POST", post, self.message(to=["ok@sink.test", 7])),
            400, "invalid_request",
        )
        self.assertIn("to", message)
        message = self.assertError(
            await self.call("POST", post, self.message(to=["ok@sink.test", "not an address"])),
            400, "invalid_request",
        )
        self.assertIn("to[1]", message)
        self.assertError(await self.call("POST", post, self.message(subject="a\r\nBcc: x@y.z")),
                         400, "invalid_request")
        self.assertError(await self.call("POST", post, self.message(headers={"From": "x@y.z"})),
                         400, "invalid_request")
        self.assertError(await self.call("POST", post, {"to": "a@sink.test", "text": "x"}),
                         400, "invalid_request")
        self.assertError(await self.call(
            "POST", post, self.message(attachments=[{"filename": "a", "content_b64": "!!"}])
        ), 400, "invalid_request")
        self.assertError(await self.call("POST", post, self.message(text="x" * 1_100_000)),
                         413, "payload_too_large")
        self.assertError(await self.call("GET", "/v1/nothing"), 404, "not_found")
        self.assertError(await self.call("DELETE", "/v1/messages"), 405, "method_not_allowed")
        self.assertError(await self.call("GET", "/v1/events?limit=0"), 400, "invalid_request")
        self.assertError(await self.call("GET", "/v1/events?type=opened"), 400, "invalid_request")
        self.assertError(await self.call("GET", "/v1/events?cursor=zzz"), 400, "invalid_request")
        self.assertError(await self.call("GET", "/v1/events?colour=red"), 400, "invalid_request")
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 0)

    def test_huge_body_refused_before_it_is_read(self) -> None:
        """A 60 MB announced body gets 413 at once, without the body being sent."""

        def exchange() -> bytes:
            with socket.create_connection(("127.0.0.1", self.relay.api_port), timeout=10) as s:
                s.sendall(
                    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Authorization: Bearer " + self.key.encode() + b"\r\n"
                    b"Content-Length: 60000000\r\n\r\n{"
                )
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data

        def check(data: bytes) -> None:
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 413"), data)
            self.assertEqual(json.loads(body)["error"]["code"], "payload_too_large")

        return in_thread(exchange).addCallback(check)  # type: ignore[return-value]

    async def test_concurrent_requests(self) -> None:
        """Twenty sends at once all answer 202 with distinct ids."""
        results = await gatherResults([
            Deferred.fromCoroutine(
                self.call("POST", "/v1/messages", self.message(to=f"u{i}@sink.test"))
            )
            for i in range(20)
        ])
        self.assertEqual({r[0] for r in results}, {202})
        self.assertEqual(len({r[1]["id"] for r in results}), 20)


class OpenAPITests(unittest.TestCase):
    def test_document_is_valid_and_served_paths_exist(self) -> None:
        """docs/openapi.yaml is a valid OpenAPI 3.1 document, and it is the one the
        server serves."""
        import os

        import yaml
        from openapi_spec_validator import validate

        from sendarix.control.api.app import load_openapi
        from tests.support.paths import REPO_ROOT

        with open(os.path.join(REPO_ROOT, "docs", "openapi.yaml"), encoding="utf-8") as f:
            document = yaml.safe_load(f)
        validate(document)
        self.assertEqual(document, load_openapi())
        self.assertEqual(document["openapi"], "3.1.0")



class OperationsTests(ApiTestCase):
    async def test_metrics_health_and_readiness(self) -> None:
        """Without a key: /healthz and /readyz answer 200, /metrics counts the mail
        sent and the API requests made (parsed with prometheus-client's parser)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body, _ = await self.call("POST", "/v1/messages", self.message())
        self.assertEqual(status, 202)
        await wait_event(self.relay, "user@sink.test", "delivered")
        for path in ("/healthz", "/readyz"):
            status, body, _ = await self.call("GET", path, key=False)
            self.assertEqual(status, 200, (path, body))
        status, text, headers = await self.call("GET", "/metrics", key=False)
        self.assertEqual(status, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
        }
        self.assertEqual(
            samples[("sendarix_messages_accepted_total", (("tenant", "other"),))], 1.0
        )
        self.assertEqual(samples[(
            "sendarix_outcomes_total",
            (("outcome", "delivered"), ("provider", "other"), ("tenant", "other")),
        )], 1.0)
        self.assertEqual(
            samples[("sendarix_http_requests_total", (("code", "202"), ("route", "messages")))],
            1.0,
        )
        self.assertNotIn("sink.test", text.decode())

    async def test_not_ready_when_the_stores_fail(self) -> None:
        """/readyz says 503 and why once the stores are closed under it."""
        await self.relay.stores.close()
        status, body, _ = await self.call("GET", "/readyz", key=False)
        self.assertEqual(status, 503, body)
        self.assertIn("stores", body["problems"][0])


def _rfc3339(when: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")


class ScheduleAndBatchTests(ApiTestCase):
    async def test_send_at_holds_then_delivers(self) -> None:
        """A message for two seconds ahead is queued at once, shown with its next
        attempt, not sent before its time, then delivered."""
        import time

        from twisted.internet import task

        start = time.time()
        status, body, _ = await self.call(
            "POST", "/v1/messages", self.message(send_at=_rfc3339(start + 2.5))
        )
        self.assertEqual(status, 202, body)
        self.assertIn("send_at", body)
        status, found, _ = await self.call("GET", f"/v1/messages/{body['id']}")
        (recipient,) = found["recipients"]
        self.assertEqual(recipient["status"], "queued")
        self.assertIsNotNone(recipient["next_attempt"])
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(self.sink.stats.messages, 0)
        await wait_event(self.relay, "user@sink.test", "delivered")
        self.assertGreaterEqual(time.time(), start + 2.4)

    async def test_cancel_before_send_at(self) -> None:
        """A scheduled message cancelled before its time is never sent; its recipients
        show as cancelled, and a second cancel is 404."""
        import time

        status, body, _ = await self.call("POST", "/v1/messages", self.message(
            to=["user@sink.test", "other@sink.test"], send_at=_rfc3339(time.time() + 3600)
        ))
        self.assertEqual(status, 202, body)
        self.assertError(await self.call("POST", f"/v1/messages/{body['id']}/cancel", {},
                                         key=self.other), 404, "not_found")
        status, done, _ = await self.call("POST", f"/v1/messages/{body['id']}/cancel", {})
        self.assertEqual((status, sorted(done["cancelled"])),
                         (200, ["other@sink.test", "user@sink.test"]))
        status, found, _ = await self.call("GET", f"/v1/messages/{body['id']}")
        self.assertEqual({r["status"] for r in found["recipients"]}, {"cancelled"})
        self.assertFalse(found["in_queue"])
        self.assertError(await self.call("POST", f"/v1/messages/{body['id']}/cancel", {}),
                         404, "not_found")
        self.assertEqual(self.sink.stats.messages, 0)

    async def test_send_at_checks(self) -> None:
        import time

        for value, why in ((_rfc3339(time.time() + 80 * 3600), "72 hours"),
                           ("2026-12-24T09:00:00", "offset"), ("soon", "RFC 3339"), (5, "RFC")):
            message = self.assertError(
                await self.call("POST", "/v1/messages", self.message(send_at=value)),
                400, "invalid_request",
            )
            self.assertIn("send_at", message)
            self.assertIn(why, message)

    async def test_batch(self) -> None:
        """Each item gets its own result; a bad item does not stop the others."""
        status, body, _ = await self.call("POST", "/v1/messages/batch", {"messages": [
            self.message(to="a@sink.test"), self.message(to="not-an-address"),
            "nope", self.message(to="b@sink.test"),
        ]})
        self.assertEqual(status, 200, body)
        results = body["results"]
        self.assertEqual([r["status"] for r in results], [202, 400, 400, 202])
        self.assertIn("messages[1].to[0]", results[1]["error"]["message"])
        self.assertIn("messages[2]", results[2]["error"]["message"])
        self.assertMatchesDocument("/v1/messages/batch", "post", "200", body)
        await self.sink.wait_for(2)
        self.assertError(await self.call("POST", "/v1/messages/batch", {"messages": []}),
                         400, "invalid_request")
        self.assertError(
            await self.call("POST", "/v1/messages/batch",
                            {"messages": [self.message()] * 501}),
            400, "invalid_request",
        )


class TemplateTests(ApiTestCase):
    async def test_templates_end_to_end(self) -> None:
        """Save (a new version each time), list, get; a batch send with per-recipient
        variables renders each message; tenants do not see each other's templates."""
        status, saved, _ = await self.call("POST", "/v1/templates", {
            "name": "welcome", "subject": "Welcome, {{ name }}",
            "text": "Hello {{ name }}, your code is {{ code }}.",
            "html": "<p>Hello {{ name }}</p>",
        })
        self.assertEqual((status, saved["version"]), (201, 1), saved)
        status, saved, _ = await self.call("PUT", "/v1/templates/welcome", {
            "subject": "Welcome, {{ name }}!", "text": "Hi {{ name }}, code {{ code }}.",
            "html": "<p>Hi {{ name }}</p>",
        })
        self.assertEqual((status, saved["version"]), (200, 2))
        status, listed, _ = await self.call("GET", "/v1/templates")
        self.assertEqual([(t["name"], t["version"]) for t in listed["templates"]],
                         [("welcome", 2)])
        status, old, _ = await self.call("GET", "/v1/templates/welcome?version=1")
        self.assertEqual(old["subject"], "Welcome, {{ name }}")
        self.assertError(await self.call("GET", "/v1/templates/welcome", key=self.other),
                         404, "not_found")
        status, body, _ = await self.call("POST", "/v1/messages/batch", {"messages": [
            {"from": SENDER, "to": "ann@sink.test", "template": "welcome",
             "variables": {"name": "Ann <admin>", "code": 1}},
            {"from": SENDER, "to": "bob@sink.test", "template": "welcome",
             "template_version": 1, "variables": {"name": "Bob", "code": 2}},
        ]})
        self.assertEqual([r["status"] for r in body["results"]], [202, 202], body)
        received = {m.recipients[0]: m.body for m in await self.sink.wait_for(2)}
        ann, bob = received["ann@sink.test"], received["bob@sink.test"]
        self.assertIn(b"Subject: Welcome, Ann <admin>!", ann)
        self.assertIn(b"Hi Ann <admin>, code 1.", ann)
        self.assertIn(b"<p>Hi Ann &lt;admin&gt;</p>", ann)
        self.assertIn(b"Subject: Welcome, Bob\r\n", bob)

    async def test_template_errors_are_422_before_queueing(self) -> None:
        """A missing variable, a template reaching for Python internals and a syntax
        error are 422 naming the template and line; nothing is queued."""
        await self.call("POST", "/v1/templates", {"name": "t", "text": "a\n{{ who }}"})
        message = self.assertError(await self.call(
            "POST", "/v1/messages", {"from": SENDER, "to": "x@sink.test", "template": "t"}
        ), 422, "template_error")
        self.assertIn("'t'", message)
        self.assertIn("line 2", message)
        self.assertIn("'who'", message)
        await self.call("POST", "/v1/templates", {
            "name": "evil", "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
        self.assertError(await self.call(
            "POST", "/v1/messages", {"from": SENDER, "to": "x@sink.test", "template": "evil"}
        ), 422, "template_error")
        message = self.assertError(await self.call(
            "POST", "/v1/templates", {"name": "broken", "html": "<p>{% if x %}</p>"}
        ), 422, "template_error")
        self.assertIn("html line 1", message)
        self.assertError(await self.call(
            "POST", "/v1/messages", {"from": SENDER, "to": "x@sink.test", "template": "none"}
        ), 422, "template_not_found")
        self.assertError(await self.call("POST", "/v1/messages", {
            "from": SENDER, "to": "x@sink.test", "template": "t", "text": "also"
        }), 400, "invalid_request")
        status, _, _ = await self.call("DELETE", "/v1/templates/t")
        self.assertEqual(status, 200)
        self.assertError(await self.call("DELETE", "/v1/templates/t"), 404, "not_found")
        self.assertEqual((await self.relay.stores.spool.stats()).messages, 0)


class AdminTests(ApiTestCase):
    """Credentials and sending domains over the API, with the node secret set and a
    test DNS server for verification."""

    async def setUp(self) -> None:  # type: ignore[override]
        import os

        from tests.cleanup.test_domains import SECRET
        from tests.support.dnsserver import start_dns

        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        self.zone: dict[str, dict[str, Any]] = {}
        self.dns_port, stop = start_dns(self.zone)
        self.addCleanup(stop)
        self.sink = await start_sink(self, "127.0.0.3")
        self.relay = await start_relay(
            self, [RELAY_LISTENER],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
            dns={"nameservers": [f"127.0.0.1:{self.dns_port}"], "timeout": 2},
        )
        self.key = await self.relay.add_credential("app", tenant="acme", scopes=["send", "read"])
        self.other = await self.relay.add_credential("rival", tenant="globex", scopes=["send"])
        self.admin = await self.relay.add_credential("acme-admin", tenant="acme",
                                                     scopes=["admin"])
        self.operator = await self.relay.add_credential("ops", tenant="*", scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    async def test_credentials(self) -> None:
        """An admin key adds a credential to its own tenant; the printed secret is a
        working key at once; rotate replaces it; revoke ends it; other tenants' stay
        out of sight."""
        self.assertError(await self.call("POST", "/v1/credentials", {"name": "x"}),
                         403, "forbidden_scope")
        status, made, _ = await self.call("POST", "/v1/credentials", {
            "name": "ci-bot", "scopes": ["send", "read"], "rate": "10/min"}, key=self.admin)
        self.assertEqual((status, made["tenant"], made["scopes"]), (201, "acme",
                                                                     ["read", "send"]))
        self.assertNotIn("secret_hash", made)
        status, _, _ = await self.call("GET", "/v1/events", key=made["secret"])
        self.assertEqual(status, 200)
        self.assertError(await self.call("POST", "/v1/credentials", {"name": "ci-bot"},
                                         key=self.admin), 409, "conflict")
        self.assertError(await self.call("POST", "/v1/credentials", {
            "name": "x", "tenant": "globex"}, key=self.admin), 403, "forbidden_tenant")
        self.assertError(await self.call("POST", "/v1/credentials", {"name": "x"},
                                         key=self.operator), 400, "invalid_request")
        status, listed, _ = await self.call("GET", "/v1/credentials", key=self.admin)
        self.assertEqual({c["tenant"] for c in listed["credentials"]}, {"acme"})
        self.assertError(await self.call("POST", "/v1/credentials/rival/rotate", {},
                                         key=self.admin), 404, "not_found")
        status, rotated, _ = await self.call("POST", "/v1/credentials/ci-bot/rotate", {},
                                             key=self.admin)
        self.assertEqual(status, 200)
        self.assertError(await self.call("GET", "/v1/events", key=made["secret"]),
                         401, "unauthorized")
        status, _, _ = await self.call("GET", "/v1/events", key=rotated["secret"])
        self.assertEqual(status, 200)
        status, _, _ = await self.call("DELETE", "/v1/credentials/ci-bot", key=self.admin)
        self.assertEqual(status, 200)
        self.assertError(await self.call("GET", "/v1/events", key=rotated["secret"]),
                         401, "unauthorized")

    async def test_secret_answer_kept_encrypted(self) -> None:
        """A new key made with an Idempotency-Key is answered again on a repeat, but the
        answer kept in the store does not show the secret."""
        headers = {"Idempotency-Key": "make-bot"}
        body = {"name": "bot", "scopes": ["send"]}
        status, made, _ = await self.call("POST", "/v1/credentials", body, key=self.admin,
                                          headers=headers)
        self.assertEqual(status, 201)
        status, again, response = await self.call("POST", "/v1/credentials", body,
                                                  key=self.admin, headers=headers)
        self.assertEqual((status, again), (201, made))
        self.assertEqual(response.getRawHeaders("idempotent-replayed"), ["true"])
        kept = await self.relay.stores.idempotency.claim("acme", "make-bot", "", 0.0)
        assert kept is not None and kept.body is not None
        self.assertNotIn(made["secret"], kept.body)
        self.assertNotIn(made["secret"].split(".")[-1], kept.body)

    async def test_domains(self) -> None:
        """Add a domain with a named selector (used exactly), publish its records in
        DNS, verify; the records are what the CLI prints."""
        status, added, _ = await self.call("POST", "/v1/domains", {
            "domain": "example.com", "selector": "s1"}, key=self.admin)
        self.assertEqual(status, 201, added)
        self.assertEqual([k["selector"] for k in added["keys"]], ["s1", "s1-ed25519"])
        self.assertEqual(added["tenant"], "acme")
        status, result, _ = await self.call("POST", "/v1/domains/example.com/verify", {},
                                            key=self.admin)
        self.assertEqual((status, result["verified"]), (200, False))
        for line in added["records"]:
            name, _, rest = line.removeprefix("record: ").partition(" TXT ")
            value = "".join(part for part in rest.split('"')[1::2])
            self.zone[name] = {"TXT": [value]}
        status, result, _ = await self.call("POST", "/v1/domains/example.com/verify", {},
                                            key=self.admin)
        self.assertEqual((status, result["verified"]), (200, True), result)
        status, listed, _ = await self.call("GET", "/v1/domains")
        self.assertEqual(listed["domains"][0]["state"], "verified")
        status, checked, _ = await self.call("GET", "/v1/domains/example.com/check")
        self.assertEqual(status, 200, checked)
        kinds = {(f["kind"], f["status"]) for f in checked["findings"]}
        self.assertIn(("DKIM", "ok"), kinds)
        self.assertIn(("SPF", "missing"), kinds)  # nothing published for SPF in this zone
        self.assertGreaterEqual(checked["problems"], 1)
        self.assertError(await self.call("POST", "/v1/domains/example.com/verify", {},
                                         key=self.other), 403, "forbidden_scope")
        self.assertError(await self.call("POST", "/v1/domains", {
            "domain": "example.com", "selector": "s1"}, key=self.admin), 409, "conflict")
        reader = await self.relay.add_credential("globex-reader", tenant="globex",
                                                 scopes=["read"])
        status, listed, _ = await self.call("GET", "/v1/domains", key=reader)
        self.assertEqual((status, listed["domains"]), (200, []))


class QueueActionTests(ApiTestCase):
    sink_faults = ("rcpt:451:later@*",)

    async def test_retry_and_delete(self) -> None:
        """A deferred message is retried on request, then deleted; another tenant's
        admin cannot touch it."""
        admin = await self.relay.add_credential("acme-admin", tenant="acme", scopes=["admin"])
        rival = await self.relay.add_credential("globex-admin", tenant="globex",
                                                scopes=["admin"])
        status, body, _ = await self.call(
            "POST", "/v1/messages", self.message(to="later@sink.test")
        )
        queue_id = body["id"]
        await wait_event(self.relay, "later@sink.test", "deferred")
        self.assertError(await self.call("POST", f"/v1/queue/messages/{queue_id}/retry", {},
                                         key=rival), 404, "not_found")
        self.assertError(await self.call("POST", f"/v1/queue/messages/{queue_id}/retry", {}),
                         403, "forbidden_scope")
        status, done, _ = await self.call("POST", f"/v1/queue/messages/{queue_id}/retry", {},
                                          key=admin)
        self.assertEqual((status, done["rescheduled"]), (200, 1))
        status, done, _ = await self.call("DELETE", f"/v1/queue/messages/{queue_id}", key=admin)
        self.assertEqual(status, 200)
        self.assertIsNone(await self.relay.stores.spool.get(queue_id))
        self.assertError(await self.call("DELETE", f"/v1/queue/messages/{queue_id}", key=admin),
                         404, "not_found")


class DestinationTests(ApiTestCase):
    async def test_suspend_and_resume(self) -> None:
        """An operator suspends the pool: mail waits (deferred, not sent); resumed, it
        goes out.  Tenant keys cannot."""
        self.assertError(await self.call("POST", "/v1/queue/destinations/pool:sink/suspend",
                                         {"for": "1h"}), 403, "forbidden_scope")
        status, body, _ = await self.call("POST", "/v1/queue/destinations/pool:sink/suspend",
                                          {"for": "1h"}, key=self.operator)
        self.assertEqual(status, 200, body)
        self.assertError(await self.call("POST", "/v1/queue/destinations/pool:sink/suspend",
                                         {"for": "9d"}, key=self.operator),
                         400, "invalid_request")
        status, sent, _ = await self.call("POST", "/v1/messages", self.message())
        await wait_event(self.relay, "user@sink.test", "deferred")
        self.assertEqual(self.sink.stats.messages, 0)
        status, state, _ = await self.call("GET", "/v1/queue/destinations", key=self.operator)
        self.assertEqual(status, 200)
        status, body, _ = await self.call("POST", "/v1/queue/destinations/pool:sink/resume",
                                          {}, key=self.operator)
        self.assertEqual((status, body["resumed"]), (200, True))
        self.assertError(await self.call("POST", "/v1/queue/destinations/pool:sink/resume",
                                         {}, key=self.operator), 404, "not_found")
        await self.call("POST", f"/v1/queue/messages/{sent['id']}/retry", {}, key=self.operator)
        await self.sink.wait_for(1)


class StatsTests(ApiTestCase):
    async def test_counts_by_hour_and_day(self) -> None:
        """After a delivery and a bounce, /v1/stats counts them per type, provider and
        tenant; another tenant sees none of them."""
        await self.call("POST", "/v1/messages", self.message())
        await wait_event(self.relay, "user@sink.test", "delivered")
        from twisted.internet import task

        await task.deferLater(reactor, 1.5, lambda: None)  # one flush of the counts
        status, body, _ = await self.call("GET", "/v1/stats")
        self.assertEqual(status, 200, body)
        totals: dict[str, int] = {}
        for bucket in body["buckets"]:  # one, or two across an hour's end
            for kind, n in bucket["counts"].items():
                totals[kind] = totals.get(kind, 0) + n
            self.assertEqual(list(bucket["by_tenant"]), ["acme"])
        self.assertEqual((totals["accepted"], totals["delivered"]), (1, 1))
        self.assertMatchesDocument("/v1/stats", "get", "200", body)
        status, day, _ = await self.call("GET", "/v1/stats?granularity=day")
        self.assertEqual(sum(b["counts"].get("delivered", 0) for b in day["buckets"]), 1)
        status, other, _ = await self.call("GET", "/v1/stats", key=self.other)
        self.assertEqual(other["buckets"], [])
        self.assertError(await self.call("GET", "/v1/stats?granularity=week"),
                         400, "invalid_request")
        self.assertError(await self.call("GET", "/v1/stats?since=2020-01-01T00:00:00Z"),
                         400, "invalid_request")


class WebhookApiTests(ApiTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        import os

        from sendarix.events.webhooks.signature import generate_secret

        env = f"SENDARIX_TEST_API_HOOK_{os.getpid()}"
        self.patch(os, "environ", dict(os.environ, **{env: generate_secret()}))
        self.sink = await start_sink(self, "127.0.0.3")
        self.relay = await start_relay(
            self, [RELAY_LISTENER],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
            # Nothing listens on port 9: every POST fails, and one try is all.
            webhook=[{"tenant": "acme", "url": "http://127.0.0.1:9/hook", "name": "acme-hook",
                      "events": ["accepted"], "secret_env": env, "retry_schedule": ["0s"]}],
            webhooks={"allow_private": True},
        )
        self.key = await self.relay.add_credential("app", tenant="acme", scopes=["send", "read"])
        self.other = await self.relay.add_credential("rival", tenant="globex",
                                                     scopes=["send", "read"])
        self.admin = await self.relay.add_credential("acme-admin", tenant="acme",
                                                     scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    async def test_list_and_replay(self) -> None:
        """The tenant sees its endpoint with a dead batch; replay puts it back in
        line; another tenant sees no endpoint and cannot replay it."""
        from tests.support.relay import until

        await self.call("POST", "/v1/messages", self.message())

        async def dead() -> int:
            status, body, _ = await self.call("GET", "/v1/webhooks")
            return int(body["webhooks"][0]["dead"]) if body["webhooks"] else 0

        await until(lambda: Deferred.fromCoroutine(dead()), 15.0,
                    "a dead-lettered webhook batch")
        status, body, _ = await self.call("GET", "/v1/webhooks")
        (hook,) = body["webhooks"]
        self.assertEqual((hook["name"], hook["tenant"]), ("acme-hook", "acme"))
        self.assertNotIn("secret", json.dumps(body))
        status, other, _ = await self.call("GET", "/v1/webhooks", key=self.other)
        self.assertEqual(other["webhooks"], [])
        self.assertError(await self.call("POST", "/v1/webhooks/acme-hook/replay", {},
                                         key=self.key), 403, "forbidden_scope")
        status, replayed, _ = await self.call("POST", "/v1/webhooks/acme-hook/replay", {},
                                              key=self.admin)
        self.assertEqual((status, len(replayed["replayed"])), (200, 1))
        self.assertError(await self.call("POST", "/v1/webhooks/acme-hook/enable", {},
                                         key=self.admin), 409, "conflict")


class HTTPSTests(ApiTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.relay = await start_relay(
            self, [RELAY_LISTENER], api={"endpoint": "tcp:0:interface=127.0.0.1", "tls": True}
        )
        self.key = await self.relay.add_credential("app", tenant="acme", scopes=["read"])

    async def test_api_over_https(self) -> None:
        """With [api] tls, the API answers over TLS with the listeners' certificate
        (checked against the test CA and the host name); plain HTTP gets nothing."""
        import ssl
        import urllib.error
        import urllib.request

        from tests.support.relay import HOSTNAME, client_context

        port = self.relay.api_port

        def fetch() -> tuple[int, bytes]:
            context = client_context(self.relay.ca_path)
            context.check_hostname = False  # the name is checked below, on the peer
            request = urllib.request.Request(
                f"https://127.0.0.1:{port}/v1/events",
                headers={"Authorization": f"Bearer {self.key}"},
            )
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.status, response.read()

        status, body = await in_thread(fetch)
        self.assertEqual(status, 200)
        self.assertIn(b'"events"', body)

        def certificate_names() -> Any:
            context = client_context(self.relay.ca_path)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
                return tls.getpeercert()

        self.assertIsNotNone(await in_thread(certificate_names))

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    return s.recv(100)
                except (ssl.SSLError, OSError):
                    return b""

        self.assertFalse((await in_thread(plain)).startswith(b"HTTP/1.1 200"))
