"""Cleanup: Received, Message-ID and Date, internal header removal, header From."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.cleanup.headers import (
    CleanupInfo,
    _first_mailbox,
    cleanup,
    header_date,
    received_protocol,
)

T = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"

INFO = CleanupInfo(
    hostname="relay.example.net",
    queue_id="01HF0000000000000000",
    helo="app.example.org",
    client_ip="192.0.2.7",
    client_name=None,
    protocol="ESMTPSA",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    recipients=("bob@example.com",),
    authenticated_as="app-1",
    expose_auth=False,
    now=T,
    message_id_domain="relay.example.net",
)


def header_block(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header_names(message: bytes) -> list[str]:
    return [
        ln.split(b":", 1)[0].decode().lower()
        for ln in header_block(message).split(b"\r\n")
        if ln and ln[:1] not in (b" ", b"\t")
    ]


field_names = st.sampled_from(
    ["Subject", "From", "To", "Date", "X-Sendarix-Tags", "x-sendarix-stream",
     "X-SENDARIX-TENANT", "X-Sendarix-Other", "Received", "X-Mailer", "Reply-To"]
)
field_values = st.text(
    st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20
).map(str.strip).filter(bool)
fields = st.lists(
    st.tuples(field_names, field_values, st.booleans()).map(
        lambda t: f"{t[0]}: {t[1]}\r\n" + ("\t(more)\r\n" if t[2] else "")
    ),
    max_size=10,
).map(lambda fs: "".join(fs).encode())


class ReceivedProtocolTests(SynchronousTestCase):
    """received_protocol follows RFC 3848."""

    def test_names(self) -> None:
        """SMTP, ESMTP, ESMTPS, ESMTPA and ESMTPSA."""
        self.assertEqual(received_protocol(False, False, False), "SMTP")
        self.assertEqual(received_protocol(True, False, False), "ESMTP")
        self.assertEqual(received_protocol(True, True, False), "ESMTPS")
        self.assertEqual(received_protocol(True, False, True), "ESMTPA")
        self.assertEqual(received_protocol(True, True, True), "ESMTPSA")


class HeaderDateTests(SynchronousTestCase):
    """The Received and Date fields' date, made once per second."""

    @given(st.lists(st.floats(min_value=0, max_value=2**33), min_size=1, max_size=20))
    def test_same_as_the_email_package(self, moments: list[float]) -> None:
        """Whatever the order of the moments asked for, each date is the email
        package's own for that moment (to the second)."""
        for now in moments:
            self.assertEqual(header_date(now), format_datetime(datetime.fromtimestamp(now, UTC)))


class ReceivedTests(SynchronousTestCase):
    """The Received trace field."""

    def received(self, **changes: Any) -> str:
        msg = cleanup(b"Subject: x\r\n\r\nbody\r\n", attrs.evolve(INFO, **changes)).body
        assert msg.startswith(b"Received: ")
        end = re.search(rb"\r\n(?![ \t])", msg)
        assert end is not None
        return msg[: end.end()].decode()

    def test_full(self) -> None:
        """TLS version and cipher and the single recipient are shown; the user is not."""
        self.assertEqual(
            self.received(),
            "Received: from app.example.org ([192.0.2.7])\r\n"
            "\tby relay.example.net (Sendarix) with ESMTPSA id 01HF0000000000000000\r\n"
            "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
            f"\tfor <bob@example.com>; {DATE}\r\n",
        )

    def test_expose_auth(self) -> None:
        """The authenticated user appears only when configured."""
        self.assertIn("\t(authenticated as app-1)\r\n", self.received(expose_auth=True))
        self.assertNotIn("app-1", self.received(expose_auth=False))

    def test_no_tls_many_recipients(self) -> None:
        """Without TLS there is no cipher line; with several recipients no 'for'."""
        self.assertEqual(
            self.received(tls_version=None, tls_cipher=None, protocol="ESMTP",
                          recipients=("a@b.c", "d@e.f"), client_name="app.example.org"),
            "Received: from app.example.org (app.example.org [192.0.2.7])\r\n"
            "\tby relay.example.net (Sendarix) with ESMTP id 01HF0000000000000000;\r\n"
            f"\t{DATE}\r\n",
        )

    def test_ipv6_client(self) -> None:
        """An IPv6 client address is written as an IPv6 address literal."""
        self.assertIn("([IPv6:2001:db8::5])", self.received(client_ip="2001:db8::5"))

    def test_hostile_helo(self) -> None:
        """A HELO name cannot start a new header field or break the syntax."""
        text = self.received(helo="x\r\nBcc: evil@example.com")
        self.assertNotIn("\r\nBcc", text)
        self.assertIn("from x??Bcc:?evil@example.com ", text)

    def test_long_lines_folded(self) -> None:
        """Lines are folded at 78 characters where there is a space to fold at."""
        text = self.received(helo="h" * 60, client_name="n" * 30, recipients=("r" * 50 + "@x.y",))
        for line in text.split("\r\n")[:-1]:
            self.assertLessEqual(len(line), 78, line)
        unfolded = re.sub(r"\r\n(?=[ \t])", "", text)
        self.assertIn(f"from {'h' * 60} ({'n' * 30} [192.0.2.7])", unfolded)


