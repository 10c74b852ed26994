"""Value objects shared by the whole mail path: envelopes, replies, spool records.

Everything here is a frozen attrs class with no behaviour beyond conversion to and
from versioned JSON-able dicts; stores persist those dicts, never pickles.
"""

from __future__ import annotations

import enum
from typing import Any

from attrs import field, frozen


class RecipientStatus(enum.Enum):
    """Where one recipient of a spooled message stands."""

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"

    @property
    def final(self) -> bool:
        """True once nothing more will be attempted for this recipient."""
        return self not in (RecipientStatus.PENDING, RecipientStatus.DEFERRED)


@frozen
class Reply:
    """An SMTP reply: code, enhanced status code (``"5.1.1"`` or None), text."""

    code: int
    enhanced: str | None
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Reply | None:
        if d is None:
            return None
        return cls(code=int(d["code"]), enhanced=d.get("enhanced"), text=str(d.get("text", "")))


@frozen
class TLSInfo:
    """The TLS protocol version and cipher of a connection."""

    version: str
    cipher: str

    def to_dict(self) -> dict[str, str]:
        return {"version": self.version, "cipher": self.cipher}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TLSInfo | None:
        if not d:
            return None
        return cls(version=str(d["version"]), cipher=str(d["cipher"]))


@frozen
class Envelope:
    """The SMTP envelope of an accepted message.

    ``sender`` is the reverse-path without brackets ("" for the null path);
    ``body`` is the MAIL FROM BODY= value ("7BIT", "8BITMIME", "BINARYMIME") or None.
    """

    sender: str
    recipients: tuple[str, ...]
    body: str | None = None
    smtputf8: bool = False
    #: Delivery status notification requests (RFC 3461): ``RET`` (``FULL``/``HDRS``),
    #: ``ENVID``, and per recipient ``NOTIFY`` and ``ORCPT`` as (address, value) pairs.
    ret: str | None = None
    envid: str | None = None
    notify: tuple[tuple[str, str], ...] = ()
    orcpt: tuple[tuple[str, str], ...] = ()

    def notify_of(self, recipient: str) -> str | None:
        """The ``NOTIFY`` the client gave for ``recipient`` (None: it gave none)."""
        return dict(self.notify).get(recipient)

    def orcpt_of(self, recipient: str) -> str | None:
        return dict(self.orcpt).get(recipient)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sender": self.sender,
            "recipients": list(self.recipients),
            "body": self.body,
            "smtputf8": self.smtputf8,
        }
        # Only when asked for: stored envelopes stay as they were for most mail.
        if self.ret or self.envid or self.notify or self.orcpt:
            d["dsn"] = {"ret": self.ret, "envid": self.envid,
                        "notify": [list(p) for p in self.notify],
                        "orcpt": [list(p) for p in self.orcpt]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        dsn = d.get("dsn") or {}
        return cls(
            sender=d["sender"],
            recipients=tuple(d["recipients"]),
            ret=dsn.get("ret"),
            envid=dsn.get("envid"),
            notify=tuple((str(a), str(v)) for a, v in dsn.get("notify") or ()),
            orcpt=tuple((str(a), str(v)) for a, v in dsn.get("orcpt") or ()),
            body=d.get("body"),
            smtputf8=bool(d.get("smtputf8", False)),
        )


@frozen
class MessageMeta:
    """Where an accepted message came from and how it is to be treated."""

    tenant: str
    received_at: float
    client_ip: str = ""
    helo: str = ""
    credential: str | None = None
    listener: str = ""
    tls: TLSInfo | None = None
    message_id: str | None = None
    tags: tuple[str, ...] = ()
    stream: str | None = None
    node: str = ""
    #: From a sandbox credential: delivered only to the simulator, never sent out.
    sandbox: bool = False

    def to_dict(self) -> dict[str, Any]:
        extra = {"sandbox": True} if self.sandbox else {}
        return {
            **extra,
            "tenant": self.tenant,
            "received_at": self.received_at,
            "client_ip": self.client_ip,
            "helo": self.helo,
            "credential": self.credential,
            "listener": self.listener,
            "tls": self.tls.to_dict() if self.tls else None,
            "message_id": self.message_id,
            "tags": list(self.tags),
            "stream": self.stream,
            "node": self.node,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MessageMeta:
        return cls(
            tenant=d["tenant"],
            received_at=float(d["received_at"]),
            client_ip=d.get("client_ip", ""),
            helo=d.get("helo", ""),
            credential=d.get("credential"),
            listener=d.get("listener", ""),
            tls=TLSInfo.from_dict(d.get("tls")),
            message_id=d.get("message_id"),
            tags=tuple(d.get("tags", ())),
            stream=d.get("stream"),
            node=d.get("node", ""),
            sandbox=bool(d.get("sandbox", False)),
        )


@frozen
class NewMessage:
    """A message ready to be spooled: the body is final (headers added, signed)."""

    queue_id: str
    envelope: Envelope
    meta: MessageMeta
    body: bytes = field(repr=lambda b: f"<{len(b)} bytes>")
    #: A scheduled send: no delivery before this time (POSIX seconds; None: at once).
    not_before: float | None = None

    @property
    def due(self) -> float:
        """When the first delivery attempt is due."""
        received = self.meta.received_at
        return received if self.not_before is None else max(received, self.not_before)


@frozen
class RecipientRecord:
    """The stored state of one recipient."""

    address: str
    domain: str
    status: RecipientStatus
    attempts: int = 0
    next_attempt: float | None = None
    last_reply: Reply | None = None
    updated_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "domain": self.domain,
            "status": self.status.value,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_reply": self.last_reply.to_dict() if self.last_reply else None,
            "updated_at": self.updated_at,
        }


@frozen
class StoredMessage:
    """A spooled message as the queue commands and the API show it (no body)."""

    queue_id: str
    envelope: Envelope
    meta: MessageMeta
    size: int
    recipients: tuple[RecipientRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "envelope": self.envelope.to_dict(),
            "meta": self.meta.to_dict(),
            "size": self.size,
            "recipients": [r.to_dict() for r in self.recipients],
        }


@frozen
class Lease:
    """A node's claim on a delivery until ``expires`` (POSIX seconds)."""

    node: str
    expires: float


@frozen
class LeasedDelivery:
    """The recipients of one message at one destination domain, leased to a node."""

    queue_id: str
    domain: str
    envelope: Envelope
    meta: MessageMeta
    recipients: tuple[RecipientRecord, ...]
    lease: Lease


@frozen
class RecipientOutcome:
    """What one delivery attempt did for one recipient.

    ``status`` DELIVERED, BOUNCED, EXPIRED and SUPPRESSED are final; DEFERRED needs
    ``next_attempt``.
    """

    address: str
    status: RecipientStatus
    reply: Reply | None = None
    next_attempt: float | None = None


@frozen
class QueueStats:
    """Queue depth: recipients by status, and by destination domain and status."""

    messages: int
    by_status: dict[str, int]
    by_domain: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "by_status": self.by_status, "by_domain": self.by_domain}
