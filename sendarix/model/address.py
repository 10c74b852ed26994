"""Envelope addresses: the arguments of MAIL FROM and RCPT TO (RFC 5321, RFC 6531).

Everything here works on the raw bytes of a command line and does no I/O.  The
parser follows the RFC 5321 grammar for a Path, with a few leniencies that real
clients need (a space after the colon, a path without angle brackets) and the
checks an MTA needs (length limits, no control characters, no bare local part:
we never guess a domain).  Non-ASCII addresses are accepted only in an SMTPUTF8
transaction; otherwise the error carries ``needs_utf8`` so the server can answer
``553 5.6.7`` as RFC 6531 asks.
"""

from __future__ import annotations

import ipaddress
import re

from attrs import frozen

# RFC 5321 4.5.3.1: the limits every implementation must accept, and that we enforce.
MAX_PATH = 256
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_LABEL = 63

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# atext of RFC 5322 (which RFC 5321 uses for Atom); bytes >= 0x80 are UTF-8 and are
# allowed only after the caller decided the transaction is SMTPUTF8.
_ATOM = re.compile(rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\xff]+")
_LABEL = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
                    r"[A-Za-z0-9\u0080-\U0010ffff])?")
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9\-]*")
# esmtp-value: any printable except "=" and SP; RFC 6531 adds UTF-8.
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+")
_SPACE = b" \t"


class AddressSyntaxError(ValueError):
    """A MAIL/RCPT argument or path that does not parse.

    ``needs_utf8`` is true when the only problem is a non-ASCII address outside an
    SMTPUTF8 transaction (the server answers 553 5.6.7 then).
    """

    def __init__(self, message: str, *, needs_utf8: bool = False) -> None:
        super().__init__(message)
        self.needs_utf8 = needs_utf8


