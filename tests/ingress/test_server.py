"""The submission server end to end: real clients (smtplib, raw sockets) over loopback
against a real relay node with a SQLite spool and TLS from a test CA."""

from __future__ import annotations

import base64
import os
import smtplib
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.model.event import EventQuery
from tests.control.cli.test_main import _run, _write_config
from tests.delivery.test_service import wait_event
from tests.support.relay import (
    HOSTNAME,
    RawClient,
    Relay,
    in_thread,
    smtp_starttls,
    start_relay,
    until,
)
from tests.support.streams import peek

SUBMISSION = {"name": "submission", "endpoint": "tcp:0:interface=127.0.0.1",
              "tls": "starttls", "auth": "required"}
IMPLICIT = {"name": "smtps", "endpoint": "tcp:0:interface=127.0.0.1",
            "tls": "implicit", "auth": "required"}
RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "starttls",
         "auth": "optional", "trusted_networks": ["127.0.0.0/8"]}
UNTRUSTED = {"name": "closed", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
             "auth": "none", "trusted_networks": ["10.0.0.0/8"]}

BODY = b"From: App <app@example.com>\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n\xe9t\xe9\r\n"


def plain(user: str, secret: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{secret}".encode())


class SubmissionTests(TestCase):
    """Submission with STARTTLS, implicit TLS, AUTH PLAIN and LOGIN."""

    timeout = 60

    def setUp(self) -> Any:
        async def go() -> None:
            self.relay = await start_relay(
                self, [SUBMISSION, IMPLICIT, RELAY, UNTRUSTED],
                limits={"max_message_size": "1MiB", "max_recipients": 3},
            )
            self.secret = await self.relay.add_credential("app", domains=("example.com",))
        return ensureDeferred(go())

    @property
    def port(self) -> int:
        return self.relay.ports["submission"]

    async def _stored(self, queue_id: str) -> bytes:
        body = await self.relay.stores.spool.body(queue_id)
        assert body is not None
        return bytes(body)

    async def test_starttls_auth_plain(self) -> None:
        """STARTTLS + AUTH PLAIN: 250 with a queue id, the body stored intact after our
        Received header, and an accepted event found by recipient."""
        def send() -> Any:
            s = smtp_starttls(self.port, self.relay.ca_path)
            s.login("app", self.secret)
            s.mail("app@example.com")
            s.rcpt("a@example.org")
            s.rcpt("b@example.net")
            code, msg = s.data(BODY)
            s.quit()
            return code, msg

        code, msg = await in_thread(send)
        self.assertEqual(code, 250)
        self.assertTrue(msg.startswith(b"2.0.0 OK: queued as "), msg)
        qid = msg.split()[-1].decode()
        stored = await self._stored(qid)
        self.assertTrue(stored.startswith(b"Received: from client.test"))
        self.assertIn(b"with ESMTPSA id " + qid.encode(), stored)
        self.assertIn(b"TLSv1.", stored)
        self.assertTrue(stored.endswith(BODY.split(b"\r\n\r\n", 1)[1]))
        self.assertIn(b"\r\nMessage-ID: <", stored)
        self.assertIn(b"\r\nDate: ", stored)
        msg_rec = await self.relay.stores.spool.get(qid)
        self.assertEqual(msg_rec.envelope.recipients, ("a@example.org", "b@example.net"))
        self.assertEqual(msg_rec.meta.tenant, "acme")
        # The event is recorded after the 250 has left, not before it.
        await wait_event(self.relay, "b@example.net", "accepted")
        page = await self.relay.stores.eventlog.search(EventQuery(recipient="b@example.net"))
        self.assertEqual([e.type for e in page.events], ["accepted"])
        self.assertEqual(page.events[0].queue_id, qid)

    async def test_auth_login_and_implicit_tls(self) -> None:
        """AUTH LOGIN on the implicit-TLS listener; STARTTLS is not offered there."""
        import ssl

        def send() -> Any:
            ctx = ssl.create_default_context(cafile=self.relay.ca_path)
            ctx.check_hostname = False  # smtplib checks against the connect address
            s = smtplib.SMTP_SSL("127.0.0.1", self.relay.ports["smtps"], context=ctx,
                                 local_hostname="c.test")
            s.ehlo()
            features = dict(s.esmtp_features)
            s.user, s.password = "app", self.secret
            code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
            r = s.sendmail("app@example.com", ["x@example.org"], BODY)
            s.quit()
            return features, code, r

        features, code, refused = await in_thread(send)
        self.assertNotIn("starttls", features)
        self.assertIn("LOGIN", features["auth"])
        self.assertEqual(code, 235)
        self.assertEqual(refused, {})

    async def test_auth_before_tls_refused(self) -> None:
        """AUTH on a plaintext session: 530 5.7.0, and AUTH is not advertised."""
        def run() -> Any:
            c = RawClient(self.port)
            c.reply()
            c.send(b"EHLO c.test\r\n")
            _, ehlo = c.reply()
            c.send(b"AUTH PLAIN " + plain("app", self.secret) + b"\r\n")
            return ehlo, c.codes(1)

        ehlo, (auth,) = await in_thread(run)
        self.assertTrue(any(line[4:] == b"STARTTLS" for line in ehlo), ehlo)
        self.assertFalse(any(b"AUTH" in line for line in ehlo))
        self.assertEqual(auth, b"530 5.7.0 Must issue a STARTTLS command first")

    async def test_relay_refusals(self) -> None:
        """Without AUTH: 530 5.7.0 on an AUTH listener, 554 5.7.1 outside trusted
        networks on auth=none, accepted from trusted networks on auth=optional."""
        def run(port: int) -> list[bytes]:
            c = RawClient(port)
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
            return c.codes(3)

        sub = await in_thread(run, self.port)
        self.assertTrue(sub[1].startswith(b"530 5.7.0 Authentication required"))
        self.assertTrue(sub[2].startswith(b"503 5.5.1"))
        closed = await in_thread(run, self.relay.ports["closed"])
        # auth = "none": the transaction starts, every recipient is refused.
        self.assertEqual(closed[1], b"250 2.1.0 Sender OK")
        self.assertTrue(closed[2].startswith(b"554 5.7.1 Relay access denied"))
        trusted = await in_thread(run, self.relay.ports["relay"])
        self.assertEqual(trusted[1:], [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"])
        page = await self.relay.stores.eventlog.search(EventQuery(type="rejected"))
        self.assertEqual(len(page.events), 2)

    async def test_bad_password_then_lockout(self) -> None:
        """Wrong secrets: 535 5.7.8, then 421 4.7.0 once the address is locked out."""
        def run() -> list[bytes]:
            out = []
            for _ in range(6):
                c = RawClient(self.port)
                c.reply()
                c.send(b"EHLO c.test\r\nSTARTTLS\r\n")
                c.codes(2)
                c.starttls(self.relay.ca_path)
                c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("app", "wrong") + b"\r\n")
                out.append(c.codes(2)[1])
                c.close()
            return out

        replies = await in_thread(run)
        self.assertEqual(replies[0], b"535 5.7.8 Authentication credentials invalid")
        self.assertTrue(replies[4].startswith(b"421 4.7.0"), replies)
        self.assertTrue(replies[5].startswith(b"421 4.7.0"), replies)

    async def test_sender_scope(self) -> None:
        """MAIL FROM outside the credential's domains: 550 5.7.1; a header From outside
        them: 550 5.7.1 after DATA and nothing spooled."""
        def run() -> Any:
            s = smtp_starttls(self.port, self.relay.ca_path)
            s.login("app", self.secret)
            mail = s.mail("app@other.com")
            s.rset()
            s.mail("app@example.com")
            s.rcpt("x@example.org")
            data = s.data(b"From: evil@other.com\r\n\r\nhi\r\n")
            s.quit()
            return mail, data

        mail, data = await in_thread(run)
        self.assertEqual(mail[0], 550)
        self.assertTrue(mail[1].startswith(b"5.7.1"))
        self.assertEqual(data[0], 550)
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 0)

    async def test_revoked_credential(self) -> None:
        """A credential revoked mid-session stops working at the next MAIL."""
        def login() -> smtplib.SMTP:
            s = smtp_starttls(self.port, self.relay.ca_path)
            s.login("app", self.secret)
            return s

        s = await in_thread(login)
        await self.relay.stores.credentials.revoke("app")
        code, msg = await in_thread(s.mail, "app@example.com")
        await in_thread(s.close)
        self.assertEqual((code, msg[:5]), (530, b"5.7.0"))

    async def test_size_limits(self) -> None:
        """SIZE= above the limit: 552 5.3.4 at MAIL; an oversize body: 552 5.3.4 after
        the data, and the same session then sends a message normally."""
        def run() -> Any:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com> SIZE=999999999999\r\n")
            first = c.codes(2)[1]
            c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            c.codes(3)
            c.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100 + b".\r\n")
            big = c.codes(1)[0]
            c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            c.codes(3)
            c.send(b"Subject: small\r\n\r\nok\r\n.\r\nQUIT\r\n")
            return first, big, c.codes(2)

        first, big, last = await in_thread(run)
        self.assertTrue(first.startswith(b"552 5.3.4"), first)
        self.assertTrue(big.startswith(b"552 5.3.4"), big)
        self.assertTrue(last[0].startswith(b"250 2.0.0 OK: queued as"), last)
        self.assertTrue(last[1].startswith(b"221 2.0.0"))

    async def test_suppressed_recipient(self) -> None:
        """RCPT to an address on the tenant's suppression list: 550 5.1.1 recipient
        suppressed and a ``suppressed`` event; replies stay in order around it."""
        await self.relay.stores.suppressions.add(
            "default", "Gone@Example.org", "hard bounce", "manual", 0.0
        )

        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<ok1@example.org>\r\n"
                   b"RCPT TO:<gone@example.org>\r\nRCPT TO:<ok2@example.org>\r\nNOOP\r\n")
            return c.codes(6)

        codes = await in_thread(run)
        self.assertEqual(codes[2:], [b"250 2.1.5 Recipient OK", b"550 5.1.1 recipient suppressed",
                                     b"250 2.1.5 Recipient OK", b"250 2.0.0 OK"])
        page = await self.relay.stores.eventlog.search(EventQuery(recipient="gone@example.org"))
        self.assertEqual([e.type for e in page.events], ["suppressed"])

    async def test_suppressed_by_another_process(self) -> None:
        """A recipient accepted once (and so remembered as not suppressed) and then
        suppressed by ``sendarix suppressions add``, another process: the next RCPT,
        in the same session, is refused."""
        client = RawClient(self.relay.ports["relay"])
        self.addCleanup(client.sock.close)

        def first() -> list[bytes]:
            client.reply()
            client.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\n"
                        b"RCPT TO:<ci@example.org>\r\nRCPT TO:<CI@example.org>\r\n")
            return client.codes(4)

        self.assertEqual((await in_thread(first))[2:], [b"250 2.1.5 Recipient OK"] * 2)
        config = _write_config(
            self.relay.directory, name="cli.toml",
            text=f'[spool]\nurl = "sqlite:{self.relay.directory}/var/spool.db"\n')
        out, err, code = await _run(
            ["suppressions", "add", "ci@example.org", "--tenant", "default",
             "--config", config], self.relay.directory,
        )  # fmt: skip
        self.assertEqual(code, 0, err)

        def second() -> list[bytes]:
            client.send(b"RCPT TO:<ci@example.org>\r\n")
            return client.codes(1)

        self.assertEqual(await in_thread(second), [b"550 5.1.1 recipient suppressed"])

    async def test_too_many_recipients(self) -> None:
        """The recipient after max_recipients gets 452 4.5.3."""
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            rcpts = b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(4))
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\n" + rcpts)
            return c.codes(6)

        codes = await in_thread(run)
        self.assertEqual(codes[5], b"452 4.5.3 Too many recipients")

    async def test_pipelining_keeps_order(self) -> None:
        """A whole authenticated transaction in one write (implicit TLS): every reply in
        command order, the 250 for the message before the 221."""
        body = b"From: app@example.com\r\nSubject: p\r\n\r\npipelined\r\n"

        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["smtps"], tls_ca=self.relay.ca_path)
            c.reply()
            c.send(
                b"EHLO c.test\r\nAUTH PLAIN " + plain("app", self.secret) + b"\r\n"
                b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.org>\r\n"
                b"RCPT TO:<b@example.org>\r\nDATA\r\n" + body + b".\r\n"
                b"MAIL FROM:<app@example.com>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
                + body + b".\r\nQUIT\r\n"
            )
            out = [c.reply()[1][-1] for _ in range(11)]
            return out

        codes = await in_thread(run)
        self.assertEqual(
            [line[:3] for line in codes],
            [b"250", b"235", b"250", b"250", b"250", b"354", b"250", b"250", b"250",
             b"354", b"250"][: len(codes)],
        )

    async def test_starttls_discards_injected_commands(self) -> None:
        """Commands sent in the same packet as STARTTLS are discarded, and the session
        state is reset: MAIL after the handshake needs a new EHLO."""
        def run() -> Any:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\n")
            c.reply()
            c.send(b"STARTTLS\r\nMAIL FROM:<inject@example.com>\r\n")
            started = c.codes(1)[0]
            c.starttls(self.relay.ca_path)
            c.send(b"MAIL FROM:<a@example.com>\r\n")
            after = c.codes(1)[0]
            c.send(b"EHLO c.test\r\n")
            _, ehlo = c.reply()
            return started, after, ehlo

        started, after, ehlo = await in_thread(run)
        self.assertEqual(started, b"220 2.0.0 Ready to start TLS")
        self.assertTrue(after.startswith(b"503 5.5.1"), after)
        self.assertFalse(any(line[4:] == b"STARTTLS" for line in ehlo), ehlo)

    async def test_bdat_chunks(self) -> None:
        """BDAT in three chunks (binary-safe, no dot-stuffing) is queued intact."""
        parts = [b"Subject: chunks\r\n\r\n", b".not stuffed\r\n", b"end\r\n"]

        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
            c.codes(3)
            c.send(b"BDAT %d\r\n%s" % (len(parts[0]), parts[0]))
            c.send(b"BDAT %d\r\n%s" % (len(parts[1]), parts[1]))
            c.send(b"BDAT %d LAST\r\n%s" % (len(parts[2]), parts[2]))
            return c.codes(3)

        codes = await in_thread(run)
        self.assertTrue(codes[0].startswith(b"250 2.0.0"))
        self.assertTrue(codes[2].startswith(b"250 2.0.0 OK: queued as"), codes)
        stored = await self._stored(codes[2].split()[-1].decode())
        self.assertTrue(stored.endswith(b"".join(parts[1:])))

    async def test_smuggling_stays_in_one_message(self) -> None:
        """Bare-LF "end of data" sequences do not end the message: the text after them,
        SMTP commands included, is part of one queued message."""
        smuggled = (b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@x.org>\r\n"
                    b"RCPT TO:<victim@example.org>\r\nDATA\r\n\r\n.\n\r\n")

        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                   b"DATA\r\n" + smuggled + b".\r\nQUIT\r\n")
            return c.codes(6)

        codes = await in_thread(run)
        self.assertTrue(codes[4].startswith(b"250 2.0.0 OK: queued as"), codes)
        self.assertTrue(codes[5].startswith(b"221"))
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 1)
        stored = await self._stored(codes[4].split()[-1].decode())
        self.assertIn(b"MAIL FROM:<evil@x.org>", stored)
        self.assertNotIn(b"\n.\n", stored)

    async def test_long_lines(self) -> None:
        """A 2 MB command line without CRLF gets 500 5.5.2 and the session goes on; an
        over-long body line refuses the message without leaving DATA early."""
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"X" * 2_000_000)
            c.send(b"\r\nNOOP\r\n")
            first = c.codes(2)
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                   b"DATA\r\n")
            c.codes(4)
            c.send(b"Subject: l\r\n\r\n" + b"y" * 5000 + b"\r\nRSET\r\nQUIT\r\n.\r\nNOOP\r\n")
            return first + c.codes(2)

        codes = await in_thread(run)
        self.assertEqual(codes[0], b"500 5.5.2 Line too long")
        self.assertEqual(codes[1], b"250 2.0.0 OK")
        self.assertTrue(codes[2].startswith(b"554 5.6.0"), codes)
        self.assertEqual(codes[3], b"250 2.0.0 OK")

    async def test_long_line_answered_before_its_end(self) -> None:
        """A command, AUTH continuation or BDAT line that passes its limit without a
        line end gets 500 5.5.2 at once (not at the command timeout); the session
        goes on after the line ends, and nothing is queued."""
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO " + b"A" * 100_000)
            first = c.codes(1)  # no CR LF sent: the reply must come anyway
            c.send(b"A" * 100_000 + b"\r\nNOOP\r\n")
            first += c.codes(1)
            c.send(b"BDAT " + b"9" * 20_000)
            first += c.codes(1)
            c.send(b"\r\nAUTH PLAIN\r\n")
            first += c.codes(1)
            c.send(b"Q" * 40_000)
            first += c.codes(1)
            c.send(b"\r\nNOOP\r\n")
            return first + c.codes(1)

        codes = await in_thread(run)
        self.assertEqual(codes[0], b"500 5.5.2 Line too long")
        self.assertEqual(codes[1], b"250 2.0.0 OK")
        self.assertEqual(codes[2], b"500 5.5.2 Line too long")
        self.assertTrue(codes[3].startswith((b"334", b"530", b"503")), codes)
        self.assertEqual(codes[-1], b"250 2.0.0 OK")
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 0)

    async def test_garbage_and_misc_commands(self) -> None:
        """NULs and unknown verbs: 500 5.5.2; NOOP, RSET, VRFY (252), HELP answered."""
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"\x00\xff\xfe garbage\r\nFOO bar\r\nNOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n")
            return c.codes(6)

        codes = await in_thread(run)
        self.assertTrue(codes[0].startswith(b"500 5.5.2"))
        self.assertTrue(codes[1].startswith(b"500 5.5.2"))
        self.assertEqual([c[:3] for c in codes[2:]], [b"250", b"250", b"252", b"214"])

    async def test_spool_failure_answers_451(self) -> None:
        """When the spool cannot store the message the client hears 451 4.3.0 after
        DATA, and the session stays usable; a store outage at RCPT also answers 451."""
        def start() -> RawClient:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                   b"DATA\r\n")
            c.codes(4)
            return c

        client = await in_thread(start)
        await self.relay.stores.backend.db.close()

        def finish() -> list[bytes]:
            client.send(b"Subject: x\r\n\r\nx\r\n.\r\nMAIL FROM:<a@example.com>\r\n"
                        b"RCPT TO:<c@example.org>\r\n")
            return client.codes(3)

        codes = await in_thread(finish)
        self.assertTrue(codes[0].startswith(b"451 4.3.0"), codes)
        self.assertEqual(codes[1], b"250 2.1.0 Sender OK")
        self.assertTrue(codes[2].startswith(b"451 4.3.0"), codes)
        self.flushLoggedErrors()

    async def test_large_message(self) -> None:
        """A message close to the limit (1 MiB here) is accepted and stored byte for
        byte after the headers the relay adds."""
        body = b"Subject: big\r\n\r\n" + (b"0123456789" * 99 + b"\r\n") * 1000

        def run() -> tuple[int, bytes]:
            s = smtplib.SMTP("127.0.0.1", self.relay.ports["relay"], local_hostname="c.test")
            s.ehlo()
            s.mail("a@example.com")
            s.rcpt("b@example.org")
            reply = s.data(body)
            s.quit()
            return reply

        code, msg = await in_thread(run)
        self.assertEqual(code, 250, msg)
        stored = await self._stored(msg.split()[-1].decode())
        self.assertTrue(stored.endswith(body[len(b"Subject: big\r\n"):]))


