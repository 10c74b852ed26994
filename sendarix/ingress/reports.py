"""Reading the reports mailbox providers send back: ARF feedback reports (RFC 5965)
and delivery status notifications (RFC 3464), with the :mod:`email` package.

Pure: a report's bytes in, a :class:`Report` out (or None when the message is no
report we read).  What the report says about the original message (its reference
field, its Message-ID, its recipients) is taken from the report's own fields first
and from the returned original message's header second.
"""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

from attrs import frozen

from sendarix.cleanup.reference import HEADER as REFERENCE_HEADER


@frozen
class ReportedRecipient:
    """One recipient a report is about: its address, what happened (``complaint``,
    ``failed``, ``delayed``, ...), the enhanced status and the receiver's words."""

    address: str
    action: str
    status: str | None = None
    diagnostic: str | None = None


@frozen
class Report:
    """A complaint (``kind = "complaint"``, ARF ``abuse``), another ARF report
    (``kind = "feedback"``), or a delivery status notification (``kind = "dsn"``)."""

    kind: str
    recipients: tuple[ReportedRecipient, ...]
    reference: str | None
    message_id: str | None
    feedback_type: str | None = None


def _address(value: str | None) -> str | None:
    """The address of ``rfc822; user@example.com`` or ``<user@example.com>``."""
    if not value:
        return None
    text = value.split(";", 1)[1] if ";" in value else value
    text = text.strip().strip("<>").strip()
    return text.lower() if "@" in text else None


def _fields(text: str) -> list[dict[str, str]]:
    """The field groups of a message/feedback-report or message/delivery-status body
    (groups are separated by blank lines; names lowercased; folded lines joined)."""
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if current:
                groups.append(current)
                current, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            current[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        last = name.strip().lower()
        # A field may repeat (Original-Rcpt-To): keep them all, comma-separated.
        current[last] = f"{current[last]}, {value.strip()}" if last in current else value.strip()
    if current:
        groups.append(current)
    return groups


def _part_text(part: Message) -> str:
    payload: Any = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    # message/* parts parse into sub-messages: take their text back.
    inner = part.get_payload()
    if isinstance(inner, list):
        return "\n".join(str(p) for p in inner)
    return str(inner or "")


def _original_headers(report: Message) -> Message | None:
    """The returned original message's header (message/rfc822 or
    text/rfc822-headers part), or None."""
    for part in report.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
        if ctype in ("text/rfc822-headers", "message/rfc822-headers",
                     "message/global-headers"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return BytesHeaderParser(policy=policy.compat32).parsebytes(data)
    return None


def _bare(value: str) -> str:
    """The address inside ``Name <address>`` (or the value itself)."""
    inner = re.search(r"<([^<>]+)>", value)
    return inner.group(1) if inner else value


def _message_id(value: str | None) -> str | None:
    if not value:
        return None
    inner = re.search(r"<([^<>]+)>", value)
    return (inner.group(1) if inner else value).strip() or None


def parse_report(data: bytes) -> Report | None:
    """The report ``data`` holds, or None when it is neither ARF nor a DSN."""
    message = message_from_bytes(data, policy=policy.compat32)
    if message.get_content_type() != "multipart/report":
        return None
    report_type = (message.get_param("report-type") or "")
    report_type = report_type.lower() if isinstance(report_type, str) else ""
    original = _original_headers(message)
    reference = original.get(REFERENCE_HEADER) if original is not None else None
    message_id = _message_id(original.get("Message-ID")) if original is not None else None
    if report_type == "feedback-report":
        return _arf(message, original, reference, message_id)
    if report_type == "delivery-status":
        return _dsn(message, reference, message_id)
    return None


def _arf(
    message: Message, original: Message | None, reference: str | None, message_id: str | None
) -> Report | None:
    part = next((p for p in message.walk()
                 if p.get_content_type() == "message/feedback-report"), None)
    if part is None:
        return None
    groups = _fields(_part_text(part))
    fields = groups[0] if groups else {}
    feedback_type = fields.get("feedback-type", "").strip().lower() or None
    rcpts = [a for v in fields.get("original-rcpt-to", "").split(",") if (a := _address(v))]
    if not rcpts and original is not None:
        # No Original-Rcpt-To (many providers redact it): the original's To, when it
        # names one address, is the recipient who complained.
        to = [a for v in str(original.get("To", "")).split(",") if (a := _address(_bare(v)))]
        rcpts = to if len(to) == 1 else []
    message_id = message_id or _message_id(fields.get("original-message-id"))
    kind = "complaint" if feedback_type == "abuse" else "feedback"
    return Report(kind, tuple(ReportedRecipient(a, kind) for a in rcpts), reference,
                  message_id, feedback_type)


def _dsn(message: Message, reference: str | None, message_id: str | None) -> Report | None:
    part = next((p for p in message.walk()
                 if p.get_content_type() in ("message/delivery-status",
                                             "message/global-delivery-status")), None)
    if part is None:
        return None
    groups = _fields(_part_text(part))
    per_message, per_recipient = (groups[0], groups[1:]) if len(groups) > 1 else ({}, groups)
    recipients = []
    for fields in per_recipient:
        address = _address(fields.get("original-recipient")) or _address(
            fields.get("final-recipient"))
        action = fields.get("action", "").strip().lower()
        if address is None or not action:
            continue
        status = (fields.get("status") or "").strip().split(" ")[0] or None
        diagnostic = fields.get("diagnostic-code")
        if diagnostic and ";" in diagnostic:
            diagnostic = diagnostic.split(";", 1)[1].strip()
        recipients.append(ReportedRecipient(address, action, status, diagnostic))
    if not recipients:
        return None
    envid = per_message.get("original-envelope-id")
    return Report("dsn", tuple(recipients), reference, message_id, envid)