class CleanupTests(SynchronousTestCase):
    """cleanup()."""

    def test_adds_message_id_and_date(self) -> None:
        """Both are added at the end of the header block when missing."""
        m = cleanup(b"Subject: hi\r\n\r\nbody\r\n", INFO)
        self.assertRegex(m.message_id, r"^01HF0000000000000000\.[0-9a-f]+@relay\.example\.net$")
        self.assertEqual(header_names(m.body), ["received", "subject", "message-id", "date"])
        self.assertIn(f"Message-ID: <{m.message_id}>\r\nDate: {DATE}\r\n\r\nbody\r\n".encode(),
                      m.body)

    def test_message_ids_differ(self) -> None:
        """Two cleanups of the same message get different ids."""
        self.assertNotEqual(cleanup(b"\r\n", INFO).message_id, cleanup(b"\r\n", INFO).message_id)

    def test_keeps_existing(self) -> None:
        """An existing Message-ID (returned without brackets) and Date are kept, not doubled."""
        msg = (b"Message-ID:\r\n <abc.1@host.example>\r\n"
               b"date: Mon, 1 Jan 2024 00:00:00 +0100\r\n\r\nx")
        m = cleanup(msg, INFO)
        self.assertEqual(m.message_id, "abc.1@host.example")
        self.assertEqual(header_names(m.body), ["received", "message-id", "date"])
        self.assertTrue(m.body.endswith(msg))

    def test_empty_message_id_replaced(self) -> None:
        """An empty Message-ID field is replaced by a real one."""
        m = cleanup(b"Message-ID: \r\nSubject: s\r\n\r\n", INFO)
        self.assertTrue(m.message_id)
        self.assertEqual(header_names(m.body), ["received", "subject", "message-id", "date"])

    def test_internal_headers_read_and_removed(self) -> None:
        """X-Sendarix-* fields (any case, folded or not) are read, then removed."""
        msg = (
            b"X-Sendarix-Tags: welcome, signup\r\n\tnewsletter  welcome\r\n"
            b"Subject: s\r\n"
            b"x-sendarix-STREAM: transactional\r\n"
            b"X-SENDARIX-TENANT: acme\r\n"
            b"X-Sendarix-Unknown: whatever\r\n"
            b"X-Sendarix-Tags: ,late,\r\n"
            b"\r\nX-Sendarix-Tags: in the body stays\r\n"
        )
        m = cleanup(msg, INFO)
        self.assertEqual(m.tags, ("welcome", "signup", "newsletter", "late"))
        self.assertEqual((m.stream, m.tenant_hint), ("transactional", "acme"))
        self.assertNotIn(b"x-sendarix", header_block(m.body).lower())
        self.assertTrue(m.body.endswith(b"\r\n\r\nX-Sendarix-Tags: in the body stays\r\n"))

    def test_no_internal_headers(self) -> None:
        """Without them, tags are empty and stream and tenant None."""
        m = cleanup(b"Subject: s\r\n\r\n", INFO)
        self.assertEqual((m.tags, m.stream, m.tenant_hint), ((), None, None))

    def test_header_from(self) -> None:
        """The first From mailbox, domain lowercased, display names and comments skipped."""
        cases = {
            b'From: "Doe, John" <John.Doe@Example.COM>': "John.Doe@example.com",
            b"From: a@B.example (Alice), c@d.example": "a@b.example",
            b"From: Team: x@Y.example, z@w.example;": "x@y.example",
            b"From: =?utf-8?q?J=C3=B6rg?= <jo@b.example>": "jo@b.example",
            "From: Jörg <jörg@bücher.example>".encode(): "jörg@bücher.example",
            b"From:\r\n  Folded Name\r\n <f@G.example>": "f@g.example",
            b"From: undisclosed-recipients:;": None,
            b"From: not an address": None,
            b"From: <<<": None,
            b"Sender: s@x.example": None,
        }
        for field, expected in cases.items():
            m = cleanup(field + b"\r\n\r\nbody\r\n", INFO)
            self.assertEqual(m.header_from, expected, field)

    def test_first_from_field_counts(self) -> None:
        """With two From fields, the first one is used."""
        m = cleanup(b"From: a@one.example\r\nFrom: b@two.example\r\n\r\n", INFO)
        self.assertEqual(m.header_from, "a@one.example")

    def test_no_header_block(self) -> None:
        """A message that starts with body text gets headers and an empty line before it."""
        m = cleanup(b"Hello there\r\nbye\r\n", INFO)
        self.assertTrue(m.body.endswith(f"Date: {DATE}\r\n\r\nHello there\r\nbye\r\n".encode()))

    def test_empty_message(self) -> None:
        """An empty message becomes a header block and an empty line."""
        m = cleanup(b"", INFO)
        self.assertTrue(m.body.endswith(f"Date: {DATE}\r\n\r\n".encode()))
        self.assertEqual(header_names(m.body), ["received", "message-id", "date"])

    def test_only_empty_line(self) -> None:
        """A message starting with an empty line has an empty header block."""
        m = cleanup(b"\r\nbody\r\n", INFO)
        self.assertTrue(m.body.endswith(f"Date: {DATE}\r\n\r\nbody\r\n".encode()))

    def test_headers_only(self) -> None:
        """Header fields with no empty line after them, the last one unterminated."""
        m = cleanup(b"Subject: a\r\nX-Sendarix-Stream: s", INFO)
        self.assertEqual(m.stream, "s")
        self.assertTrue(m.body.endswith(f"Subject: a\r\nMessage-ID: <{m.message_id}>\r\n"
                                        f"Date: {DATE}\r\n\r\n".encode()))

    def test_non_header_line_ends_header(self) -> None:
        """A line that is not a header field starts the body; an empty line is inserted."""
        m = cleanup(b"Subject: a\r\nthis is text\r\nDate: no\r\n", INFO)
        self.assertTrue(m.body.endswith(b"\r\n\r\nthis is text\r\nDate: no\r\n"))
        self.assertIn(b"Date: " + DATE.encode(), m.body)

    def test_mbox_from_line_is_body(self) -> None:
        """An mbox 'From ' line is not a header field."""
        m = cleanup(b"From someone Mon Jan 1\r\nSubject: x\r\n", INFO)
        self.assertIsNone(m.header_from)
        self.assertTrue(m.body.endswith(b"\r\n\r\nFrom someone Mon Jan 1\r\nSubject: x\r\n"))

    @given(fields, st.none() | st.integers(min_value=0, max_value=10), st.binary(max_size=200))
    def test_body_identical_and_fields(self, header: bytes, id_at: int | None, body: bytes) -> None:
        """The body is unchanged, internal fields gone, exactly one Message-ID and a Date."""
        if id_at is not None:
            lines = header.split(b"\r\n")
            lines.insert(id_at % len(lines), b"Message-Id: <given.1@client.example>")
            header = b"\r\n".join(lines)
        message = header + b"\r\n" + body
        m = cleanup(message, INFO)
        block = header_block(m.body)
        self.assertEqual(m.body[len(block) + 2 :], body)
        names = header_names(m.body)
        self.assertEqual(names[0], "received")
        self.assertNotIn(b"\nx-sendarix-", block.lower())
        self.assertEqual(names.count("message-id"), 1)
        if id_at is not None:
            self.assertEqual(m.message_id, "given.1@client.example")
        else:
            self.assertIn(f"Message-ID: <{m.message_id}>\r\n".encode(), block)
        dates = len(re.findall(rb"(?im)^date:", header))
        self.assertEqual(names.count("date"), max(1, dates))
        self.assertEqual(dates == 0, f"Date: {DATE}\r\n".encode() in block)
        # Every kept field is there byte for byte, in order.
        field_re = rb"(?m)^[^\s][^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*"
        kept = [f for f in re.findall(field_re, header + b"\r\n")
                if not f.lower().startswith(b"x-sendarix-")]
        self.assertIn(b"".join(kept), block)

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, message: bytes) -> None:
        """Any bytes: Received first, one Message-ID, and what follows the first empty
        line of the input is the unchanged end of the output."""
        m = cleanup(message, INFO)
        self.assertTrue(m.body.startswith(b"Received: from "))
        self.assertTrue(m.message_id)
        self.assertIn(b"\r\n\r\n", m.body)
        if b"\r\n\r\n" in message:
            self.assertTrue(m.body.endswith(message.split(b"\r\n\r\n", 1)[1]))

    def test_separator_is_crlf(self) -> None:
        """A bare-LF empty line ending the header block is written as CRLF."""
        m = cleanup(b"Subject: a\n\nbody\n", INFO)
        self.assertTrue(m.body.endswith(b"Subject: a\n" + b"Message-ID: <" + m.message_id.encode()
                                        + f">\r\nDate: {DATE}\r\n\r\nbody\n".encode()))


def _full_parse(value: str) -> str | None:
    """The From address as the email package's full parser reads it."""
    for _, addr in getaddresses([value]):
        local, at, domain = addr.rpartition("@")
        if at and local and domain and not re.search(r"[\x00-\x1f\x7f]", addr):
            return f"{local}@{domain.lower()}"
    return None


class FromAddressTests(SynchronousTestCase):
    """The quick reading of a plain From value agrees with the full parser."""

    @given(st.text(alphabet='aB0 .<>@+-_"(),:;\\x', max_size=30))
    def test_same_as_full_parser(self, value: str) -> None:
        """Any value, plain or not, gives the address the email package gives."""
        self.assertEqual(_first_mailbox(value), _full_parse(value))

    def test_plain_values(self) -> None:
        """The forms applications write, with the domain lower-cased."""
        for value, expected in [
            ("bench@bench.example", "bench@bench.example"),
            ("Joe Q <Joe.Q@EXAMPLE.com>", "Joe.Q@example.com"),
            ('"Q, Joe" <joe@example.com>', "joe@example.com"),
        ]:
            self.assertEqual(_first_mailbox(value), expected)
