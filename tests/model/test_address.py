"""Envelope address parsing: MAIL/RCPT arguments, paths, parameters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.model.address import (
    AddressSyntaxError,
    Path,
    domain_of,
    parse_command_arg,
    parse_params,
    parse_path,
)

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
LDH_INNER = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
LETDIG = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

atoms = st.text(ATEXT, min_size=1, max_size=8)
local_parts = st.lists(atoms, min_size=1, max_size=4).map(".".join)
labels = st.builds(
    lambda a, mid, b: a + mid + b if mid or b else a,
    st.sampled_from(LETDIG),
    st.text(LDH_INNER, max_size=10),
    st.text(LETDIG, max_size=1),
).filter(lambda s: not s.endswith("-"))
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


def path(raw: bytes, allow_null: bool = False, utf8: bool = False) -> Path:
    return parse_path(raw, allow_null=allow_null, utf8=utf8)


class ParseCommandArgTests(SynchronousTestCase):
    """parse_command_arg splits FROM:/TO: arguments."""

    def test_path_and_params(self) -> None:
        """The path keeps its brackets; parameters are returned stripped."""
        self.assertEqual(
            parse_command_arg(b"FROM:<a@b.c> SIZE=100 BODY=8BITMIME", b"FROM"),
            (b"<a@b.c>", b"SIZE=100 BODY=8BITMIME"),
        )

    def test_keyword_case_insensitive(self) -> None:
        """from: and To: match their keywords."""
        self.assertEqual(parse_command_arg(b"from:<a@b>", b"FROM"), (b"<a@b>", b""))
        self.assertEqual(parse_command_arg(b"To:<a@b>", b"TO"), (b"<a@b>", b""))

    def test_space_after_colon(self) -> None:
        """Spaces after the colon are tolerated (many clients send them)."""
        self.assertEqual(
            parse_command_arg(b"FROM:  <a@b>  SIZE=1 ", b"FROM"), (b"<a@b>", b"SIZE=1")
        )

    def test_null_path(self) -> None:
        """<> is returned as the path."""
        self.assertEqual(parse_command_arg(b"FROM:<> BODY=7BIT", b"FROM"), (b"<>", b"BODY=7BIT"))

    def test_without_brackets(self) -> None:
        """A path without brackets ends at the first space."""
        self.assertEqual(
            parse_command_arg(b"TO:a@b.c NOTIFY=NEVER", b"TO"), (b"a@b.c", b"NOTIFY=NEVER")
        )

    def test_quoted_angle_and_space(self) -> None:
        """A '>' or a space inside a quoted local part does not end the path."""
        self.assertEqual(
            parse_command_arg(b'TO:<"a> b"@c.d> X=1', b"TO"), (b'<"a> b"@c.d>', b"X=1")
        )
        self.assertEqual(parse_command_arg(b'TO:"a b"@c.d X=1', b"TO"), (b'"a b"@c.d', b"X=1"))

    def test_errors(self) -> None:
        """Wrong keyword, missing colon or path, unterminated or glued paths fail."""
        for arg, kw in [
            (b"TO:<a@b>", b"FROM"),
            (b"FROM<a@b>", b"FROM"),
            (b"FROM:", b"FROM"),
            (b"FROM:   ", b"FROM"),
            (b"FROM:<a@b", b"FROM"),
            (b"FROM:<a@b>SIZE=1", b"FROM"),
            (b'FROM:"a b@c', b"FROM"),
            (b"", b"TO"),
        ]:
            with self.assertRaises(AddressSyntaxError, msg=arg):
                parse_command_arg(arg, kw)

    @given(local_parts, domains, st.lists(st.sampled_from(["SIZE=1", "BODY=8BITMIME", "SMTPUTF8"])))
    def test_round_trip(self, local: str, domain: str, params: list[str]) -> None:
        """Any mailbox and parameter list are split back out unchanged."""
        raw_path = f"<{local}@{domain}>".encode()
        arg = b"FROM:" + raw_path + b"".join(b" " + p.encode() for p in params)
        self.assertEqual(
            parse_command_arg(arg, b"FROM"), (raw_path, " ".join(params).encode())
        )

    @given(st.binary(max_size=80))
    def test_arbitrary_bytes(self, arg: bytes) -> None:
        """Arbitrary input gives a result or AddressSyntaxError, nothing else."""
        try:
            p, params = parse_command_arg(b"TO:" + arg, b"TO")
        except AddressSyntaxError:
            return
        self.assertTrue(p)
        self.assertEqual(params, params.strip(b" \t"))


class ParsePathTests(SynchronousTestCase):
    """parse_path validates RFC 5321 paths."""

    def test_simple(self) -> None:
        """The domain is lowercased, the local part kept as received."""
        p = path(b"<John.Doe@Example.COM>")
        self.assertEqual(p, Path("John.Doe", "example.com"))
        self.assertEqual(p.address, "John.Doe@example.com")
        self.assertFalse(p.is_null)

    def test_without_brackets(self) -> None:
        """Brackets are optional (lenient)."""
        self.assertEqual(path(b"a@b.c").address, "a@b.c")

    def test_null(self) -> None:
        """<> is the null path, only where allowed."""
        p = path(b"<>", allow_null=True)
        self.assertTrue(p.is_null)
        self.assertEqual(p.address, "")
        with self.assertRaises(AddressSyntaxError):
            path(b"<>")

    def test_quoted_local(self) -> None:
        """A quoted local part keeps its quotes and may hold spaces and escapes."""
        self.assertEqual(path(b'<"john doe"@x.org>').local, '"john doe"')
        self.assertEqual(path(b'<"a\\"b@c"@x.org>').local, '"a\\"b@c"')
        for bad in [b'<"abc@x.org>', b'<"a"b@x.org>', b'<"a\\', b'<"a"@>']:
            with self.assertRaises(AddressSyntaxError, msg=bad):
                path(bad)

    def test_source_route_dropped(self) -> None:
        """A source route is checked and dropped."""
        p = path(b"<@a.example,@[192.0.2.1]:user@d.example>")
        self.assertEqual(p.address, "user@d.example")
        for bad in [b"<@a.example:>", b"<@:u@d>", b"<@a,b:u@d>", b"<@a.example;u@d>",
                    b"<@a_b:u@d>", b"<@[1.2.3.4:u@d>"]:
            with self.assertRaises(AddressSyntaxError, msg=bad):
                path(bad)

    def test_address_literals(self) -> None:
        """IPv4 and IPv6 literals are accepted; others are not."""
        self.assertEqual(path(b"<u@[192.0.2.1]>").domain, "[192.0.2.1]")
        self.assertEqual(path(b"<u@[ipv6:2001:DB8::1]>").domain, "[IPv6:2001:db8::1]")
        for bad in [b"<u@[192.0.2]>", b"<u@[999.1.1.1]>", b"<u@[IPv6:zz::1]>",
                    b"<u@[IPv6:fe80::1%eth0]>", b"<u@[foo:bar]>", b"<u@[]>", b"<u@[1.2.3.4>"]:
            with self.assertRaises(AddressSyntaxError, msg=bad):
                path(bad)

    def test_bad_domains(self) -> None:
        """Hostnames are letters, digits and inner hyphens in non-empty labels."""
        for bad in [b"<u@>", b"<u@a..b>", b"<u@a.b.>", b"<u@.a>", b"<u@-a.b>", b"<u@a-.b>",
                    b"<u@a_b.c>", b"<u@a b>", b"<u@a@b>", b"<u@" + b"a" * 64 + b".b>"]:
            with self.assertRaises(AddressSyntaxError, msg=bad):
                path(bad)
        self.assertEqual(path(b"<u@localhost>").domain, "localhost")
        self.assertEqual(path(b"<u@" + b"a" * 63 + b".b>").domain, "a" * 63 + ".b")

    def test_bad_local_parts(self) -> None:
        """Dot-strings need atoms between single dots; a bare local part is a relay attempt."""
        for bad in [b"<.a@b>", b"<a.@b>", b"<a..b@b>", b"<@b>", b"<a(b)@c>", b"<a,b@c>",
                    b"<postmaster>", b"postmaster", b"<a@b> ", b"<a@b", b"a@b>", b"<", b""]:
            with self.assertRaises(AddressSyntaxError, msg=bad):
                path(bad)

    def test_control_characters(self) -> None:
        """NUL, CR, LF, TAB and DEL are never allowed, quoted or not."""
        for c in [b"\x00", b"\r", b"\n", b"\t", b"\x7f"]:
            with self.assertRaises(AddressSyntaxError):
                path(b"<a" + c + b"b@c.d>")
            with self.assertRaises(AddressSyntaxError):
                path(b'<"a' + c + b'b"@c.d>')

    def test_lengths(self) -> None:
        """Local part <= 64, domain <= 255, whole path <= 256 octets."""
        self.assertEqual(len(path(b"<" + b"a" * 64 + b"@b.c>").local), 64)
        with self.assertRaises(AddressSyntaxError):
            path(b"<" + b"a" * 65 + b"@b.c>")
        domain = b".".join([b"a" * 63] * 3) + b"." + b"b" * 60  # 252 octets
        self.assertEqual(len(path(b"<a@" + domain + b">").domain), 252)  # 256 in all
        self.assertEqual(len(path(b"a@" + domain).domain), 252)
        with self.assertRaises(AddressSyntaxError):
            path(b"<ab@" + domain + b">")  # 257 octets in all
        with self.assertRaises(AddressSyntaxError):
            path(b"ab@" + domain)  # the same without brackets

    def test_utf8(self) -> None:
        """Non-ASCII needs SMTPUTF8; the error says so, so the server can answer 553 5.6.7."""
        raw = "<Jörg@Bücher.example>".encode()
        with self.assertRaises(AddressSyntaxError) as cm:
            path(raw)
        self.assertTrue(cm.exception.needs_utf8)
        self.assertEqual(path(raw, utf8=True), Path("Jörg", "bücher.example"))
        self.assertEqual(path('<"ü x"@a.b>'.encode(), utf8=True).local, '"ü x"')

    def test_invalid_utf8(self) -> None:
        """Invalid UTF-8 in an SMTPUTF8 transaction is a plain syntax error."""
        with self.assertRaises(AddressSyntaxError) as cm:
            path(b"<a\xff@b.c>", utf8=True)
        self.assertFalse(cm.exception.needs_utf8)

    def test_ascii_error_is_not_utf8(self) -> None:
        """Ordinary syntax errors do not set needs_utf8."""
        with self.assertRaises(AddressSyntaxError) as cm:
            path(b"<a..b@c>")
        self.assertFalse(cm.exception.needs_utf8)

    @given(local_parts, domains, st.booleans())
    def test_valid_addresses(self, local: str, domain: str, brackets: bool) -> None:
        """Every well-formed dot-string@hostname within the limits parses back."""
        raw = f"{local}@{domain}".encode()
        if brackets:
            raw = b"<" + raw + b">"
        self.assertEqual(path(raw).address, f"{local}@{domain.lower()}")

    @given(st.binary(max_size=300), st.booleans(), st.booleans())
    def test_arbitrary_bytes(self, raw: bytes, allow_null: bool, utf8: bool) -> None:
        """Arbitrary bytes give a Path or AddressSyntaxError, never anything else."""
        try:
            p = path(raw, allow_null=allow_null, utf8=utf8)
        except AddressSyntaxError:
            return
        self.assertLessEqual(len(p.address.encode()), 256)
        if not p.is_null:
            self.assertIn("@", p.address)

    @given(st.text(max_size=60), st.booleans())
    def test_arbitrary_text(self, text: str, utf8: bool) -> None:
        """Arbitrary (often non-ASCII) text behaves the same way."""
        try:
            path(("<" + text + ">").encode(), allow_null=True, utf8=utf8)
        except AddressSyntaxError:
            pass


class ParseParamsTests(SynchronousTestCase):
    """parse_params reads esmtp-keyword[=value] lists."""

    def test_params(self) -> None:
        """Keywords are upper-cased; values kept; bare keywords map to None."""
        self.assertEqual(
            parse_params(b"size=100 BODY=8BITMIME SMTPUTF8"),
            {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None},
        )

    def test_empty(self) -> None:
        """No parameters give an empty dict."""
        self.assertEqual(parse_params(b""), {})
        self.assertEqual(parse_params(b"   "), {})

    def test_xtext_kept_raw(self) -> None:
        """xtext is not decoded."""
        self.assertEqual(parse_params(b"ORCPT=rfc822;a+2Bb@c"), {"ORCPT": "rfc822;a+2Bb@c"})

    def test_errors(self) -> None:
        """Duplicates, bad keywords and empty or bad values fail."""
        for bad in [b"SIZE=1 size=2", b"-X=1", b"A_B=1", b"SIZE=", b"=1", b"X=a=b", b"X=\x01",
                    b"X=\xff"]:
            with self.assertRaises(AddressSyntaxError, msg=bad):
                parse_params(bad)

    def test_utf8_value(self) -> None:
        """RFC 6531 allows UTF-8 in values."""
        self.assertEqual(parse_params("X-NAME=ü".encode()), {"X-NAME": "ü"})

    @given(st.dictionaries(
        st.from_regex(r"[A-Z0-9][A-Z0-9\-]{0,8}", fullmatch=True),
        st.one_of(st.none(), st.from_regex(r"[!-<>-~]{1,10}", fullmatch=True)),
        max_size=6,
    ))
    def test_round_trip(self, params: dict[str, str | None]) -> None:
        """Any valid parameter list parses back to the same mapping."""
        raw = " ".join(k if v is None else f"{k}={v}" for k, v in params.items()).encode()
        self.assertEqual(parse_params(raw), params)

    @given(st.binary(max_size=60))
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        """Arbitrary input gives a dict or AddressSyntaxError."""
        try:
            parse_params(raw)
        except AddressSyntaxError:
            pass


class DomainOfTests(SynchronousTestCase):
    """domain_of."""

    def test_domain_of(self) -> None:
        """The part after the last @, lowercased; "" for the null address."""
        self.assertEqual(domain_of("a@B.Example"), "b.example")
        self.assertEqual(domain_of('"x@y"@Z.org'), "z.org")
        self.assertEqual(domain_of(""), "")
        self.assertEqual(domain_of("postmaster"), "")