class ConnectionLimitTests(TestCase):
    """Per-IP connection limit and graceful stop."""

    timeout = 30

    async def test_per_ip_limit_and_shutdown(self) -> None:
        """The third connection from one address gets 421 4.7.0; on stop, idle
        sessions get 421 4.3.2."""
        listener = dict(RELAY, max_connections_per_ip=2)
        relay = await start_relay(self, [listener])
        port = relay.ports["relay"]

        def connect() -> Any:
            clients = [RawClient(port) for _ in range(3)]
            return clients, [c.codes(1)[0] for c in clients]

        clients, greetings = await in_thread(connect)
        self.assertTrue(greetings[0].startswith(b"220"))
        self.assertTrue(greetings[2].startswith(b"421 4.7.0"), greetings)
        await relay.stop()
        final = await in_thread(lambda: clients[0].codes(1)[0])
        self.assertTrue(final.startswith(b"421 4.3.2"), final)
        for c in clients:
            c.close()


class BadInputTests(TestCase):
    """Hostile or broken clients get their RFC 5321 reply or a timeout, and nothing
    partial reaches the spool; big messages at the default 50 MiB limit."""

    timeout = 120

    def setUp(self) -> Any:
        async def go() -> None:
            self.relay = await start_relay(
                self, [SUBMISSION, RELAY], limits={"data_timeout": "1s"}
            )
            self.secret = await self.relay.add_credential("app")
        return ensureDeferred(go())

    async def test_ten_thousand_recipients(self) -> None:
        """10,000 pipelined RCPTs: the first 1000 accepted, the rest 452 4.5.3, and the
        session still answers afterwards."""
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            rcpts = b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(10_000))
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\n" + rcpts + b"NOOP\r\n")
            return c.codes(10_003)

        codes = await in_thread(run)
        self.assertEqual(codes[1001], b"250 2.1.5 Recipient OK")
        self.assertEqual(codes[1002], b"452 4.5.3 Too many recipients")
        self.assertEqual(codes[-2], b"452 4.5.3 Too many recipients")
        self.assertEqual(codes[-1], b"250 2.0.0 OK")

    async def test_stall_mid_data(self) -> None:
        """A client that stops sending in the middle of DATA gets 421 4.4.2 after the
        data timeout and the partial message is not spooled."""
        def run() -> Any:
            c = RawClient(self.relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                   b"DATA\r\nSubject: half\r\n\r\nhalf a mess")
            return c.codes(5)[-1], c.closed()

        last, closed = await in_thread(run)
        self.assertTrue(last.startswith(b"421 4.4.2"), last)
        self.assertTrue(closed)
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 0)

    async def test_broken_auth_input(self) -> None:
        """Broken base64, a bad PLAIN structure, an unknown mechanism and "*": each gets
        its 5xx reply and the session goes on."""
        def run() -> list[bytes]:
            c = RawClient(self.relay.ports["submission"])
            c.reply()
            c.send(b"EHLO c.test\r\nSTARTTLS\r\n")
            c.codes(2)
            c.starttls(self.relay.ca_path)
            c.send(b"EHLO c.test\r\n")
            c.reply()
            c.send(b"AUTH PLAIN !!!notbase64!!!\r\n"
                   b"AUTH PLAIN " + base64.b64encode(b"no-nuls-here") + b"\r\n"
                   b"AUTH CRAM-MD5\r\nAUTH LOGIN\r\n*\r\nNOOP\r\n")
            return c.codes(6)

        codes = await in_thread(run)
        self.assertTrue(codes[0].startswith(b"501 5.5.2"), codes)
        self.assertTrue(codes[1].startswith(b"501 5.5.2"), codes)
        self.assertTrue(codes[2].startswith(b"504 5.5.4"), codes)
        self.assertTrue(codes[3].startswith(b"334 "), codes)
        self.assertTrue(codes[4].startswith(b"501 5.0.0"), codes)
        self.assertEqual(codes[5], b"250 2.0.0 OK")

    async def test_fifty_mib_message(self) -> None:
        """A message just under the default 50 MiB limit is accepted and stored whole;
        one just over it gets 552 5.3.4."""
        line = b"x" * 998 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (52428800 // 1000 - 1)

        def run() -> Any:
            s = smtplib.SMTP("127.0.0.1", self.relay.ports["relay"], local_hostname="c.test")
            s.ehlo()
            s.mail("a@example.com")
            s.rcpt("b@example.org")
            ok = s.data(body)
            s.mail("a@example.com")
            s.rcpt("b@example.org")
            too_big = s.data(body + line * 4)
            s.quit()
            return ok, too_big

        ok, too_big = await in_thread(run)
        self.assertEqual(ok[0], 250, ok)
        self.assertEqual(too_big[0], 552, too_big)
        stored = await self.relay.stores.spool.body(ok[1].split()[-1].decode())
        self.assertTrue(bytes(stored).endswith(body.split(b"\r\n\r\n", 1)[1]))

    async def test_twisted_client(self) -> None:
        """Twisted's own ESMTP client submits over STARTTLS with AUTH."""
        from io import BytesIO

        from twisted.internet import reactor
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        from twisted.mail.smtp import ESMTPSenderFactory

        with open(self.relay.ca_path, "rb") as f:
            ca = Certificate.loadPEM(f.read())
        from twisted.internet.defer import Deferred

        done: Deferred[Any] = Deferred()
        factory = ESMTPSenderFactory(
            b"app", self.secret.encode(), "a@example.com", ["t@example.org"],
            BytesIO(b"Subject: from twisted\r\n\r\nhello\r\n"), done,
            contextFactory=optionsForClientTLS(HOSTNAME, trustRoot=ca),
            requireAuthentication=True, requireTransportSecurity=True,
        )
        reactor.connectTCP("127.0.0.1", self.relay.ports["submission"], factory)
        accepted, _ = await done
        self.assertEqual(accepted, 1)
        await wait_event(self.relay, "t@example.org", "accepted")
        page = await self.relay.stores.eventlog.search(EventQuery(recipient="t@example.org"))
        self.assertEqual([e.type for e in page.events], ["accepted"])


class GracefulStopTests(TestCase):
    """Stopping the node lets a transaction in progress finish."""

    timeout = 60

    async def test_transaction_finishes_during_stop(self) -> None:
        """MAIL and RCPT, then the node is asked to stop: DATA is still accepted and
        queued (250), then the session gets 421 4.3.2 and the stores close."""
        relay = await start_relay(self, [RELAY])

        def begin() -> RawClient:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
            c.codes(3)
            return c

        client = await in_thread(begin)
        stopping = relay.stop()

        def finish() -> list[bytes]:
            client.send(b"DATA\r\nSubject: late\r\n\r\nstill here\r\n.\r\n")
            return client.codes(3)

        codes = await in_thread(finish)
        await stopping
        self.assertTrue(codes[0].startswith(b"354"))
        self.assertTrue(codes[1].startswith(b"250 2.0.0 OK: queued as"), codes)
        self.assertTrue(codes[2].startswith(b"421 4.3.2"), codes)
        # Its event was written before the stores closed, though it comes after the 250.
        from twisted.internet import reactor

        from sendarix.stores.backends import open_stores

        stores = open_stores(relay.config, reactor, json_log=False)
        await stores.open()
        try:
            page = await stores.eventlog.search(EventQuery(recipient="b@example.org"))
        finally:
            await stores.close()
        self.assertIn("accepted", [e.type for e in page.events])


class ReplyFirstTests(TestCase):
    """The client has its 250 before the node hands the message to delivery and
    logs its ``accepted`` event: bookkeeping does not delay the answer."""

    timeout = 30

    async def _first_event(self, begin: Any) -> tuple[str, bytes, RawClient]:
        """Start a relay, run ``begin(relay)`` (a blocking client that stops after
        DATA's 354) in a thread, then send the message's end: the first event's
        type, what had reached the client's socket (unread) when it was emitted,
        and the client."""
        import socket

        relay = await start_relay(self, [RELAY])
        intake = relay.service.listeners[0].factory.settings.intake
        sink = intake.events
        emitted: list[tuple[str, bytes]] = []
        watched: list[socket.socket] = []

        class Watching:
            def emit(self, event: Any) -> Any:
                emitted.append((event.type, peek(watched[0])))
                return sink.emit(event)

        intake.events = Watching()
        client = await in_thread(begin, relay)
        # The final dot goes from the reactor's own thread, so no reader races the
        # peek.  It peeks through a second descriptor of the client's socket: under
        # TLS it sees the encrypted bytes, which is enough to know the 250 has left.
        client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
        watch = socket.socket(fileno=os.dup(client.sock.fileno()))
        self.addCleanup(watch.close)
        watch.setblocking(False)
        watched.append(watch)
        await until(lambda: emitted, 10, "the accepted event")
        return emitted[0][0], emitted[0][1], client

    async def test_answer_sent_before_the_event(self) -> None:
        """When the ``accepted`` event is emitted, the 250 is already in the
        client's socket."""

        def begin(relay: Relay) -> RawClient:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\n"
                   b"RCPT TO:<first@example.org>\r\nDATA\r\n")
            c.codes(4)
            return c

        kind, waiting, _ = await self._first_event(begin)
        self.assertEqual(kind, "accepted")
        self.assertTrue(waiting.startswith(b"250 2.0.0 OK: queued as"), waiting)

    async def test_answer_sent_before_the_event_under_starttls(self) -> None:
        """Under STARTTLS the 250 waits in the TLS layer's buffer for the reactor's
        next look at the sockets; the event still comes after it has left."""

        def begin(relay: Relay) -> RawClient:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nSTARTTLS\r\n")
            c.codes(2)
            c.starttls(relay.ca_path)
            c.send(b"EHLO c.test\r\n")
            c.codes(1)
            c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<tls@example.org>\r\nDATA\r\n")
            c.codes(3)
            return c

        kind, waiting, client = await self._first_event(begin)
        self.assertEqual(kind, "accepted")
        self.assertNotEqual(waiting, b"", "the 250 had not left")
        self.assertEqual(client.codes(1)[0][:3], b"250")


