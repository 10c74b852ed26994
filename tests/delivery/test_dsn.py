"""Delivery status notifications end to end: NOTIFY=FAILURE and a 550 at the
destination deliver a multipart/report from <> to the sender, naming the failed
recipient with its status and the server's reply; NOTIFY=NEVER sends none; a DSN that
bounces is never answered with another; and the DSN's own pieces (pure)."""

from __future__ import annotations

from email import message_from_bytes, policy
from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.cleanup.dsn import Failure, build_dsn
from sendarix.delivery.notify import wants_failure_notice
from sendarix.ingress.reports import parse_report
from sendarix.model.event import EventQuery
from sendarix.model.message import Envelope
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import wait_event
from tests.support.relay import RawClient, in_thread, start_relay

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.0/8"], "tenant": "acme"}
ORIGINAL = b"From: a@sender.test\r\nSubject: hi\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n"


class PieceTests(SynchronousTestCase):
    def test_who_is_told(self) -> None:
        env = Envelope("a@sender.test", ("x@y", "z@y", "w@y"),
                       notify=(("x@y", "FAILURE,DELAY"), ("z@y", "NEVER")))
        self.assertTrue(wants_failure_notice(env, "x@y", False))
        self.assertFalse(wants_failure_notice(env, "z@y", True))
        self.assertFalse(wants_failure_notice(env, "w@y", False))
        self.assertTrue(wants_failure_notice(env, "w@y", True))
        self.assertFalse(wants_failure_notice(Envelope("", ("x@y",)), "x@y", True))

    def test_dsn_reads_back_as_a_report(self) -> None:
        """What we send, our own report reader (and the email package) reads."""
        data = build_dsn("relay.test", "a@sender.test", "env-1",
                         [Failure("x@y.test", "rfc822;x@y.test", "failed", "5.1.1",
                                  "550 5.1.1 no such user", "mx.y.test")],
                         ORIGINAL, ret_full=False, now=1_800_000_000.0)
        report = parse_report(data)
        assert report is not None
        (r,) = report.recipients
        self.assertEqual((r.address, r.action, r.status), ("x@y.test", "failed", "5.1.1"))
        self.assertEqual(report.message_id, "m1@x")
        self.assertEqual(report.feedback_type, "env-1")  # Original-Envelope-Id
        parsed = message_from_bytes(data, policy=policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertNotIn(b"body\r\n", data)  # RET=HDRS: the header only
        full = build_dsn("relay.test", "a@sender.test", None,
                         [Failure("x@y.test", None, "failed", "5.0.0", "expired")],
                         ORIGINAL, ret_full=True, now=0.0)
        self.assertIn(b"message/rfc822", full)
        self.assertIn(b"body\r\n", full)


class DSNTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = await start_sink(self, "127.0.0.3", 0, "rcpt:550:5.1.1:nobody*@*",
                                     "rcpt:451:4.7.1:slow*@*")
        self.relay = await start_relay(
            self, [RELAY],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
        )

    def send(self, sender: str, rcpts: list[tuple[str, str]], mail_params: str = "") -> bytes:
        c = RawClient(self.relay.ports["relay"])
        try:
            c.reply()
            c.send(b"EHLO c.test\r\n")
            _, lines = c.reply()
            assert any(b"DSN" in line for line in lines), lines
            commands = f"MAIL FROM:<{sender}>{mail_params}\r\n" + "".join(
                f"RCPT TO:<{a}>{p}\r\n" for a, p in rcpts) + "DATA\r\n"
            c.send(commands.encode())
            codes = c.codes(2 + len(rcpts))
            assert codes[-1].startswith(b"354"), codes
            c.send(b"From: " + sender.encode() + b"\r\nSubject: dsn test\r\n\r\nhello\r\n.\r\n")
            return c.codes(1)[0]
        finally:
            c.close()

    async def test_failure_notice(self) -> None:
        reply = await in_thread(self.send, "app@sender.test", [
            ("nobody@sink.test", " NOTIFY=FAILURE ORCPT=rfc822;nobody@sink.test"),
            ("nobody2@sink.test", " NOTIFY=NEVER"),
        ], " RET=HDRS ENVID=order+2D42")
        self.assertTrue(reply.startswith(b"250"), reply)
        await wait_event(self.relay, "nobody@sink.test", "bounced")
        await wait_event(self.relay, "nobody2@sink.test", "bounced")
        (dsn,) = await self.sink.wait_for(1)
        self.assertEqual((dsn.sender, dsn.recipients), ("", ("app@sender.test",)))
        report = parse_report(bytes(dsn.body))
        assert report is not None
        self.assertEqual([r.address for r in report.recipients], ["nobody@sink.test"])
        self.assertEqual(report.recipients[0].status, "5.1.1")
        self.assertIn("550", report.recipients[0].diagnostic or "")
        self.assertEqual(report.feedback_type, "order+2D42")
        self.assertIn(b"Original-Recipient: rfc822;nobody@sink.test", bytes(dsn.body))
        self.assertIn(b"Subject: dsn test", bytes(dsn.body))
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(len(self.sink.messages), 1)  # nothing for nobody2 (NEVER)

    async def test_no_dsn_for_a_dsn(self) -> None:
        """The sender itself fails: its DSN bounces, and that bounce makes no DSN."""
        await in_thread(self.send, "nobody-sender@sink.test",
                        [("nobody@sink.test", " NOTIFY=FAILURE")])
        await wait_event(self.relay, "nobody@sink.test", "bounced")
        await wait_event(self.relay, "nobody-sender@sink.test", "bounced")
        await task.deferLater(reactor, 1.5, lambda: None)
        page = await self.relay.stores.eventlog.search(EventQuery(type="accepted"))
        senders = sorted(e.sender or "" for e in page.events)
        self.assertEqual(senders, ["", "nobody-sender@sink.test"])  # the message, one DSN
        self.assertEqual(len(self.sink.messages), 0)

    async def test_success_and_delay_notices(self) -> None:
        """NOTIFY=SUCCESS: a "delivered" report; NOTIFY=DELAY: one "delayed" report at
        the first deferral."""
        await in_thread(self.send, "app@sender.test", [
            ("user@sink.test", " NOTIFY=SUCCESS"), ("slow@sink.test", " NOTIFY=DELAY,FAILURE"),
        ])
        await wait_event(self.relay, "user@sink.test", "delivered")
        await wait_event(self.relay, "slow@sink.test", "deferred")
        await wait_event(self.relay, "app@sender.test", "delivered")  # the report
        reports = [parse_report(bytes(m.body)) for m in self.sink.messages if m.sender == ""]
        # One attempt at sink.test settled both: one report names both recipients.
        actions = sorted((r.address, r.action) for report in reports if report is not None
                         for r in report.recipients)
        self.assertEqual(actions, [("slow@sink.test", "delayed"),
                                   ("user@sink.test", "delivered")])

    async def test_bad_dsn_parameters(self) -> None:
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            try:
                c.reply()
                c.send(b"EHLO c.test\r\n")
                c.reply()
                c.send(b"MAIL FROM:<a@b.test> RET=ALL\r\nMAIL FROM:<a@b.test> ENVID=a=b\r\n"
                       b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@sink.test> NOTIFY=NEVER,FAILURE\r\n"
                       b"RCPT TO:<x@sink.test> NOTIFY=SOMETIMES\r\n"
                       b"RCPT TO:<x@sink.test> ORCPT=nosemicolon\r\n")
                return c.codes(6)
            finally:
                c.close()

        codes: Any = await in_thread(run)
        self.assertEqual([c[:9] for c in codes],
                         [b"501 5.5.4", b"501 5.5.4", b"250 2.1.0", b"501 5.5.4",
                          b"501 5.5.4", b"501 5.5.4"])
