"""Cleanup: the last change to a message before it is queued (Postfix's "cleanup").

It reads and removes our internal ``X-Sendarix-*`` header fields, adds
``Message-ID:`` and ``Date:`` when the message has none, and puts a ``Received:``
trace field on top; :func:`amend` adds a content filter's fields and new Subject
afterwards.  Only the header block is parsed (as bytes, with unfolding);
the body after it is copied exactly once, into the result, and never changed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, getaddresses

from attrs import frozen

from sendarix.model.randomness import unique_bits

CRLF = b"\r\n"
INTERNAL_PREFIX = b"x-sendarix-"
FOLD_WIDTH = 78

# field-name ":" (RFC 5322 ftext), allowing the obsolete white space before the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
_TAG_SPLIT = re.compile(r"[,\s]+")
# What may not appear in a value we write into a header field: control characters
# (a CR or LF would start a new field) and white space (it would change the meaning).
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@frozen
class CleanupInfo:
    """What cleanup needs to know about the session that brought the message."""

    hostname: str
    queue_id: str
    helo: str
    client_ip: str
    client_name: str | None
    protocol: str
    tls_version: str | None
    tls_cipher: str | None
    recipients: tuple[str, ...]
    authenticated_as: str | None
    expose_auth: bool
    now: float
    message_id_domain: str


@frozen
class CleanedMessage:
    """The message as it goes into the queue, and what cleanup read from it.

    ``message_id`` has no angle brackets; ``header_from`` is the address of the first
    From mailbox with its domain lowercased (None if missing or unparsable).
    """

    body: bytes
    message_id: str
    header_from: str | None
    tags: tuple[str, ...]
    stream: str | None
    tenant_hint: str | None


def received_protocol(esmtp: bool, tls: bool, auth: bool) -> str:
    """The ``with`` protocol name of a Received field (RFC 3848)."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")


@frozen
class _Field:
    """One header field: its lowercased name and its raw bytes (all its lines)."""

    name: bytes
    raw: bytes

    def value(self) -> str:
        """The unfolded value, stripped, decoded leniently."""
        _, _, value = self.raw.partition(b":")
        value = _UNFOLD.sub(b"", value).strip()
        return value.decode("utf-8", "replace")


def _split_header(message: bytes) -> tuple[list[_Field], int]:
    """Parse the header block of ``message``.

    Returns the fields and the offset where the body starts: after the empty line
    that ends the block, or at the first line that is not a header field (or at the
    end of the message).
    """
    spans: list[tuple[bytes, int, int]] = []  # (lowercased name, start, end)
    pos = 0
    n = len(message)
    while pos < n:
        nl = message.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        first = message[pos : pos + 1]
        if first == b"\n" or message.startswith(CRLF, pos):
            pos = end  # the empty line: we write our own CRLF in its place
            break
        if first in (b" ", b"\t") and spans:
            name, start, _ = spans[-1]
            spans[-1] = (name, start, end)  # a continuation line of the last field
        else:
            m = _FIELD.match(message, pos, end)
            if m is None:
                break  # not a header field: the body starts here, without an empty line
            spans.append((m.group(1).lower(), pos, end))
        pos = end
    return [_Field(name, message[start:end]) for name, start, end in spans], pos


def _clean(text: str) -> str:
    """Make a session-supplied word safe to put in a header field."""
    return _UNSAFE.sub("?", text) or "?"


def _fold(name: str, lines: list[str]) -> bytes:
    """Render a structured field whose logical lines are ``lines``.

    Each logical line starts a new folded line; one that is still longer than
    ``FOLD_WIDTH`` is wrapped at spaces where possible.
    """
    out: list[str] = []
    for i, text in enumerate(lines):
        prefix = f"{name}: " if i == 0 else "\t"
        current = prefix
        for word in text.split(" "):
            if current == prefix:
                current += word
            elif not word or len(current) + 1 + len(word) <= FOLD_WIDTH:
                current += " " + word
            else:
                # Fold in front of the space, so unfolding gives back the same text.
                out.append(current)
                current = " " + word
        out.append(current)
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


def _received(info: CleanupInfo, date: str) -> bytes:
    ip = _clean(info.client_ip)
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    tcp_info = f"{_clean(info.client_name)} {literal}" if info.client_name else literal
    lines = [
        f"from {_clean(info.helo)} ({tcp_info})",
        f"by {_clean(info.hostname)} (Sendarix) with {_clean(info.protocol)}"
        f" id {_clean(info.queue_id)}",
    ]
    if info.tls_version:
        lines.append(
            f"(using {_clean(info.tls_version)} with cipher {_clean(info.tls_cipher or 'unknown')})"
        )
    if info.expose_auth and info.authenticated_as:
        lines.append(f"(authenticated as {_clean(info.authenticated_as)})")
    if len(info.recipients) == 1:
        rcpt = _CONTROL.sub("?", info.recipients[0])
        lines.append(f"for <{rcpt}>")
    # The date ends the field after a ";", on a line of its own if it does not fit.
    if len(lines[-1]) + len(date) + 3 <= FOLD_WIDTH:
        lines[-1] += f"; {date}"
    else:
        lines[-1] += ";"
        lines.append(date)
    return _fold("Received", lines)