@frozen
class Path:
    """A parsed reverse- or forward-path; the null path has empty local and domain.

    ``local`` is kept as received (a quoted local part keeps its quotes); ``domain``
    is lowercased, or an address literal such as ``[192.0.2.1]``.
    """

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>``."""
        return not self.local and not self.domain

    @property
    def address(self) -> str:
        """``local@domain``, or "" for the null path."""
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain}"


def _scan_path_end(data: bytes, start: int, stop_at_space: bool) -> int:
    """Index of the byte that ends a path starting at ``start``, or -1.

    With ``stop_at_space`` the end is the first space or tab (or the end of ``data``,
    returned as ``len(data)``); otherwise it is the closing ``>``.  Quoted strings
    are skipped, so a ``>`` or a space inside quotes does not end the path.
    """
    i = start
    n = len(data)
    in_quote = False
    while i < n:
        c = data[i]
        if in_quote:
            if c == 0x5C:  # backslash: the next byte is quoted
                i += 2
                continue
            if c == 0x22:
                in_quote = False
        elif c == 0x22:
            in_quote = True
        elif stop_at_space and c in _SPACE:
            return i
        elif not stop_at_space and c == 0x3E:
            return i
        i += 1
    return n if stop_at_space and not in_quote else -1


def parse_command_arg(arg: bytes, keyword: bytes) -> tuple[bytes, bytes]:
    """Split a MAIL/RCPT argument (``FROM:<a@b> SIZE=1``) into path and parameters.

    ``keyword`` (``b"FROM"`` or ``b"TO"``) matches case-insensitively and must be
    followed by a colon; spaces after the colon are tolerated.  The path is returned
    as received (with its angle brackets if it had them), the parameters stripped.
    """
    arg = arg.lstrip(_SPACE)
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword.upper() + b":":
        raise AddressSyntaxError(f"expected {keyword.decode('ascii', 'replace')}:")
    rest = arg[len(keyword) + 1 :].lstrip(_SPACE)
    if not rest:
        raise AddressSyntaxError("missing address")
    if rest.startswith(b"<"):
        end = _scan_path_end(rest, 1, stop_at_space=False)
        if end < 0:
            raise AddressSyntaxError("unterminated <address>")
        end += 1
    else:
        end = _scan_path_end(rest, 0, stop_at_space=True)
        if end < 0:
            raise AddressSyntaxError("unterminated quoted string")
    path, params = rest[:end], rest[end:]
    if params and params[0] not in _SPACE:
        raise AddressSyntaxError("parameters must follow the address after a space")
    return path, params.strip(_SPACE)


def _parse_domain(raw: bytes) -> str:
    """Validate a domain or address literal; return it normalised (lowercase)."""
    if not raw:
        raise AddressSyntaxError("missing domain")
    if len(raw) > MAX_DOMAIN:
        raise AddressSyntaxError("domain too long")
    if raw.startswith(b"["):
        if not raw.endswith(b"]") or len(raw) < 3:
            raise AddressSyntaxError("bad address literal")
        inner = raw[1:-1].decode("ascii", "replace")
        try:
            if inner[:5].lower() == "ipv6:":
                if "%" in inner:  # a scope id means nothing outside one host
                    raise ValueError(inner)
                ipaddress.IPv6Address(inner[5:])
                return "[IPv6:" + inner[5:].lower() + "]"
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressSyntaxError("bad address literal") from None
        return "[" + inner + "]"
    text = raw.decode("utf-8")  # the caller checked that non-ASCII is allowed and valid
    for label in text.split("."):
        if not _LABEL.fullmatch(label):
            raise AddressSyntaxError("bad domain")
        if len(label.encode("utf-8")) > MAX_LABEL:
            raise AddressSyntaxError("domain label too long")
    return text.lower()


def _split_local(mailbox: bytes) -> tuple[bytes, bytes]:
    """Split ``local@domain`` at the ``@`` that ends the local part; check the local part."""
    if mailbox.startswith(b'"'):
        i = 1
        n = len(mailbox)
        while i < n:
            c = mailbox[i]
            if c == 0x5C:
                # quoted-pairSMTP: backslash and one printable ASCII character
                if i + 1 >= n or not 0x20 <= mailbox[i + 1] <= 0x7E:
                    raise AddressSyntaxError("bad quoted local part")
                i += 2
                continue
            if c == 0x22:
                break
            i += 1
        else:
            raise AddressSyntaxError("unterminated quoted local part")
        local, rest = mailbox[: i + 1], mailbox[i + 1 :]
        if not rest.startswith(b"@"):
            raise AddressSyntaxError("missing domain" if not rest else "bad local part")
        return local, rest[1:]
    local, at, domain = mailbox.partition(b"@")
    if not at:
        raise AddressSyntaxError("address needs a domain")
    if not local:
        raise AddressSyntaxError("empty local part")
    for atom in local.split(b"."):
        if not _ATOM.fullmatch(atom):
            raise AddressSyntaxError("bad local part")
    return local, domain


def _skip_route(inner: bytes) -> bytes:
    """Drop an RFC 5321 source route (``@a,@b:``), after checking its syntax."""
    pos = 0
    while True:
        if inner[pos : pos + 1] != b"@":
            raise AddressSyntaxError("bad source route")
        pos += 1
        if inner[pos : pos + 1] == b"[":
            end = inner.find(b"]", pos)
            if end < 0:
                raise AddressSyntaxError("bad source route")
            end += 1
        else:
            end = pos
            while end < len(inner) and inner[end] not in b",:":
                end += 1
        _parse_domain(inner[pos:end])
        sep = inner[end : end + 1]
        if sep == b":":
            return inner[end + 1 :]
        if sep != b",":
            raise AddressSyntaxError("bad source route")
        pos = end + 1


def parse_path(raw: bytes, *, allow_null: bool, utf8: bool) -> Path:
    """Parse an RFC 5321 Path such as ``<user@example.com>``.

    Angle brackets may be missing; a source route is checked and dropped; ``<>`` is
    the null path, accepted only with ``allow_null``.  Non-ASCII (UTF-8) is allowed
    only with ``utf8``; otherwise the error has ``needs_utf8`` set.
    """
    if not raw:
        raise AddressSyntaxError("missing address")
    if _CONTROL.search(raw):
        raise AddressSyntaxError("control character in address")
    if not raw.isascii():
        if not utf8:
            raise AddressSyntaxError("non-ASCII address without SMTPUTF8", needs_utf8=True)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AddressSyntaxError("address is not valid UTF-8") from None
    if raw.startswith(b"<"):
        if len(raw) < 2 or not raw.endswith(b">"):
            raise AddressSyntaxError("unbalanced angle brackets")
        inner = raw[1:-1]
        total = len(raw)
    else:
        if raw.endswith(b">"):
            raise AddressSyntaxError("unbalanced angle brackets")
        inner = raw
        total = len(raw) + 2
    if total > MAX_PATH:
        raise AddressSyntaxError("address too long")
    if not inner:
        if not allow_null:
            raise AddressSyntaxError("null address not allowed here")
        return Path("", "")
    if inner.startswith(b"@"):
        inner = _skip_route(inner)
    local, domain = _split_local(inner)
    if len(local) > MAX_LOCAL:
        raise AddressSyntaxError("local part too long")
    return Path(local.decode("utf-8"), _parse_domain(domain))


def parse_params(raw: bytes) -> dict[str, str | None]:
    """Parse MAIL/RCPT parameters: ``SIZE=100 SMTPUTF8`` -> ``{"SIZE": "100", "SMTPUTF8": None}``.

    Keywords are upper-cased; values (xtext included) are returned as received.
    A repeated keyword, a bad keyword or an empty value is a syntax error.
    """
    params: dict[str, str | None] = {}
    for item in raw.split():
        key, eq, value = item.partition(b"=")
        if not _KEYWORD.fullmatch(key):
            raise AddressSyntaxError(f"bad parameter {item.decode('utf-8', 'replace')!r}")
        name = key.decode("ascii").upper()
        if name in params:
            raise AddressSyntaxError(f"duplicate parameter {name}")
        if not eq:
            params[name] = None
            continue
        if not _VALUE.fullmatch(value):
            raise AddressSyntaxError(f"bad value for parameter {name}")
        try:
            params[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise AddressSyntaxError(f"bad value for parameter {name}") from None
    return params


def domain_of(address: str) -> str:
    """The lowercased domain of ``local@domain``; "" for the null address."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""
