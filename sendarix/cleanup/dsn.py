"""Delivery status notifications (RFC 3464) for the sender: a multipart/report that
names each failed recipient with its status and the receiving server's reply.

Pure: the DSN's bytes from plain values.  The node sends it from the null sender
``<>`` to the original envelope sender, through the normal path (cleanup, DKIM,
spool, delivery), so a DSN that fails is never answered with another.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from attrs import frozen

#: The most of the original message a DSN returns with RET=FULL (then headers only).
MAX_RETURNED = 256 * 1024


@frozen
class Failure:
    """One recipient the DSN reports: its address, ORCPT, what happened (``failed``
    or ``delayed``), enhanced status, the reply text and the server that gave it."""

    recipient: str
    orcpt: str | None
    action: str
    status: str
    diagnostic: str
    remote_mta: str | None = None


def _header_of(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def build_dsn(
    hostname: str,
    sender: str,
    envid: str | None,
    failures: Sequence[Failure],
    original: bytes,
    ret_full: bool,
    now: float,
) -> bytes:
    """The DSN to ``sender`` about ``failures`` of ``original``."""
    boundary = f"dsn-{secrets.token_hex(8)}"
    date = format_datetime(datetime.fromtimestamp(now, UTC))
    lines = "\r\n".join(f"  {f.recipient}: {f.diagnostic}" for f in failures)
    actions = {f.action for f in failures}
    if "failed" in actions:
        subject = "Undelivered Mail Returned to Sender"
        intro = "Your message could not be delivered to the following recipients:"
    elif "delayed" in actions:
        subject = "Delayed Mail (still being retried)"
        intro = ("Your message has not been delivered yet; the mail system keeps trying "
                 "for these recipients:")
    else:
        subject = "Successful Mail Delivery Report"
        intro = "Your message was delivered to the following recipients:"
    human = f"This is the mail system at {hostname}.\r\n\r\n{intro}\r\n\r\n{lines}\r\n"
    per_message = f"Reporting-MTA: dns; {hostname}\r\n"
    if envid:
        per_message += f"Original-Envelope-Id: {envid}\r\n"
    per_message += f"Arrival-Date: {date}\r\n"
    per_recipient = ""
    for f in failures:
        per_recipient += "\r\n"
        if f.orcpt:
            per_recipient += f"Original-Recipient: {f.orcpt}\r\n"
        per_recipient += (f"Final-Recipient: rfc822; {f.recipient}\r\nAction: {f.action}\r\n"
                          f"Status: {f.status}\r\n")
        if f.remote_mta:
            per_recipient += f"Remote-MTA: dns; {f.remote_mta}\r\n"
        per_recipient += f"Diagnostic-Code: smtp; {f.diagnostic}\r\n"
    full = ret_full and len(original) <= MAX_RETURNED
    returned_type = "message/rfc822" if full else "text/rfc822-headers"
    returned = original if full else _header_of(original)
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: {sender}\r\nSubject: {subject}\r\nDate: {date}\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"'
        "\r\n\r\n"
    )
    return (
        head.encode()
        + f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{human}\r\n".encode()
        + f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n".encode()
        + (per_message + per_recipient).encode()
        + f"\r\n--{boundary}\r\nContent-Type: {returned_type}\r\n\r\n".encode()
        + returned
        + f"\r\n--{boundary}--\r\n".encode()
    )
