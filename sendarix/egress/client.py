"""The egress ESMTP client: one session to one destination host, several messages.

:func:`deliver` connects, says EHLO, negotiates STARTTLS by policy and sends each
:class:`OutboundMessage` in turn, answering with a :class:`SessionResult` in which every
message and every recipient has a definite reply, whatever happens to the connection.

Why not ``twisted.mail.smtp.ESMTPClient``: its dot-stuffing corrupts messages (CRLF input,
first line, 16 KiB chunk boundaries), it never pipelines, sends no MAIL FROM parameters,
forgets the EHLO capabilities, RSETs after every message and its sender factory's
Deferred never fires when the server drops the connection (docs/library-defects.md).  Working
around all of that costs more than this small protocol: :class:`_SMTPConnection` only
frames replies and matches them, in order, to the commands sent (a queue of Deferreds,
so pipelining is just "send several, then await several"); the dialogue itself is one
coroutine, :func:`_session`, which reads top to bottom like the RFC 5321 exchange.
A lost connection or a timeout fails every waiting Deferred, and the coroutine turns
that into a 4xx reply for whatever is still unanswered.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from attrs import define, field
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sendarix.egress.replies import parse_reply_lines
from sendarix.egress.transport import EagerConnecting
from sendarix.interfaces import ITransport
from sendarix.model.message import Reply, TLSInfo
from sendarix.model.session import (
    Hop,
    MessageResult,
    OutboundMessage,
    RecipientReply,
    SessionOptions,
    SessionResult,
)

log = Logger()

__all__ = [
    "SessionCache",
    "SmtpTransport",
    "client_endpoint",
    "deliver",
    "dot_stuff",
    "is_ipv6",
]

TLS_POLICIES = ("may", "encrypt", "verify")

# A reply line longer than this is a broken or hostile server, not SMTP.
_MAX_REPLY_LINE = 8192
# QUIT is a courtesy: do not wait long for its answer.
_QUIT_TIMEOUT = 10.0


# --------------------------------------------------------------------------- values


def dot_stuff(body: bytes) -> bytes:
    """``body`` as DATA content: every line starting with "." gets another "." (the
    first line too), a final CRLF is added if missing, and the end marker follows."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    # A line starts after any LF (a bare one too, as receivers read it); bytes.replace
    # does this in C, several times faster than a multi-line regex on every message.
    stuffed = body.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


# --------------------------------------------------------------------------- protocol


