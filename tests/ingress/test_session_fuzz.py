"""Stateful fuzzing of the SMTP session against a running node.

A hypothesis state machine sends any sequence of valid and invalid commands, message
bodies with smuggling sequences, BDAT chunks, pipelined batches and over-long lines,
one connection per example.  After every step: exactly one reply per command, each a
well-formed RFC 5321 reply (three digits, a space or a dash, enhanced status when
the code is not 220/221/354), in order, and the session never drops without a 221 or
421.  At the end, the spool holds exactly the messages answered "queued as".
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support.relay import RawClient, in_thread, start_relay

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.0/8"]}

EXAMPLES = int(os.environ.get("SENDARIX_FUZZ_EXAMPLES", "30"))

_REPLY = re.compile(rb"[2-5][0-9][0-9][ -].*")
_ENHANCED = re.compile(rb"[2-5][0-9][0-9][ -][245]\.[0-9]{1,3}\.[0-9]{1,3}( |$)")

addresses = st.sampled_from([
    b"<a@example.com>", b"<b@example.org>", b"<>", b"<bad", b"<@x:y@z.test>", b"",
    b"<a@[127.0.0.1]>", b"<\"q u\"@example.net>", b"<" + b"x" * 300 + b"@e.test>",
    b"<a@example.com> SIZE=100", b"<a@example.com> BODY=8BITMIME", b"<a@e.test> FOO=bar",
])
body_lines = st.lists(st.sampled_from([
    b"Subject: fuzz", b"", b"hello", b".leading dot", b"..double", b".", b"x\n.\ny",
    b"a\r.\rb", b"c\n.\r\nd", b"e\x00f", b"\xe9t\xe9", b"y" * 1200,
]), max_size=8)
junk = st.sampled_from([
    b"FOO", b"EHLO", b"HELO", b"MAIL", b"RCPT TO", b"DATA extra", b"NOOP", b"VRFY x",
    b"HELP", b"\x00\xff", b"BDAT", b"BDAT x", b"BDAT 5 LAST junk", b"AUTH PLAIN",
    b"STARTTLS", b"E" * 700, b"mail from:<lower@case.test>",
])


class SessionMachine(RuleBasedStateMachine):
    """One SMTP session; ``port`` and ``queued`` are set by the test."""

    port = 0
    queued: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.connect()

    def connect(self) -> None:
        self.client = RawClient(self.port)
        self.open = True
        code, _ = self.client.reply()
        assert code == 220
        self.in_mail = False

    @precondition(lambda self: not self.open)
    @rule()
    def reconnect(self) -> None:
        """A closed session ends; the next one starts afresh."""
        self.client.close()
        self.connect()

    def exchange(self, *commands: bytes, enhanced: bool = True) -> list[bytes]:
        """Send ``commands`` pipelined; one reply (last line) for each, checked (with
        an enhanced status code unless ``enhanced`` is false: greetings have none)."""
        self.client.send(b"".join(c + b"\r\n" for c in commands))
        out = []
        for _ in commands:
            code, lines = self.client.reply()
            for line in lines:
                assert _REPLY.fullmatch(line), lines
            last = lines[-1]
            if enhanced and code not in (220, 221, 354) and len(lines) == 1:
                assert _ENHANCED.match(last), last
            match = re.search(rb"queued as (\S+)", last)
            if code == 250 and match:
                self.queued.append(match.group(1).decode())
            out.append(last)
            if code in (221, 421):
                self.open = False
                break
        return out

    @precondition(lambda self: self.open)
    @rule(name=st.sampled_from([b"EHLO c.test", b"HELO c.test", b"EHLO [127.0.0.1]"]))
    def greet(self, name: bytes) -> None:
        self.exchange(name, enhanced=False)

    @precondition(lambda self: self.open)
    @rule(sender=addresses)
    def mail(self, sender: bytes) -> None:
        (reply,) = self.exchange(b"MAIL FROM:" + sender)
        self.in_mail = self.in_mail or reply.startswith(b"250")

    @precondition(lambda self: self.open)
    @rule(rcpt=addresses)
    def rcpt(self, rcpt: bytes) -> None:
        self.exchange(b"RCPT TO:" + rcpt)

    @precondition(lambda self: self.open)
    @rule(lines=body_lines)
    def data(self, lines: list[bytes]) -> None:
        (reply,) = self.exchange(b"DATA")
        if reply.startswith(b"354"):
            body = b"".join(b"." + x + b"\r\n" if x.startswith(b".") else x + b"\r\n"
                            for x in lines)
            self.client.send(body)
            self.exchange(b".")
            self.in_mail = False

    @precondition(lambda self: self.open)
    @rule(chunks=st.lists(st.binary(max_size=40), min_size=1, max_size=3))
    def bdat(self, chunks: list[bytes]) -> None:
        for i, chunk in enumerate(chunks):
            last = b" LAST" if i == len(chunks) - 1 else b""
            self.client.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
            (reply,) = self.exchange_sent()
            if not self.open or not reply.startswith(b"250"):
                break

    def exchange_sent(self) -> list[bytes]:
        """The reply to a command already sent (BDAT carries its own data)."""
        code, lines = self.client.reply()
        for line in lines:
            assert _REPLY.fullmatch(line), lines
        match = re.search(rb"queued as (\S+)", lines[-1])
        if code == 250 and match:
            self.queued.append(match.group(1).decode())
        if code in (221, 421):
            self.open = False
        return [lines[-1]]

    @precondition(lambda self: self.open)
    @rule(line=junk)
    def junk(self, line: bytes) -> None:
        (reply,) = self.exchange(line, enhanced=not line.upper().startswith((b"EHLO", b"HELO")))
        if line.startswith(b"BDAT") and reply.startswith(b"501"):
            # A BDAT without a readable size cannot be skipped: the server answers
            # and closes, rather than read the chunk's bytes as commands.
            assert self.client.closed()
            self.open = False

    @precondition(lambda self: self.open)
    @rule()
    def rset_noop(self) -> None:
        replies = self.exchange(b"RSET", b"NOOP")
        assert all(r.startswith(b"250") for r in replies), replies
        self.in_mail = False

    @precondition(lambda self: self.open)
    @rule()
    def pipelined_transaction(self) -> None:
        replies = self.exchange(b"EHLO p.test", enhanced=False)
        if not self.open:
            return
        replies = self.exchange(b"MAIL FROM:<p@example.com>", b"RCPT TO:<q@example.org>",
                                b"DATA")
        if self.open and replies[-1].startswith(b"354"):
            self.client.send(b"Subject: p\r\n\r\npipelined\r\n")
            self.exchange(b".")

    @invariant()
    def still_answering(self) -> None:
        if self.open:
            (reply,) = self.exchange(b"NOOP")
            assert reply.startswith((b"250", b"421")), reply

    def teardown(self) -> None:
        if self.open:
            try:
                self.exchange(b"QUIT")
            except ConnectionError:
                pass
        self.client.close()


class SessionFuzzTests(TestCase):
    timeout = 600

    def setUp(self) -> Any:
        async def go() -> None:
            self.relay = await start_relay(self, [RELAY],
                                           limits={"max_message_size": "64KiB"})

        return ensureDeferred(go())

    async def test_any_command_sequence(self) -> None:
        """Replies well-formed and in order, never a crash; every "queued as" is one
        message in the spool, and nothing else is."""
        queued: list[str] = []
        SessionMachine.port = self.relay.ports["relay"]
        SessionMachine.queued = queued
        machine = SessionMachine.TestCase
        machine.settings = settings(
            max_examples=EXAMPLES, stateful_step_count=12, deadline=None, database=None,
            derandomize=True, suppress_health_check=list(HealthCheck),
        )
        await in_thread(lambda: machine("runTest").runTest())
        self.assertEqual(len(queued), len(set(queued)), "a queue id answered twice")
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, len(queued))
        for queue_id in queued:
            self.assertIsNotNone(await self.relay.stores.spool.get(queue_id), queue_id)