#: A From value that is one plain address, bare or in angle brackets after a plain
#: name: what applications nearly always write, and what the full parser reads the
#: same way (it is much slower, and runs for every message).
_PLAIN_FROM = re.compile(r"(?:[A-Za-z0-9 ]*<)?([A-Za-z0-9._+-]+)@([A-Za-z0-9.-]+)>?")


def _first_mailbox(value: str) -> str | None:
    """The address of the first mailbox in a From field value, domain lowercased."""
    plain = _PLAIN_FROM.fullmatch(value.strip())
    if plain is not None and (value.strip()[-1:] == ">") == ("<" in value):
        return f"{plain.group(1)}@{plain.group(2).lower()}"
    for _, addr in getaddresses([value]):
        local, at, domain = addr.rpartition("@")
        if at and local and domain and not _CONTROL.search(addr):
            return f"{local}@{domain.lower()}"
    return None


#: The last whole second written as a header date, and its text.
_last_date: tuple[int, str] = (-1, "")


def header_date(now: float) -> str:
    """``now`` as an RFC 5322 date in UTC (``Sat, 05 Dec 2026 21:06:28 +0000``), to
    the second.  Every message gets one in its Received field, many in a second:
    the text is made once per second."""
    global _last_date
    second = int(now)
    last, text = _last_date
    if second != last:
        text = format_datetime(datetime.fromtimestamp(second, UTC))
        # One tuple assignment: another thread sees the old pair or the new one.
        _last_date = (second, text)
    return text


def cleanup(body: bytes, info: CleanupInfo) -> CleanedMessage:
    """Prepare ``body`` (a whole message, CR LF line endings) for the queue."""
    fields, body_start = _split_header(body)
    kept: list[bytes] = []
    tags: list[str] = []
    stream: str | None = None
    tenant: str | None = None
    message_id: str | None = None
    header_from: str | None = None
    has_from = has_date = False
    for f in fields:
        if f.name.startswith(INTERNAL_PREFIX):
            kind = f.name[len(INTERNAL_PREFIX) :]
            if kind == b"tags":
                for tag in _TAG_SPLIT.split(f.value()):
                    if tag and tag not in tags:
                        tags.append(tag)
            elif kind == b"stream":
                stream = stream or f.value() or None
            elif kind == b"tenant":
                tenant = tenant or f.value() or None
            continue
        if f.name == b"message-id" and message_id is None:
            value = f.value()
            inner = re.search(r"<([^<>]*)>", value)
            message_id = (inner.group(1) if inner else value).strip() or None
            if message_id is None:
                continue  # an empty Message-ID is replaced by ours
        elif f.name == b"date":
            has_date = True
        elif f.name == b"from" and not has_from:
            has_from = True
            header_from = _first_mailbox(f.value())
        # A last field cut off by the end of the message still needs its line end.
        kept.append(f.raw if f.raw.endswith(b"\n") else f.raw + CRLF)

    date = header_date(info.now)
    added: list[bytes] = []
    if message_id is None:
        message_id = f"{info.queue_id}.{unique_bits(64):016x}@{info.message_id_domain}"
        added.append(f"Message-ID: <{message_id}>\r\n".encode())
    if not has_date:
        added.append(f"Date: {date}\r\n".encode())
    parts: list[bytes | memoryview] = [_received(info, date), *kept, *added]
    parts.append(CRLF)
    parts.append(memoryview(body)[body_start:])
    return CleanedMessage(
        body=b"".join(parts),
        message_id=message_id,
        header_from=header_from,
        tags=tuple(tags),
        stream=stream,
        tenant_hint=tenant,
    )


def amend(message: bytes, add: Sequence[tuple[str, str]], subject: str | None) -> bytes:
    """``message`` with the fields ``add`` inserted after its first field (the Received
    field cleanup put first) and, when ``subject`` is given, its Subject replaced by
    it (RFC 2047-encoded when it is not ASCII).  Values are single lines already."""
    if not add and subject is None:
        return message
    fields, body_start = _split_header(message)
    out: list[bytes | memoryview] = []
    new = [_fold(name, [_clean_value(value)]) for name, value in add]
    if not fields:
        out.extend(new)
    replaced = False
    for i, f in enumerate(fields):
        raw = f.raw if f.raw.endswith(b"\n") else f.raw + CRLF
        if f.name == b"subject" and subject is not None:
            if replaced:
                continue
            raw, replaced = _subject(subject), True
        out.append(raw)
        if i == 0:
            out.extend(new)
    if subject is not None and not replaced:
        out.append(_subject(subject))
    out.append(CRLF)
    out.append(memoryview(message)[body_start:])
    return b"".join(out)


def _clean_value(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _subject(text: str) -> bytes:
    text = _clean_value(text)
    if text.isascii():
        return _fold("Subject", [text])
    encoded = Header(text, "utf-8", header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {encoded}\r\n".encode("ascii")