class _SessionBrokenError(Exception):
    """The session ended early; ``reply`` is what unanswered messages get."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@define(eq=False)
class _Response:
    """A complete reply and its raw lines (the EHLO capabilities live in them)."""

    reply: Reply
    lines: list[bytes]


class _SMTPConnection(Protocol):
    """Frames replies and hands them, in order, to the Deferreds of the commands sent.

    The banner is the first expected reply.  Each wait has ``timeout`` seconds, counted
    from when it becomes the oldest outstanding one; on expiry the connection is aborted.
    When the connection ends every outstanding Deferred fails with :class:`_SessionBrokenError`.
    """

    def __init__(
        self, reactor: Any, timeout: float, greeting_timeout: float | None = None
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.closed: Deferred[None] = Deferred()
        self.last_421: Reply | None = None
        self._buf = b""
        self._lines: list[bytes] = []
        self._waiting: deque[tuple[Deferred[_Response], str, float]] = deque()
        self._timer: IDelayedCall | None = None
        #: The command whose reply the timer waits for.
        self._timer_for = ""
        self._broken: Reply | None = None
        self._connected = False
        self.banner = self.expect("banner", greeting_timeout)

    @property
    def t(self) -> Any:
        """The TCP (later TLS) transport, untyped: we use its non-ITransport methods."""
        return self.transport

    # ---- commands

    def expect(self, what: str, timeout: float | None = None) -> Deferred[_Response]:
        """A Deferred for the next reply not yet claimed (``what`` names it in errors)."""
        d: Deferred[_Response] = Deferred()
        if self._broken is not None:
            d.errback(_SessionBrokenError(self._broken))
            return d
        self._waiting.append((d, what, self.timeout if timeout is None else timeout))
        if len(self._waiting) == 1 and self._connected:
            self._arm()
        return d

    def send(self, *commands: str) -> list[Deferred[_Response]]:
        """Write the command lines in one segment; a Deferred per command's reply."""
        if self._broken is None:
            self.t.write(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
        return [self.expect(c.split(" ", 1)[0].upper()) for c in commands]

    def command(self, line: str, timeout: float | None = None) -> Deferred[_Response]:
        """Send one command line; fires with its reply."""
        if self._broken is None:
            self.t.write(line.encode("utf-8") + b"\r\n")
        return self.expect(line.split(" ", 1)[0].upper(), timeout)

    def write(self, data: bytes) -> None:
        """Raw bytes (the message content)."""
        if self._broken is None:
            self.t.write(data)

    # ---- timers

    def _arm(self) -> None:
        if not self._waiting:
            self._disarm()
            return
        _, self._timer_for, timeout = self._waiting[0]
        if self._timer is not None and self._timer.active():
            # Every reply re-arms the timer: moving it is cheaper than a new one.
            self._timer.reset(timeout)
        else:
            self._timer = self.reactor.callLater(timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        what = self._timer_for
        self._break(Reply(451, "4.4.2", f"timeout waiting for the reply to {what}"))
        self.t.abortConnection()

    # ---- connection events

    def connectionMade(self) -> None:
        self._connected = True
        # Without it a reused connection stalls on delayed ACKs (docs/library-defects.md).
        self.t.setTcpNoDelay(True)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while self._broken is None:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > _MAX_REPLY_LINE:
                    self._protocol_error("reply line too long")
                return
            line, self._buf = self._buf[: i + 1].rstrip(b"\r\n"), self._buf[i + 1 :]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._protocol_error(f"malformed reply line {line[:80]!r}")
                return
            self._lines.append(line)
            if line[3:4] == b"-":
                continue
            lines, self._lines = self._lines, []
            if any(x[:3] != line[:3] for x in lines):
                self._protocol_error("reply lines with different codes")
                return
            self._answer(_Response(parse_reply_lines(lines), lines))

    def _answer(self, response: _Response) -> None:
        if response.reply.code == 421:
            # The server is closing: this reply is what the rest of the session gets.
            self.last_421 = response.reply
        if not self._waiting:
            log.debug("unsolicited reply {reply}", reply=response.reply)
            return
        d, _, _ = self._waiting.popleft()
        self._arm()
        d.callback(response)

    def _protocol_error(self, why: str) -> None:
        self._break(Reply(451, "4.5.0", f"SMTP protocol error: {why}"))
        self.t.abortConnection()

    def _break(self, reply: Reply) -> None:
        """Fail every outstanding wait with ``reply`` (the first cause wins)."""
        if self._broken is None:
            self._broken = reply
        self._disarm()
        waiting, self._waiting = self._waiting, deque()
        for d, _, _ in waiting:
            d.errback(_SessionBrokenError(self._broken))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        lost = self.last_421 or Reply(451, "4.4.2", "connection lost")
        if reason is not None and self._broken is None and self.last_421 is None:
            lost = Reply(451, "4.4.2", f"connection lost: {reason.getErrorMessage()}")
        self._break(lost)
        self.closed.callback(None)


# --------------------------------------------------------------------------- session


def _capabilities(lines: list[bytes]) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters; the greeting line is skipped."""
    caps: dict[str, str] = {}
    for raw in lines[1:]:
        text = raw[4:].decode("utf-8", errors="replace").strip()
        if text:
            keyword, _, params = text.partition(" ")
            caps[keyword.upper()] = params.strip()
    return caps


def _all_get(messages: Sequence[OutboundMessage], reply: Reply) -> list[MessageResult]:
    return [
        MessageResult(m.queue_id, tuple(RecipientReply(r, reply) for r in m.recipients), reply)
        for m in messages
    ]


@define
class _Options:
    helo: str
    tls: str
    tls_hostname: str
    trust_root: Any
    host: str
    auth: tuple[str, str] | None = field(default=None, repr=False)
    pace: Callable[[], Awaitable[bool]] | None = None


@define
class _State:
    """What the session coroutine learned so far (read by :func:`deliver`)."""

    results: list[MessageResult] = field(factory=list)
    tls: TLSInfo | None = None
    greeted: bool = False
    unsent: tuple[str, ...] = ()
    #: The session came from a :class:`SessionCache`.
    reused: bool = False


async def _hello(conn: _SMTPConnection, helo: str) -> tuple[Reply, dict[str, str] | None]:
    """EHLO, falling back to HELO on a 5xx; (final reply, capabilities or None)."""
    ehlo = await conn.command(f"EHLO {helo}")
    if ehlo.reply.code == 250:
        return ehlo.reply, _capabilities(ehlo.lines)
    if ehlo.reply.code // 100 != 5:
        return ehlo.reply, None
    helo_r = await conn.command(f"HELO {helo}")
    return helo_r.reply, {}


def _tls_context(opts: _Options) -> Any:
    if opts.tls == "verify":
        # Authenticated TLS is for destinations that must be trusted: nothing older
        # than TLS 1.2, whatever the system's OpenSSL would allow.
        return ssl.optionsForClientTLS(
            opts.tls_hostname, trustRoot=opts.trust_root,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )
    # may/encrypt: encryption without authentication, as for opportunistic SMTP TLS.
    return ssl.CertificateOptions()


async def _starttls(conn: _SMTPConnection, opts: _Options, state: _State) -> dict[str, str] | None:
    """STARTTLS and the second EHLO; the new capabilities, or None to go on in clear."""
    required = opts.tls != "may"
    r = await conn.command("STARTTLS")
    if r.reply.code != 220:
        if required:
            raise _SessionBrokenError(
                Reply(451, "4.7.4", f"TLS required but STARTTLS failed: {r.reply.text}")
            )
        return None
    conn.t.startTLS(_tls_context(opts))
    try:
        reply, caps = await _hello(conn, opts.helo)
    except _SessionBrokenError as e:
        if conn.last_421 is None:
            raise _SessionBrokenError(
                Reply(451, "4.7.5", f"TLS negotiation failed: {e.reply.text}")
            ) from e
        raise
    if reply.code != 250 or caps is None:
        raise _SessionBrokenError(reply if reply.code // 100 in (4, 5) else _lost(conn))
    try:
        handle = conn.t.getHandle()
        state.tls = TLSInfo(
            version=str(handle.get_protocol_version_name()),
            cipher=str(handle.get_cipher_name()),
        )
    except Exception:
        state.tls = TLSInfo(version="unknown", cipher="unknown")
    return caps


async def _authenticate(
    conn: _SMTPConnection, opts: _Options, state: _State, caps: dict[str, str]
) -> None:
    """AUTH PLAIN with the smarthost credentials; only inside TLS.  Any failure defers
    (a wrong password is our configuration, never the recipients' fault)."""
    assert opts.auth is not None
    if state.tls is None:
        raise _SessionBrokenError(
            Reply(451, "4.7.0", f"refusing to send AUTH credentials to {opts.host} without TLS")
        )
    mechanisms = caps.get("AUTH", "").upper().split()
    if "PLAIN" not in mechanisms:
        raise _SessionBrokenError(
            Reply(451, "4.7.0", f"{opts.host} does not offer AUTH PLAIN")
        )
    username, password = opts.auth
    token = base64.b64encode(
        b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
    ).decode("ascii")
    r = (await conn.command(f"AUTH PLAIN {token}")).reply
    if r.code == 235:
        return
    if r.code == 421:
        raise _SessionBrokenError(r)
    raise _SessionBrokenError(
        Reply(451, "4.7.8", f"AUTH refused by {opts.host}: {r.code} {r.text}")
    )


def _lost(conn: _SMTPConnection) -> Reply:
    return conn.last_421 or Reply(451, "4.4.2", "unexpected reply, session abandoned")


async def _transaction(
    conn: _SMTPConnection, message: OutboundMessage, caps: dict[str, str]
) -> MessageResult:
    """MAIL, RCPTs, DATA and the content of one message; its result.

    Raises :class:`_SessionBrokenError` when the session ends mid-way; the caller then
    completes this message with the replies gathered so far (see ``partial``).
    """
    params = []
    if "SIZE" in caps:
        params.append(f"SIZE={len(message.body)}")
    if message.eight_bit and "8BITMIME" in caps:
        params.append("BODY=8BITMIME")
    if message.smtputf8:
        params.append("SMTPUTF8")
    mail = " ".join([f"MAIL FROM:<{message.sender}>", *params])
    rcpts = [f"RCPT TO:<{r}>" for r in message.recipients]
    refused: dict[int, Reply] = {}
    accepted: list[int] = []
    partial = _Partial(message, refused)
    waits: list[Deferred[_Response]] = []
    try:
        if "PIPELINING" in caps:
            waits = conn.send(mail, *rcpts, "DATA")
            mail_r = (await waits[0]).reply
            for i, w in enumerate(waits[1:-1]):
                rr = (await w).reply
                if mail_r.code == 250 and rr.code // 100 == 2:
                    accepted.append(i)
                else:
                    refused[i] = rr if mail_r.code == 250 else mail_r
            data_r = (await waits[-1]).reply
            if mail_r.code != 250:
                return _finish(message, refused, mail_r)
            if data_r.code == 354 and not accepted:
                # RFC 2920: a 354 after all RCPTs failed still needs a (empty) content.
                conn.write(b".\r\n")
                await conn.expect("end of data")
        else:
            mail_r = (await conn.command(mail)).reply
            if mail_r.code != 250:
                for i in range(len(rcpts)):
                    refused[i] = mail_r
                return _finish(message, refused, mail_r)
            for i, rcpt in enumerate(rcpts):
                rr = (await conn.command(rcpt)).reply
                if rr.code // 100 == 2:
                    accepted.append(i)
                else:
                    refused[i] = rr
            if not accepted:
                return _finish(message, refused, None)
            data_r = (await conn.command("DATA")).reply
        if not accepted:
            return _finish(message, refused, None)
        if data_r.code != 354:
            return _finish(message, refused, data_r)
        partial.data_sent = True
        conn.write(dot_stuff(message.body))
        end_r = (await conn.expect("end of data")).reply
        return _finish(message, refused, end_r)
    except _SessionBrokenError as e:
        raise _InterruptedError(partial.complete(e.reply), partial.data_sent) from e
    finally:
        # Replies never awaited (the session broke half-way through a pipelined
        # group) must not be logged as unhandled errors.
        for w in waits:
            w.addErrback(lambda _: None)


@define
class _Partial:
    message: OutboundMessage
    refused: dict[int, Reply]
    data_sent: bool = False

    def complete(self, reply: Reply) -> MessageResult:
        """The result when the session broke with ``reply``: RCPT refusals stand."""
        return _finish(self.message, self.refused, reply)


class _InterruptedError(Exception):
    """A transaction broken off: ``result`` completes its message, then the session ends.
    ``data_sent``: its content was written (the server may have taken it)."""

    def __init__(self, result: MessageResult, data_sent: bool = False) -> None:
        super().__init__(result.queue_id)
        self.result = result
        self.data_sent = data_sent


def _finish(
    message: OutboundMessage, refused: dict[int, Reply], final: Reply | None
) -> MessageResult:
    out = []
    for i, address in enumerate(message.recipients):
        reply = refused.get(i, final)
        assert reply is not None  # final is None only when every recipient was refused
        out.append(RecipientReply(address, reply))
    return MessageResult(message.queue_id, tuple(out), final)


def _succeeded(result: MessageResult) -> bool:
    return result.message_reply is not None and result.message_reply.code // 100 == 2


async def _session(
    conn: _SMTPConnection, messages: Sequence[OutboundMessage], opts: _Options, state: _State
) -> tuple[dict[str, str], bool]:
    """The whole dialogue; appends to ``state.results`` as messages are answered.
    Returns the server's capabilities and whether the last transaction failed (the
    next one needs an RSET).

    Raises :class:`_SessionBrokenError` when the session cannot go on.
    """
    banner = (await conn.banner).reply
    if banner.code != 220:
        raise _SessionBrokenError(banner)
    state.greeted = True
    reply, caps = await _hello(conn, opts.helo)
    if caps is None or reply.code != 250:
        raise _SessionBrokenError(reply if reply.code // 100 in (4, 5) else _lost(conn))
    if "STARTTLS" in caps:
        caps = await _starttls(conn, opts, state) or caps
    elif opts.tls != "may":
        raise _SessionBrokenError(
            Reply(451, "4.7.4", f"TLS is required, but was not offered by {opts.host}")
        )
    if opts.auth is not None:
        await _authenticate(conn, opts, state, caps)
    return caps, await _send(conn, messages, opts, state, caps, False)


async def _send(
    conn: _SMTPConnection, messages: Sequence[OutboundMessage], opts: _Options,
    state: _State, caps: dict[str, str], dirty: bool,
) -> bool:
    """The transactions of ``messages`` on a session past EHLO (and STARTTLS, AUTH);
    ``dirty``: the last transaction failed.  Returns the same for the last one sent."""
    limit = caps.get("SIZE", "0")
    max_size = int(limit) if limit.isdigit() else 0
    for i, message in enumerate(messages):
        if opts.pace is not None and not await opts.pace():
            state.unsent = tuple(m.queue_id for m in messages[i:])
            return dirty
        if message.smtputf8 and "SMTPUTF8" not in caps:
            reply = Reply(553, "5.6.7", f"{opts.host} does not support SMTPUTF8")
            state.results.append(_finish(message, {}, reply))
            continue
        if max_size and len(message.body) > max_size:
            reply = Reply(
                552,
                "5.3.4",
                f"message size {len(message.body)} exceeds the limit {max_size} of {opts.host}",
            )
            state.results.append(_finish(message, {}, reply))
            continue
        if dirty:
            try:
                rset = (await conn.command("RSET")).reply
            except _SessionBrokenError:
                if i == 0 and state.reused:
                    raise _StaleSessionError() from None
                raise
            if rset.code != 250:
                raise _SessionBrokenError(rset if rset.code // 100 == 4 else _lost(conn))
        try:
            result = await _transaction(conn, message, caps)
        except _InterruptedError as e:
            if i == 0 and state.reused and not e.data_sent:
                # A cached session the server closed while it was idle: nothing was
                # sent on it; the caller opens a fresh one.
                raise _StaleSessionError() from e
            state.results.append(e.result)
            raise _SessionBrokenError(e.result.message_reply or _lost(conn)) from e
        state.results.append(result)
        dirty = not _succeeded(result)
        if conn.last_421 is not None:
            raise _SessionBrokenError(conn.last_421)
    return dirty


class _StaleSessionError(Exception):
    """A cached session failed before its first message was sent (closed while idle)."""


@define(eq=False)
class _Idle:
    """An open session at rest in a :class:`SessionCache`."""

    conn: _SMTPConnection
    caps: dict[str, str]
    tls: TLSInfo | None
    mx_ip: str
    source_ip: str
    dirty: bool
    sent: int
    timer: IDelayedCall | None = None


class SessionCache:
    """Sessions kept open for ``idle_time`` seconds after their last message, so the
    next delivery to the same server (same address, port, source, EHLO name, TLS and
    login) reuses them instead of connecting, greeting and saying EHLO again (as
    Postfix's connection cache does).

    Sessions rest per ``site`` (the caller's shaping key), as many as the caller's
    ``room`` allows when one ends (its connection limit less the sessions still
    open, this one included), and a new session that finds none for its server
    closes resting ones of the site's other servers only as far as they would take
    the site over its limit.  A session is taken from the cache before a new one is
    opened, so resting sessions never add to the connections of one server (or
    source) beyond what its open sessions had.
    ``close()`` ends every resting session (QUIT) and fires once they are closed;
    until ``open()``, no session rests.
    """

    def __init__(self, reactor: Any, idle_time: float = 2.0) -> None:
        self.reactor = reactor
        self.idle_time = idle_time
        self._idle: dict[str, list[tuple[Any, _Idle]]] = {}
        self._closing: set[Deferred[None]] = set()
        self.closed = False
        #: Sessions taken from the cache (reused), for the record.
        self.reused = 0

    def open(self) -> None:
        """Let sessions rest again (after :meth:`close`)."""
        self.closed = False

    def resting(self, site: str) -> int:
        """How many sessions of ``site`` rest."""
        return len(self._idle.get(site, ()))

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, site: str, key: Any, room: int = 0) -> _Idle | None:
        """A resting session of ``site`` for ``key`` (the latest to rest), or None; then
        the caller connects anew, and resting sessions of other keys beyond ``room``
        (what may rest besides the open sessions, the new one counted) are closed."""
        entries = self._idle.get(site)
        if not entries:
            return None
        for i in range(len(entries) - 1, -1, -1):
            held_key, idle = entries[i]
            if held_key != key:
                continue
            del entries[i]
            self._unarm(idle)
            conn = idle.conn
            if conn.closed.called or conn.last_421 is not None:
                self._end(idle)
                continue
            if not entries:
                del self._idle[site]
            self.reused += 1
            return idle
        while len(entries) > max(room, 0):
            _, other = entries.pop(0)
            self._unarm(other)
            self._end(other)
        if not entries:
            self._idle.pop(site, None)
        return None

    def put(self, site: str, key: Any, idle: _Idle, room: int) -> bool:
        """Let ``idle`` rest when fewer than ``room`` sessions of ``site`` rest; False
        (nothing kept) otherwise."""
        if self.closed or idle.conn.closed.called or self.resting(site) >= room:
            return False
        idle.timer = self.reactor.callLater(self.idle_time, self._expire, site, idle)
        self._idle.setdefault(site, []).append((key, idle))
        return True

    @staticmethod
    def _unarm(idle: _Idle) -> None:
        if idle.timer is not None and idle.timer.active():
            idle.timer.cancel()
        idle.timer = None

    def _expire(self, site: str, idle: _Idle) -> None:
        idle.timer = None
        entries = self._idle.get(site, [])
        for i, (_, held) in enumerate(entries):
            if held is idle:
                del entries[i]
                break
        if not entries:
            self._idle.pop(site, None)
        self._end(idle)

    def _end(self, idle: _Idle) -> None:
        d = Deferred.fromCoroutine(_quit(idle.conn))
        self._closing.add(d)
        d.addBoth(lambda _: self._closing.discard(d))

    def close(self) -> Deferred[Any]:
        """QUIT every resting session; fires when all are closed."""
        self.closed = True
        for site in list(self._idle):
            for _, idle in self._idle.pop(site):
                self._unarm(idle)
                self._end(idle)
        return DeferredList(list(self._closing), consumeErrors=True)


async def _quit(conn: _SMTPConnection) -> None:
    """QUIT politely, then make sure the socket is closed before returning."""
    if not conn.closed.called:
        try:
            await conn.command("QUIT", timeout=_QUIT_TIMEOUT)
        except _SessionBrokenError:
            pass
    if not conn.closed.called:
        conn.t.loseConnection()
        killer = conn.reactor.callLater(_QUIT_TIMEOUT, conn.t.abortConnection)
        await conn.closed
        if killer.active():
            killer.cancel()


def is_ipv6(address: str) -> bool:
    """True for an IPv6 address literal (it has a colon; IPv4 ones never do)."""
    return ":" in address


class _OneConnection(ClientFactory):
    """Hands one ready-made protocol to one connection, without the "Starting
    factory" / "Stopping factory" log lines a factory writes by default (two per
    outbound connection, on a busy relay thousands a minute)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._protocol


def client_endpoint(
    reactor: Any, host: str, port: int, timeout: float, bind_address: str | None = None
) -> TCP4ClientEndpoint | TCP6ClientEndpoint:
    """The TCP client endpoint to ``host`` (an IPv4 or IPv6 address), bound to
    ``bind_address`` when given; a ValueError when the two are of different families."""
    bind = (bind_address, 0) if bind_address else None
    if bind_address and is_ipv6(bind_address) != is_ipv6(host):
        raise ValueError(f"source {bind_address} cannot reach {host}: other address family")
    # Each command group and message goes out as it is written (EagerConnecting).
    connecting = EagerConnecting(reactor)
    if is_ipv6(host):
        return TCP6ClientEndpoint(connecting, host, port, timeout=timeout, bindAddress=bind)
    return TCP4ClientEndpoint(connecting, host, port, timeout=timeout, bindAddress=bind)


def deliver(
    reactor: Any,
    host: str,
    port: int,
    messages: Sequence[OutboundMessage],
    *,
    helo: str,
    tls: str = "may",
    tls_hostname: str | None = None,
    trust_root: Any = None,
    bind_address: str | None = None,
    connect_timeout: float = 5.0,
    command_timeout: float = 300.0,
    auth: tuple[str, str] | None = None,
    greeting_timeout: float | None = None,
    pace: Callable[[], Awaitable[bool]] | None = None,
    cache: SessionCache | None = None,
    cache_site: str = "",
    cache_room: Callable[[], int] = lambda: 1,
    reuse_limit: int = 0,
) -> Deferred[SessionResult]:
    """Send ``messages`` over one SMTP session to ``host``:``port`` (an IPv4 or IPv6
    address; ``bind_address``, the source, must be of the same family).

    ``tls`` is the policy: ``"may"`` uses STARTTLS when offered, ``"encrypt"`` requires
    it, ``"verify"`` requires it with the certificate verified for ``tls_hostname``
    (default ``host``) against ``trust_root`` (an ``IOpenSSLTrustRoot`` or
    ``ssl.Certificate``; None: the platform's trust store).  When TLS is required and
    not available, nothing is sent and every message gets a 4xx reply.  ``auth`` is a
    ``(username, password)`` pair sent with AUTH PLAIN after STARTTLS (never in clear).
    ``greeting_timeout`` bounds the wait for the 220 greeting (default: the command
    timeout).  ``pace``, when given, is awaited before each message: True sends it,
    False ends the session there (the rest are listed in ``SessionResult.unsent``).
    ``cache``: take a resting session to the same server from it (``cache_site`` names
    the caller's site), and leave this one resting there afterwards, as long as it
    has carried fewer than ``reuse_limit`` messages (0: no limit) and fewer than
    ``cache_room()`` sessions of the site rest.
    The Deferred
    never fails: every message gets a reply, synthesized (4xx) when the session broke.
    """
    if tls not in TLS_POLICIES:
        raise ValueError(f"tls must be one of {TLS_POLICIES}, not {tls!r}")
    opts = _Options(helo, tls, tls_hostname or host, trust_root, host, auth, pace)

    key = (host, port, bind_address, helo, tls, opts.tls_hostname, auth, id(trust_root))

    def rest(conn: _SMTPConnection, state: _State, caps: dict[str, str], dirty: bool,
             mx_ip: str, source_ip: str, sent: int) -> bool:
        if cache is None or state.unsent or conn.closed.called or conn.last_421 is not None:
            return False
        if reuse_limit and sent >= reuse_limit:
            return False
        return cache.put(cache_site, key, _Idle(conn, caps, state.tls, mx_ip, source_ip,
                                                dirty, sent), cache_room())

    async def reuse(idle: _Idle) -> SessionResult | None:
        state = _State(greeted=True, tls=idle.tls, reused=True)
        conn = idle.conn
        # A session carries no more than ``reuse_limit`` messages in all: what is over
        # goes back to the caller unsent (as when paced).
        sending = messages
        if reuse_limit and idle.sent + len(messages) > reuse_limit:
            sending = messages[: max(reuse_limit - idle.sent, 1)]
        try:
            dirty = await _send(conn, sending, opts, state, idle.caps, idle.dirty)
            if len(sending) < len(messages):
                state.unsent = state.unsent + tuple(m.queue_id for m in messages[len(sending):])
        except _StaleSessionError:
            await _quit(conn)
            return None
        except _SessionBrokenError as e:
            rest_ = messages[len(state.results) :]
            state.results.extend(_all_get(rest_, e.reply))
            log.info("session with {host} ended early: {reply}", host=host, reply=e.reply)
            await _quit(conn)
        else:
            if not rest(conn, state, idle.caps, dirty, idle.mx_ip, idle.source_ip,
                        idle.sent + len(state.results)):
                await _quit(conn)
        return SessionResult(
            tuple(state.results), None, state.tls, idle.mx_ip, idle.source_ip, True,
            state.unsent,
        )

    async def run() -> SessionResult:
        idle = cache.take(cache_site, key, cache_room() - 1) if cache is not None else None
        if idle is not None:
            reused = await reuse(idle)
            if reused is not None:
                return reused
        conn = _SMTPConnection(reactor, command_timeout, greeting_timeout)
        try:
            endpoint = client_endpoint(reactor, host, port, connect_timeout, bind_address)
            await endpoint.connect(_OneConnection(conn))
        except Exception as e:
            why = str(e).strip() or type(e).__name__
            error = Reply(421, "4.4.1", f"connection to {host}:{port} failed: {why}")
            return SessionResult(tuple(_all_get(messages, error)), error, None, host, None)
        mx_ip = conn.t.getPeer().host
        source_ip = conn.t.getHost().host
        state = _State()
        try:
            caps, dirty = await _session(conn, messages, opts, state)
        except _SessionBrokenError as e:
            rest_ = messages[len(state.results) :]
            state.results.extend(_all_get(rest_, e.reply))
            log.info("session with {host} ended early: {reply}", host=host, reply=e.reply)
            await _quit(conn)
        else:
            if not rest(conn, state, caps, dirty, mx_ip, source_ip, len(state.results)):
                await _quit(conn)
        return SessionResult(
            tuple(state.results), None, state.tls, mx_ip, source_ip, state.greeted,
            state.unsent,
        )

    return Deferred.fromCoroutine(run())


@implementer(ITransport)
class SmtpTransport:
    """:func:`deliver` as an :class:`~sendarix.interfaces.ITransport`: one SMTP session
    to the hop's address, resting afterwards in ``cache`` for the next delivery to the
    same server (None: never kept)."""

    def __init__(self, reactor: Any, cache: SessionCache | None = None) -> None:
        self.reactor = reactor
        self.cache = cache

    def deliver(
        self, hop: Hop, messages: Sequence[OutboundMessage], options: SessionOptions
    ) -> Deferred[SessionResult]:
        """See :meth:`ITransport.deliver`."""
        return deliver(
            self.reactor,
            hop.address,
            hop.port,
            messages,
            helo=options.helo,
            tls=options.tls,
            tls_hostname=hop.host,
            trust_root=options.trust_root,
            bind_address=options.bind_address,
            connect_timeout=options.connect_timeout,
            command_timeout=options.command_timeout,
            auth=(hop.username, hop.password)
            if hop.username is not None and hop.password is not None else None,
            greeting_timeout=options.greeting_timeout,
            pace=options.pace,
            cache=self.cache,
            cache_site=options.cache_site,
            cache_room=options.cache_room,
            reuse_limit=options.reuse_limit,
        )

    def close(self) -> Deferred[None]:
        """See :meth:`ITransport.close`: QUIT the resting sessions."""
        if self.cache is None:
            return succeed(None)
        return self.cache.close().addCallback(lambda _: None)
