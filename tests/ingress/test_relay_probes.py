"""Open-relay probes, the classic ones, against a running node: from a client outside
the trusted networks every form of a foreign (or disguised) recipient is refused and
nothing is queued; a listener that requires AUTH refuses the transaction at MAIL.

The node trusts ``relay.test`` nowhere: it accepts mail only from authenticated
clients or trusted networks, so what a probe tries to disguise (a local-looking
domain, a percent hack, a source route) must not matter.  Each probe names what it
tries.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from sendarix.model.event import EventQuery
from tests.support.relay import RawClient, in_thread, start_relay

SUBMISSION = {"name": "submission", "endpoint": "tcp:0:interface=127.0.0.1",
              "tls": "implicit", "auth": "required", "trusted_networks": ["127.0.0.1/32"]}
OPEN_PORT = {"name": "inbound", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
             "auth": "none", "trusted_networks": ["127.0.0.1/32"]}

#: (what the probe tries, the RCPT argument).
PROBES: tuple[tuple[str, bytes], ...] = (
    ("plain foreign domain", b"<victim@other.test>"),
    ("percent hack", b"<victim%other.test@relay.test>"),
    ("percent hack via our address literal", b"<victim%other.test@[127.0.0.1]>"),
    ("source route", b"<@relay.test:victim@other.test>"),
    ("source route, two hops", b"<@relay.test,@hop.test:victim@other.test>"),
    ("bang path", b"<other.test!victim@relay.test>"),
    ("bang path without domain", b"<other.test!victim>"),
    ("quoted local part with @", b'<"victim@other.test"@relay.test>'),
    ("quoted local part with %", b'<"victim%other.test"@relay.test>'),
    ("two @", b"<victim@other.test@relay.test>"),
    ("IP literal", b"<victim@[127.0.0.1]>"),
    ("IPv6 literal", b"<victim@[IPv6:::1]>"),
    ("trailing dot", b"<victim@relay.test.>"),
    ("uppercase", b"<VICTIM@RELAY.TEST>"),
    ("punycode form", b"<victim@xn--rlay-fsa.test>"),
    ("no brackets", b"victim@other.test"),
    ("local part only", b"<victim>"),
    ("postmaster without domain", b"<postmaster>"),
)


class RelayProbeTests(TestCase):
    timeout = 120

    def setUp(self) -> Any:
        async def go() -> None:
            self.relay = await start_relay(self, [SUBMISSION, OPEN_PORT])

        return ensureDeferred(go())

    def client(self, port: int) -> RawClient:
        """A client from 127.0.0.5 (outside the trusted networks); TLS on submission."""
        tls = self.relay.ca_path if port == self.relay.ports["submission"] else None
        return RawClient(port, tls_ca=tls, source="127.0.0.5")

    def probe_rcpt(self, port: int, rcpt: bytes) -> list[bytes]:
        """EHLO, MAIL, RCPT with ``rcpt``, DATA."""
        c = self.client(port)
        try:
            c.reply()
            c.send(b"EHLO probe.test\r\nMAIL FROM:<probe@probe.test>\r\nRCPT TO:" + rcpt
                   + b"\r\nDATA\r\n")
            return c.codes(4)
        finally:
            c.close()

    async def test_untrusted_client_cannot_relay(self) -> None:
        """Every probe on the auth = "none" listener gets 554 5.7.1 (or a syntax
        refusal) at RCPT, and DATA finds no valid recipient."""
        port = self.relay.ports["inbound"]
        for what, rcpt in PROBES:
            codes = await in_thread(self.probe_rcpt, port, rcpt)
            self.assertEqual(codes[1], b"250 2.1.0 Sender OK", (what, codes))
            self.assertIn(codes[2][:3], (b"554", b"501", b"553"), (what, codes))
            self.assertFalse(codes[3].startswith(b"354"), (what, codes))
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 0)
        page = await self.relay.stores.eventlog.search(EventQuery(type="accepted"))
        self.assertEqual(page.events, ())

    async def test_auth_listener_refuses_at_mail(self) -> None:
        """Without AUTH, the submission listener refuses MAIL (530) whatever RCPT says."""
        port = self.relay.ports["submission"]
        for what, rcpt in PROBES[:6]:
            codes = await in_thread(self.probe_rcpt, port, rcpt)
            self.assertTrue(codes[1].startswith(b"530 5.7.0"), (what, codes))
            self.assertTrue(codes[2].startswith(b"503"), (what, codes))
        self.assertEqual((await self.relay.stores.spool.stats()).messages, 0)

    async def test_other_tenant_credential_is_scoped(self) -> None:
        """With another tenant's credential limited to its own sender domain, a probe
        that claims our sender domain is refused at MAIL (550 5.7.1)."""
        import base64

        await self.relay.add_credential("rival", tenant="globex", domains=("globex.test",))
        secret = await self.relay.stores.credentials.rotate("rival")
        token = base64.b64encode(b"\0rival\0" + secret.encode())

        def run() -> list[bytes]:
            c = self.client(self.relay.ports["submission"])
            try:
                c.reply()
                c.send(b"EHLO probe.test\r\n")
                c.codes(1)
                c.send(b"AUTH PLAIN " + token + b"\r\nMAIL FROM:<ceo@relay.test>\r\n"
                       b"MAIL FROM:<ceo%relay.test@globex.test.evil>\r\n")
                return c.codes(3)
            finally:
                c.close()

        codes = await in_thread(run)
        self.assertTrue(codes[0].startswith(b"235"), codes)
        self.assertTrue(codes[1].startswith(b"550 5.7.1"), codes)
        self.assertTrue(codes[2].startswith(b"550 5.7.1"), codes)
        self.assertEqual((await self.relay.stores.spool.stats()).messages, 0)
