"""A message from a JSON request: the fields of ``POST /v1/messages`` made into an
RFC 5322 message with the standard library's :mod:`email` package.

Pure: no I/O, no clock.  Every problem is an :obj:`InvalidField` that names the field
(``to[2]``, ``attachments[0].content_b64``) so the API can answer 400 with it.  The
result goes through the same cleanup, DKIM and spool steps as mail that came over SMTP.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formataddr, getaddresses
from typing import Any

from attrs import frozen

from sendarix.model.address import AddressSyntaxError, parse_path

#: Fields a structured message may have (anything else is refused, so a typo such as
#: ``"htlm"`` is an error rather than a silently empty body).
MESSAGE_FIELDS = frozenset({
    "from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers",
    "attachments", "tags", "metadata", "raw_b64", "send_at", "dsn", "template",
    "template_version", "variables",
})  # fmt: skip

#: Header fields a request may not set: the envelope, cleanup and DKIM own them.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "received",
    "return-path", "dkim-signature", "content-type", "content-transfer-encoding",
    "mime-version", "sender",
})  # fmt: skip

MAX_RECIPIENT_FIELDS = 1000
MAX_TAGS = 10
MAX_METADATA = 20
_TAG = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII without ":"
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class InvalidField(ValueError):  # noqa: N818 - reads as "raise InvalidField(field, why)"
    """A request field is missing, of the wrong type or not acceptable."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@frozen
class ComposedMessage:
    """A message ready for intake: envelope sender and recipients, the whole message
    (CR LF line ends), and the request's tags."""

    sender: str
    recipients: tuple[str, ...]
    body: bytes
    tags: tuple[str, ...]
    smtputf8: bool


