"""What leaves never holds a bare CR or LF: whatever line endings a client used (bare
LF over SMTP, a raw message over the API), the destination gets CR LF only, so a
lenient receiver has nothing to split a message on (the SMTP smuggling class)."""

from __future__ import annotations

import base64
import json
import re

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import wait_event
from tests.support.relay import RawClient, in_thread, start_relay

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.0/8"], "tenant": "acme"}

_BARE = re.compile(rb"(?<!\r)\n|\r(?!\n)")


class LineEndingTests(TestCase):
    timeout = 60

    async def test_bare_line_ends_never_leave(self) -> None:
        sink = await start_sink(self, "127.0.0.3")
        relay = await start_relay(
            self, [RELAY],
            pool={"sink": {"endpoints": [f"127.0.0.3:{sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
        )
        key = await relay.add_credential("app", tenant="acme", scopes=["send"])

        def smtp() -> bytes:
            c = RawClient(relay.ports["relay"])
            try:
                c.reply()
                c.send(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\n"
                       b"RCPT TO:<lf@sink.test>\r\nDATA\r\n")
                c.codes(4)
                c.send(b"Subject: lf\nX-A: 1\r\n\r\nline one\nline two\r.\rthree\n.\n"
                       b"MAIL FROM:<evil@x>\r\nend\r\n.\r\n")
                return c.codes(1)[0]
            finally:
                c.close()

        reply = await in_thread(smtp)
        self.assertTrue(reply.startswith(b"250"), reply)
        raw = b"Subject: api\nFrom: a@sender.test\n\nbody\rwith\nbare ends\n"
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.post(
            f"http://127.0.0.1:{relay.api_port}/v1/messages",
            json.dumps({"from": "a@sender.test", "to": "api@sink.test",
                        "raw_b64": base64.b64encode(raw).decode()}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            pool=pool,
        )
        self.assertEqual(response.code, 202, await response.text())
        for rcpt in ("lf@sink.test", "api@sink.test"):
            await wait_event(relay, rcpt, "delivered")
        self.assertEqual(len(sink.messages), 2)  # nothing smuggled out as a second one
        for message in sink.messages:
            body = bytes(message.body)
            self.assertIsNone(_BARE.search(body), (message.recipients, body))
