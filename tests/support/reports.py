"""Reports as mailbox providers send them, written out as they appear on the wire:
ARF feedback reports (RFC 5965) and delivery status notifications (RFC 3464), after
the RFCs' examples."""

from __future__ import annotations


def _header_of(original: bytes) -> bytes:
    return original.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def arf(original: bytes, recipient: str | None, feedback_type: str = "abuse",
        reporter: str = "fbl@provider.test", to: str = "abuse@fbl.relay.test") -> bytes:
    """An ARF report about ``original`` (its header returned as text/rfc822-headers),
    with ``Original-Rcpt-To: recipient`` unless None (redacted)."""
    rcpt = f"Original-Rcpt-To: {recipient}\r\n".encode() if recipient else b""
    return (
        f"From: {reporter}\r\nTo: {to}\r\nSubject: FW: complaint\r\n"
        "MIME-Version: 1.0\r\nMessage-ID: <report-1@provider.test>\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b1"\r\n'
        "\r\n--b1\r\nContent-Type: text/plain\r\n\r\n"
        "This is an email abuse report for an email message received.\r\n"
        "\r\n--b1\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: ProviderFBL/1.0\r\nVersion: 1\r\n"
    ).encode() + rcpt + (
        b"\r\n--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ) + _header_of(original) + b"\r\n--b1--\r\n"


def dsn(original: bytes, recipient: str, action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 user unknown",
        to: str = "bounces@fbl.relay.test") -> bytes:
    """A delivery status notification for ``recipient`` of ``original``."""
    return (
        f"From: MAILER-DAEMON@mx.provider.test\r\nTo: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b2"\r\n'
        "\r\n--b2\r\nContent-Type: text/plain\r\n\r\nThe message could not be delivered.\r\n"
        "\r\n--b2\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.provider.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: {diagnostic}\r\n"
        "\r\n--b2\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ).encode() + _header_of(original) + b"\r\n--b2--\r\n"
