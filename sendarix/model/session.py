"""Value types of one outbound session: where it goes (:class:`Hop`), what it carries
(:class:`OutboundMessage`), how it is held (:class:`SessionOptions`) and what came of
it (:class:`SessionResult`), whichever transport (SMTP, the simulator) carries it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from attrs import field, frozen

from sendarix.model.message import Reply, TLSInfo

__all__ = [
    "SIMULATOR_TRANSPORT",
    "SMTP_TRANSPORT",
    "Hop",
    "MessageResult",
    "OutboundMessage",
    "RecipientReply",
    "SessionOptions",
    "SessionResult",
]

#: The transport of hops reached over SMTP (MX hosts, smarthosts).
SMTP_TRANSPORT = "smtp"
#: The transport of the simulator's hop: answered inside the node, nothing sent.
SIMULATOR_TRANSPORT = "simulator"


@frozen
class Hop:
    """One address to try: ``host`` is the MX host name (or smarthost) it came from.

    Smarthost hops (endpoint pools) also carry their ``endpoint`` key (for health), a
    TLS policy overriding ``[delivery] tls``, and AUTH credentials.  ``transport``
    names what carries the session (:data:`SMTP_TRANSPORT` or
    :data:`SIMULATOR_TRANSPORT`).
    """

    host: str
    address: str
    port: int
    preference: int
    endpoint: str | None = None
    tls: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    transport: str = SMTP_TRANSPORT


@frozen
class OutboundMessage:
    """One message to send: envelope and final body bytes (CRLF line endings).

    ``attempts`` holds, per recipient (in order), the attempts it had before this one
    (empty: none for any); the simulator answers by them, SMTP ignores them.
    """

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes = field(repr=lambda b: f"<{len(b)} bytes>")
    smtputf8: bool = False
    eight_bit: bool = False
    attempts: tuple[int, ...] = ()

    def attempts_of(self, index: int) -> int:
        """The earlier attempts of the ``index``-th recipient."""
        return self.attempts[index] if index < len(self.attempts) else 0


@frozen
class RecipientReply:
    """The destination's (or our synthesized) reply for one recipient."""

    address: str
    reply: Reply


@frozen
class MessageResult:
    """The outcome of one message.

    Each recipient's reply is its RCPT refusal if it was refused, otherwise the reply
    that decided the transaction (end of data, or a MAIL/DATA refusal, or a synthesized
    reply when the session broke).  ``message_reply`` is that deciding reply, or None
    when every recipient was refused at RCPT.
    """

    queue_id: str
    recipients: tuple[RecipientReply, ...]
    message_reply: Reply | None


@frozen
class SessionResult:
    """The outcome of one session: a result for every message given to the transport.

    ``connect_error`` is set (and also given to every recipient) when no session took
    place; ``greeted`` is False when the connection ended (or timed out) before a 220
    greeting; ``tls`` is the negotiated TLS version and cipher, if any.  ``mx_ip`` and
    ``source_ip`` are the addresses of the two ends (None: no socket, the simulator).
    ``unsent`` names the messages the ``pace`` callback held back: they have no result.
    """

    results: tuple[MessageResult, ...]
    connect_error: Reply | None
    tls: TLSInfo | None
    mx_ip: str | None
    source_ip: str | None
    greeted: bool = True
    unsent: tuple[str, ...] = ()


@frozen
class SessionOptions:
    """How one session is held, beside its hop: our EHLO name, the TLS policy (the
    stricter of the site's and the hop's; ``trust_root`` verifies certificates, None:
    the platform's), the source address to bind (None: the system's), timeouts, the
    per-message ``pace`` callback (True: send the next message, False: stop there),
    and session reuse: the caller's site, how many sessions of it may rest
    (``cache_room``), and the most messages one session carries (0: no limit)."""

    helo: str
    tls: str = "may"
    trust_root: object = None
    bind_address: str | None = None
    connect_timeout: float = 5.0
    command_timeout: float = 300.0
    greeting_timeout: float | None = None
    pace: Callable[[], Awaitable[bool]] | None = None
    cache_site: str = ""
    cache_room: Callable[[], int] = lambda: 1
    reuse_limit: int = 0
