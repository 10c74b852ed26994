"""What a sink runs with and what it records: its options, each received message
and the counters of the stats file."""

from __future__ import annotations

import re
import socket
import time
from typing import Any

from attrs import define, field, frozen

from sendarix.control.cli.sink.faults import Fault
from sendarix.model.message import TLSInfo


def _positive_or_zero(_inst: Any, attribute: Any, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0")


@frozen
class SinkOptions:
    """How a sink runs.  ``max_message_size`` 0 means no limit (advertised ``SIZE 0``);
    ``max_messages`` bounds the in-memory list (only used without ``maildir``);
    ``idle_timeout`` 0 disables the idle timeout."""

    listen: tuple[str, ...] = ("tcp:2526:interface=127.0.0.1",)
    hostname: str = field(factory=socket.gethostname)
    maildir: str | None = None
    certificate: str | None = None
    key: str | None = None
    faults: tuple[Fault, ...] = ()
    stats_file: str | None = None
    verbose: bool = False
    chunking: bool = False
    max_message_size: int = field(default=100 * 1024 * 1024, validator=_positive_or_zero)
    max_recipients: int = field(default=1000, validator=_positive_or_zero)
    max_messages: int = field(default=10000, validator=_positive_or_zero)
    idle_timeout: float = field(default=300.0, validator=_positive_or_zero)
    auth: tuple[str, str] | None = field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate and key must be given together")


@frozen
class ReceivedMessage:
    """One message the sink answered 250 to.

    ``peer`` is the client's IP address, ``local`` the "host:port" it connected to,
    ``message_id`` the Message-ID header value as written (brackets included), or None.
    """

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes = field(repr=lambda b: f"<{len(b)} bytes>")
    helo: str = ""
    esmtp: bool = True
    peer: str = ""
    peer_port: int = 0
    local: str = ""
    tls: TLSInfo | None = None
    received_at: float = 0.0
    message_id: str | None = None
    mail_params: tuple[str, ...] = ()
    auth_user: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The envelope and connection facts as JSON-able values (without the body)."""
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "helo": self.helo,
            "esmtp": self.esmtp,
            "peer": self.peer,
            "peer_port": self.peer_port,
            "local": self.local,
            "tls": self.tls.to_dict() if self.tls else None,
            "received_at": self.received_at,
            "received": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.received_at)),
            "message_id": self.message_id,
            "mail_params": list(self.mail_params),
            "auth_user": self.auth_user,
            "size": len(self.body),
        }


@define
class SinkStats:
    """Counters of one sink; ``max_concurrent`` is the most connections open at once,
    ``max_concurrent_by_peer`` the same per client address."""

    connections: int = 0
    active: int = 0
    max_concurrent: int = 0
    messages: int = 0
    recipients: int = 0
    bytes: int = 0
    rejected_recipients: int = 0
    rejected_messages: int = 0
    message_ids: list[str] = field(factory=list)
    active_by_peer: dict[str, int] = field(factory=dict)
    max_concurrent_by_peer: dict[str, int] = field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The counters as a JSON-able dict (the stats file's content)."""
        return {
            "connections": self.connections,
            "active": self.active,
            "max_concurrent": self.max_concurrent,
            "messages": self.messages,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "rejected_recipients": self.rejected_recipients,
            "rejected_messages": self.rejected_messages,
            "message_ids": list(self.message_ids),
            "max_concurrent_by_peer": dict(self.max_concurrent_by_peer),
        }


_MESSAGE_ID_RE = re.compile(rb"(?im)^message-id:[ \t]*(?:\r?\n[ \t]+)?([^\r\n]*)")


def message_id_of(body: bytes) -> str | None:
    """The Message-ID header value of ``body`` (searched in the header section only)."""
    end = body.find(b"\r\n\r\n", 0, 65536)
    head = body[: end + 2] if end >= 0 else body[:65536]
    if body.startswith(b"\r\n"):
        return None
    m = _MESSAGE_ID_RE.search(head)
    if not m:
        return None
    value = m.group(1).strip().decode("utf-8", "replace")
    return value or None