class RetentionTests(TestCase):
    """The node trims the delivery log to ``[events] retention``."""

    timeout = 30

    async def test_old_events_trimmed_at_start(self) -> None:
        """An event older than the retention is gone once the node has started; a
        recent one stays."""
        import time

        from sendarix.model.event import Event

        relay = Relay(self.mktemp(), [RELAY], events={"json_log": False, "retention": "1d"})
        # Write the events with the node's own stores before the node starts.
        from twisted.internet import reactor

        from sendarix.stores.backends import open_stores

        stores = open_stores(relay.config, reactor, json_log=False)
        await stores.open()
        await stores.eventlog.emit(Event.make("accepted", time.time() - 3 * 86400,
                                              recipient="old@example.org"))
        await stores.eventlog.emit(Event.make("accepted", time.time(), recipient="new@example.org"))
        await stores.close()
        await relay.start()
        self.addCleanup(relay.stop)
        await relay.service.getServiceNamed("stores").ready()
        for _ in range(50):
            page = await relay.stores.eventlog.search(EventQuery(recipient="old@example.org"))
            if not page.events:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(page.events, ())
        page = await relay.stores.eventlog.search(EventQuery(recipient="new@example.org"))
        self.assertEqual(len(page.events), 1)


class InjectedClockTests(SynchronousTestCase):
    """Session timeouts run on the clock the node was given, not the global reactor."""

    def test_idle_timeout_on_injected_clock(self) -> None:
        """An idle session gets 421 4.4.2 once the injected clock passes
        command_timeout, and not before."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from sendarix.config.settings import LimitsConfig, ListenerConfig
        from sendarix.ingress.authlimit import AuthLimiter
        from sendarix.ingress.ratelimit import RateLimiter
        from sendarix.ingress.server import ListenerSettings, SubmissionFactory

        clock = Clock()
        settings = ListenerSettings(
            listener=ListenerConfig(name="t", endpoint="tcp:0", tls="none", auth="none"),
            limits=LimitsConfig(command_timeout=60.0), hostname="relay.test",
            intake=None, clock=clock, portal=None, credentials=None,  # type: ignore[arg-type]
            auth_limiter=AuthLimiter(), rate_limiter=RateLimiter(), tls_options=None,
        )
        factory = SubmissionFactory(settings)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(transport)
        clock.advance(59)
        self.assertNotIn(b"421", transport.value())
        clock.advance(2)
        self.assertIn(b"421 4.4.2", transport.value())
        self.assertTrue(transport.disconnecting)