def _string(value: Any, field: str, *, max_len: int = 998, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise InvalidField(field, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidField(field, "must be a string")
    if required and not value.strip():
        raise InvalidField(field, "must not be empty")
    if len(value) > max_len:
        raise InvalidField(field, f"is longer than {max_len} characters")
    return value


def _header_text(value: Any, field: str) -> str | None:
    text = _string(value, field)
    if text is not None and _FORBIDDEN_IN_VALUE.search(text):
        raise InvalidField(field, "must not contain line breaks or control characters")
    return text


def envelope_address(text: str, field: str) -> str:
    """The bare address of ``"Name <a@b>"`` or ``"a@b"``, checked as an SMTP path."""
    if _FORBIDDEN_IN_VALUE.search(text):
        raise InvalidField(field, "must not contain line breaks or control characters")
    found = getaddresses([text])
    address = found[0][1] if len(found) == 1 else ""
    if not address or "@" not in address:
        raise InvalidField(field, f"{text!r} is not an email address")
    try:
        path = parse_path(f"<{address}>".encode(), allow_null=False, utf8=True)
    except (AddressSyntaxError, UnicodeEncodeError) as e:
        raise InvalidField(field, f"{text!r} is not a valid address ({e})") from None
    return path.address


def _mailbox(text: str, field: str) -> tuple[str, str]:
    """``(display name, address)`` of one mailbox."""
    address = envelope_address(text, field)
    name = getaddresses([text])[0][0]
    return name, address


def _address_list(value: Any, field: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise InvalidField(field, "must be a string or a list of strings")
    if len(items) > MAX_RECIPIENT_FIELDS:
        raise InvalidField(field, f"has more than {MAX_RECIPIENT_FIELDS} addresses")
    return [_mailbox(v, f"{field}[{i}]") for i, v in enumerate(items)]


def _format(mailboxes: Sequence[tuple[str, str]]) -> str:
    out = []
    for name, address in mailboxes:
        if address.isascii():
            out.append(formataddr((name, address)) if name else address)
        else:
            local, _, domain = address.rpartition("@")
            out.append(str(Address(display_name=name, username=local, domain=domain)))
    return ", ".join(out)


def _tags(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidField("tags", "must be a list of strings")
    if len(value) > MAX_TAGS:
        raise InvalidField("tags", f"has more than {MAX_TAGS} tags")
    for i, tag in enumerate(value):
        if not _TAG.fullmatch(tag):
            raise InvalidField(f"tags[{i}]", "must be 1-64 letters, digits or . _ : -")
    return tuple(dict.fromkeys(value))


def _headers(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise InvalidField("headers", "must be an object of header names to strings")
    out = []
    for name, text in value.items():
        field = f"headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise InvalidField(field, "is not a valid header field name")
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("x-sendarix-"):
            raise InvalidField(field, "is set by the relay and cannot be given")
        checked = _header_text(text, field)
        assert checked is not None or text is None
        if checked is None:
            raise InvalidField(field, "must be a string")
        out.append((name, checked))
    return out


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField("metadata", "must be an object of strings")
    if len(value) > MAX_METADATA:
        raise InvalidField("metadata", f"has more than {MAX_METADATA} keys")
    for key, text in value.items():
        if not isinstance(text, str) or len(key) > 64 or len(text) > 500:
            raise InvalidField(f"metadata.{key}", "must be a string of at most 500 characters")
    return dict(value)


def _attachments(value: Any, message: EmailMessage) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise InvalidField("attachments", "must be a list")
    for i, item in enumerate(value):
        field = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise InvalidField(field, "must be an object")
        unknown = set(item) - {"filename", "content_type", "content_b64"}
        if unknown:
            raise InvalidField(f"{field}.{sorted(unknown)[0]}", "is not a known field")
        filename = _header_text(item.get("filename"), f"{field}.filename")
        if not filename:
            raise InvalidField(f"{field}.filename", "is required")
        ctype = _string(item.get("content_type"), f"{field}.content_type", max_len=255)
        ctype = ctype or "application/octet-stream"
        maintype, _, subtype = ctype.partition("/")
        if not re.fullmatch(r"[A-Za-z0-9.+-]+", maintype) or not re.fullmatch(
            r"[A-Za-z0-9.+-]+", subtype
        ):
            raise InvalidField(f"{field}.content_type", "must be a MIME type like text/csv")
        encoded = _string(item.get("content_b64"), f"{field}.content_b64",
                          max_len=1 << 30, required=True)
        assert encoded is not None
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidField(f"{field}.content_b64", "is not valid base64") from None
        message.add_attachment(
            data, maintype=maintype.lower(), subtype=subtype.lower(), filename=filename
        )


def _cte(text: str) -> str:
    return "7bit" if text.isascii() and max(map(len, text.splitlines() or [""])) <= 900 else (
        "quoted-printable"
    )


def compose(fields: Mapping[str, Any]) -> ComposedMessage:
    """The message a ``POST /v1/messages`` body describes (structured or ``raw_b64``).

    Raises :obj:`InvalidField` for anything wrong; templates must have been rendered
    into ``subject``/``text``/``html`` before.
    """
    unknown = set(fields) - MESSAGE_FIELDS
    if unknown:
        raise InvalidField(sorted(unknown)[0], "is not a known field")
    if fields.get("raw_b64") is not None:
        return _raw(fields)
    sender_text = _string(fields.get("from"), "from", required=True)
    assert sender_text is not None
    sender_name, sender = _mailbox(sender_text, "from")
    to = _address_list(fields.get("to"), "to")
    cc = _address_list(fields.get("cc"), "cc")
    bcc = _address_list(fields.get("bcc"), "bcc")
    recipients = tuple(dict.fromkeys(a for _, a in (*to, *cc, *bcc)))
    if not recipients:
        raise InvalidField("to", "at least one recipient (to, cc or bcc) is required")
    reply_to = _address_list(fields.get("reply_to"), "reply_to")
    subject = _header_text(fields.get("subject"), "subject")
    text = _string(fields.get("text"), "text", max_len=1 << 30)
    html = _string(fields.get("html"), "html", max_len=1 << 30)
    if text is None and html is None and not fields.get("attachments"):
        raise InvalidField("text", "a message needs text, html or an attachment")
    tags = _tags(fields.get("tags"))
    metadata = _metadata(fields.get("metadata"))
    headers = _headers(fields.get("headers"))

    utf8 = not all(a.isascii() for a in (sender, *recipients))
    message = EmailMessage(policy=SMTPUTF8 if utf8 else SMTP)
    message["From"] = _format([(sender_name, sender)])
    if to:
        message["To"] = _format(to)
    if cc:
        message["Cc"] = _format(cc)
    if reply_to:
        message["Reply-To"] = _format(reply_to)
    if subject is not None:
        message["Subject"] = subject
    for name, value in headers:
        message[name] = value
    if metadata:
        # Like other sending services, the metadata travels with the message, so a
        # reply or a bounce that quotes the headers can be matched to it.
        message["X-Metadata"] = json.dumps(metadata, separators=(",", ":"), sort_keys=True)
    if tags:
        message["X-Sendarix-Tags"] = ", ".join(tags)
    # Quoted-printable keeps non-ASCII text 7-bit clean, so no hop needs 8BITMIME.
    if text is not None:
        message.set_content(text, cte=_cte(text))
    if html is not None:
        if text is None:
            message.set_content(html, subtype="html", cte=_cte(html))
        else:
            message.add_alternative(html, subtype="html", cte=_cte(html))
    if text is None and html is None:
        message.set_content("")
    _attachments(fields.get("attachments"), message)
    body = message.as_bytes()
    return ComposedMessage(sender, recipients, body, tags, utf8)


def _raw(fields: Mapping[str, Any]) -> ComposedMessage:
    """``raw_b64``: the message as given; ``from`` and ``to`` (plus cc, bcc) make the
    envelope, since the headers of a raw message need not name every recipient."""
    extra = set(fields) - {"raw_b64", "from", "to", "cc", "bcc", "tags", "send_at", "dsn"}
    if extra:
        raise InvalidField(sorted(extra)[0], "cannot be combined with raw_b64")
    encoded = _string(fields.get("raw_b64"), "raw_b64", max_len=1 << 30, required=True)
    assert encoded is not None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField("raw_b64", "is not valid base64") from None
    sender_text = _string(fields.get("from"), "from", required=True)
    assert sender_text is not None
    _, sender = _mailbox(sender_text, "from")
    recipients = tuple(dict.fromkeys(
        a for key in ("to", "cc", "bcc") for _, a in _address_list(fields.get(key), key)
    ))
    if not recipients:
        raise InvalidField("to", "at least one recipient (to, cc or bcc) is required")
    # One line-ending convention on the way in: bare LF or CR become CR LF.
    normalized = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    if not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    first = normalized.split(b"\r\n", 1)[0]
    if not re.fullmatch(rb"[!-9;-~]+:.*", first):
        raise InvalidField("raw_b64", "is not an RFC 5322 message (it must start with a header)")
    tags = _tags(fields.get("tags"))
    if tags:
        normalized = b"X-Sendarix-Tags: " + ", ".join(tags).encode() + b"\r\n" + normalized
    utf8 = not all(a.isascii() for a in (sender, *recipients))
    return ComposedMessage(sender, recipients, normalized, tags, utf8)

