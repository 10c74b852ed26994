"""``sendarix sink``: a sandbox destination SMTP server with fault injection.

The sink accepts mail on one or more Twisted endpoints and records each message
(in memory, or as files in a directory), so applications and the relay's own tests
and benchmarks have a fast, correct peer.  Faults are injected on request; each is
given as a ``--fault SPEC`` string, parsed by :func:`parse_fault`:

==================================  ==================================================
``refuse``                          accept each connection, then close it at once
                                    without a banner.  (To test "connection refused",
                                    simply do not start a sink on that address.)
``connect:CODE[:ENH][:TEXT]``       banner ``CODE`` (e.g. ``connect:421``) then close
``rcpt:CODE[:ENH]:PATTERN[:TEXT]``  answer ``CODE`` to RCPT whose address matches the
                                    glob ``PATTERN`` (case-insensitive),
                                    e.g. ``rcpt:550:5.1.1:bad*@*``
``first:N:CODE[:ENH][:TEXT]``       answer ``CODE`` to every RCPT of the first ``N``
                                    transactions that reach RCPT (server-wide), e.g.
                                    ``first:1:450:4.2.0:Greylisted, try again in 60 seconds``
``data:CODE[:ENH][:TEXT]``          answer ``CODE`` after the end of DATA/BDAT LAST
``stall[:SECONDS]``                 accept TCP and send no banner (for ever, or for
                                    ``SECONDS`` and then carry on normally)
``stall-data[:SECONDS]``            send no reply after the end of the message data
                                    (for ever, or for ``SECONDS``)
``drop-after-ehlo``                 close the connection right after the EHLO/HELO reply
==================================  ==================================================

With ``--auth USER:PASSWORD`` the sink offers AUTH PLAIN (inside TLS when it has a
certificate) and refuses MAIL without it, so smarthost credentials can be tested.

Faults combine; for RCPT, ``rcpt`` faults are tried before ``first`` faults, each in
the order given, and the first that applies answers.  A 421 reply always closes the
connection.  When ``ENH`` or ``TEXT`` is left out, a sensible default is used (see
``_DEFAULT_ENHANCED`` and ``_DEFAULT_TEXT``).

A message counts as received (``SinkStats.messages``) once it was answered 250 (after
its files were written, with ``maildir``).  The stats file lists every received
message's Message-ID header value in arrival order, duplicates included, so tests can
detect double deliveries.

Run it with ``sendarix sink --listen tcp:2526 ...`` or ``python -m sendarix.control.cli.sink ...``;
after listening it prints ``listening on HOST:PORT`` once per endpoint, so a test that
listens on port 0 can read the port from its stdout.
"""

from __future__ import annotations

import base64
import enum
import fnmatch
import json
import os
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field, frozen
from twisted.internet import ssl
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.policies import TimeoutMixin
from twisted.python import usage
from twisted.python.failure import Failure

from sendarix.model.message import Reply, TLSInfo

log = Logger()

__all__ = [
    "Fault",
    "FaultKind",
    "FaultSpecError",
    "ReceivedMessage",
    "SinkFactory",
    "SinkOptions",
    "SinkProtocol",
    "SinkServer",
    "SinkStats",
    "main",
    "parse_fault",
]


# --------------------------------------------------------------------------- faults


class FaultSpecError(ValueError):
    """A ``--fault`` specification could not be parsed; the message says why."""


class FaultKind(enum.Enum):
    """The kinds of fault the sink can inject."""

    REFUSE = "refuse"
    CONNECT = "connect"
    RCPT = "rcpt"
    FIRST = "first"
    DATA = "data"
    STALL = "stall"
    STALL_DATA = "stall-data"
    DROP_AFTER_EHLO = "drop-after-ehlo"


@frozen
class Fault:
    """One parsed fault.

    ``reply`` is set for the kinds that answer (connect, rcpt, first, data);
    ``pattern`` for rcpt; ``count`` for first; ``seconds`` for the stalls (None: for ever).
    """

    kind: FaultKind
    reply: Reply | None = None
    pattern: str | None = None
    count: int | None = None
    seconds: float | None = None

    def matches(self, address: str) -> bool:
        """True when the rcpt fault's glob matches ``address`` (case-insensitive)."""
        return self.pattern is not None and fnmatch.fnmatchcase(
            address.lower(), self.pattern.lower()
        )


_SYNTAX = (
    "refuse | connect:CODE[:ENH][:TEXT] | rcpt:CODE[:ENH]:PATTERN[:TEXT] | "
    "first:N:CODE[:ENH][:TEXT] | data:CODE[:ENH][:TEXT] | stall[:SECONDS] | "
    "stall-data[:SECONDS] | drop-after-ehlo"
)
_CODE_RE = re.compile(r"^[45]\d\d$")
_ENH_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

# Default enhanced status code per fault kind and reply class (4 or 5).
_DEFAULT_ENHANCED: dict[tuple[FaultKind, int], str] = {
    (FaultKind.CONNECT, 4): "4.3.2",
    (FaultKind.CONNECT, 5): "5.3.2",
    (FaultKind.RCPT, 4): "4.2.0",
    (FaultKind.RCPT, 5): "5.1.1",
    (FaultKind.FIRST, 4): "4.2.0",
    (FaultKind.FIRST, 5): "5.7.1",
    (FaultKind.DATA, 4): "4.3.0",
    (FaultKind.DATA, 5): "5.7.1",
}
_DEFAULT_TEXT: dict[tuple[FaultKind, int], str] = {
    (FaultKind.CONNECT, 4): "Service not available, closing transmission channel",
    (FaultKind.CONNECT, 5): "No SMTP service here",
    (FaultKind.RCPT, 4): "Mailbox temporarily unavailable",
    (FaultKind.RCPT, 5): "No such user here",
    (FaultKind.FIRST, 4): "Temporarily deferred, try again later",
    (FaultKind.FIRST, 5): "Transaction refused",
    (FaultKind.DATA, 4): "Temporary failure, try again later",
    (FaultKind.DATA, 5): "Message rejected",
}
_GREYLIST_TEXT = "Greylisted, try again in 60 seconds"


def _bad(spec: str, why: str) -> FaultSpecError:
    return FaultSpecError(f"bad fault {spec!r}: {why}; expected one of: {_SYNTAX}")


def _parse_reply(spec: str, kind: FaultKind, fields: list[str]) -> tuple[Reply, list[str]]:
    """Take ``CODE[:ENH]`` off the front of ``fields``; return the reply and the rest.

    The reply text is filled in with the default; callers replace it when given.
    """
    if not fields or not fields[0]:
        raise _bad(spec, "a reply code is required")
    code_s, rest = fields[0], fields[1:]
    if not _CODE_RE.match(code_s):
        raise _bad(spec, f"reply code {code_s!r} is not a 4xx or 5xx code")
    code = int(code_s)
    klass = code // 100
    enhanced = _DEFAULT_ENHANCED[(kind, klass)]
    if rest and _ENH_RE.match(rest[0]):
        enhanced, rest = rest[0], rest[1:]
        if int(enhanced[0]) != klass:
            raise _bad(spec, f"enhanced code {enhanced} does not match reply code {code}")
    text = _DEFAULT_TEXT[(kind, klass)]
    if kind is FaultKind.FIRST and code in (450, 451):
        text = _GREYLIST_TEXT
    return Reply(code=code, enhanced=enhanced, text=text), rest


def _with_text(reply: Reply, rest: list[str]) -> Reply:
    """Use the remaining fields (colons kept) as the reply text, when there are any."""
    text = ":".join(rest).strip()
    return Reply(reply.code, reply.enhanced, text) if text else reply


def _parse_seconds(spec: str, fields: list[str]) -> float | None:
    if not fields:
        return None
    if len(fields) > 1:
        raise _bad(spec, "takes at most one field, SECONDS")
    try:
        seconds = float(fields[0])
    except ValueError:
        raise _bad(spec, f"SECONDS {fields[0]!r} is not a number") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise _bad(spec, "SECONDS must be a finite number >= 0")
    return seconds


def parse_fault(spec: str) -> Fault:
    """Parse one ``--fault`` specification (see the module docstring).

    Raises :class:`FaultSpecError`, whose message names the spec and the syntax.
    """
    text = spec.strip()
    head, sep, tail = text.partition(":")
    fields = tail.split(":") if sep else []
    try:
        kind = FaultKind(head.strip().lower())
    except ValueError:
        raise _bad(spec, f"unknown fault kind {head!r}") from None

    if kind in (FaultKind.REFUSE, FaultKind.DROP_AFTER_EHLO):
        if sep:
            raise _bad(spec, f"{kind.value} takes no fields")
        return Fault(kind)
    if kind in (FaultKind.STALL, FaultKind.STALL_DATA):
        return Fault(kind, seconds=_parse_seconds(spec, fields))
    if kind is FaultKind.FIRST:
        if not fields:
            raise _bad(spec, "first needs N and a reply code")
        try:
            count = int(fields[0])
        except ValueError:
            raise _bad(spec, f"N {fields[0]!r} is not an integer") from None
        if count < 1:
            raise _bad(spec, "N must be at least 1")
        reply, rest = _parse_reply(spec, kind, fields[1:])
        return Fault(kind, reply=_with_text(reply, rest), count=count)
    reply, rest = _parse_reply(spec, kind, fields)
    if kind is FaultKind.RCPT:
        if not rest or not rest[0].strip():
            raise _bad(spec, "rcpt needs a PATTERN (a glob such as bad*@*)")
        pattern, rest = rest[0].strip(), rest[1:]
        return Fault(kind, reply=_with_text(reply, rest), pattern=pattern)
    return Fault(kind, reply=_with_text(reply, rest))


# --------------------------------------------------------------------------- values


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
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._@+=-]")


def _message_id(body: bytes) -> str | None:
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


# --------------------------------------------------------------------------- protocol


class _Mode(enum.Enum):
    COMMAND = 1
    DATA = 2
    BDAT = 3
    STALLED = 4  # input is read and thrown away; nothing is ever answered
    CLOSED = 5


_MAX_LINE = 4096  # RFC 5321 says 512, but extensions may lengthen it; be lenient
_MAIL_RE = re.compile(r"^FROM:\s*<([^<>]*)>\s*(.*)$", re.IGNORECASE)
_RCPT_RE = re.compile(r"^TO:\s*<([^<>]*)>\s*(.*)$", re.IGNORECASE)
_BDAT_RE = re.compile(r"^(\d{1,12})(?:\s+(LAST))?\s*$", re.IGNORECASE)
_END = b"\r\n.\r\n"


class SinkProtocol(Protocol, TimeoutMixin):
    """One SMTP session with the sink.

    Input is parsed from one buffer: command lines are split there, DATA is scanned
    for the end marker chunk by chunk and dot-unstuffed once on the whole body, BDAT
    chunks are sliced off by length.  Replies go out in command order: while an answer
    is pending (a delayed reply, a file being written) the buffer is left alone and the
    transport paused.
    """

    # The current transaction (set by _reset_transaction).
    _sender: str | None
    _mail_params: tuple[str, ...]
    _rcpts: list[str]
    _txn_fault: Fault | None
    _txn_counted: bool
    _body: bytearray
    _scan: int
    _overflow: bool
    _bdat_left: int
    _bdat_size: int
    _bdat_last: bool
    _bdat_discard: bool
    _bdat_error: str | None
    _bdat_failed: bool

    def __init__(self, factory: SinkFactory) -> None:
        self.factory = factory
        self._t: Any = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._mode = _Mode.COMMAND
        self._blocked = False
        self._timer: Any = None
        self._tls = False
        self._auth_user: str | None = None
        self._helo: str | None = None
        self._esmtp = False
        self._peer = ""
        self._peer_port = 0
        self._local = ""
        self._reset_transaction()

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's clock: the injected reactor, not the global one."""
        return self.factory.reactor.callLater(period, func)

    # ---- connection

    def connectionMade(self) -> None:
        self._t = self.transport
        try:
            self._t.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (e.g. a UNIX socket), or already gone
        peer, host = self._t.getPeer(), self._t.getHost()
        self._peer = str(getattr(peer, "host", getattr(peer, "name", "")) or "")
        self._peer_port = int(getattr(peer, "port", 0) or 0)
        if hasattr(host, "port"):
            self._local = f"{host.host}:{host.port}"
        else:
            self._local = str(getattr(host, "name", "") or "")
        self._tls = ISSLTransport.providedBy(self._t)
        f = self.factory
        f.connection_made(self)

        if f.refuse:
            self._mode = _Mode.CLOSED
            self._t.loseConnection()
            return
        if f.idle_timeout:
            self.setTimeout(f.idle_timeout)
        if f.stall is not None:
            if f.stall.seconds is None:
                self._mode = _Mode.STALLED
                return
            self._block()
            self._timer = f.reactor.callLater(f.stall.seconds, self._greet)
            return
        self._greet()

    def _greet(self) -> None:
        self._timer = None
        f = self.factory
        if f.connect is not None and f.connect.reply is not None:
            self._reply(f.connect.reply)
            self._close()
            return
        self._send(f"220 {f.hostname} ESMTP Sendarix sink ready")
        self._unblock()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._mode = _Mode.CLOSED
        self.setTimeout(None)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._buf = bytearray()
        self._body = bytearray()
        self.factory.connection_lost(self)

    def timeoutConnection(self) -> None:
        if self._mode is not _Mode.STALLED:
            self._send(f"421 4.4.2 {self.factory.hostname} Idle timeout, closing connection")
        self._close()

    @property
    def peer_address(self) -> str:
        """The client's IP address (empty before the connection is made)."""
        return self._peer

    def abort(self) -> None:
        """Drop the connection at once (used when the server stops)."""
        if self._t is not None:
            self._t.abortConnection()

    # ---- output

    def _send(self, line: str) -> None:
        self._out.append(line.encode("utf-8") + b"\r\n")

    def _reply(self, reply: Reply) -> None:
        enh = f" {reply.enhanced}" if reply.enhanced else ""
        self._send(f"{reply.code}{enh} {reply.text}")

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            if self._t is not None:
                self._t.write(data)

    def _close(self) -> None:
        self._mode = _Mode.CLOSED
        self._flush()
        self._t.loseConnection()

    def _block(self) -> None:
        self._blocked = True
        self._t.pauseProducing()

    def _unblock(self) -> None:
        """Carry on with buffered input after a pending answer went out."""
        self._flush()
        if self._mode is _Mode.CLOSED:
            return
        self._blocked = False
        self._t.resumeProducing()
        self._process()

    # ---- input

    def dataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.STALLED or self._mode is _Mode.CLOSED:
            return
        self.resetTimeout()
        self._buf += data
        if not self._blocked:
            self._process()

    def _process(self) -> None:
        while not self._blocked:
            mode = self._mode
            if mode is _Mode.COMMAND:
                buf = self._buf
                i = buf.find(b"\n")
                if i < 0:
                    if len(buf) > _MAX_LINE:
                        self._send("500 5.5.2 Line too long")
                        self._close()
                    break
                line = bytes(buf[:i])
                del buf[: i + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > _MAX_LINE:
                    self._send("500 5.5.2 Line too long")
                    continue
                self._command(line)
            elif mode is _Mode.DATA:
                if not self._data_step():
                    break
            elif mode is _Mode.BDAT:
                if not self._bdat_step():
                    break
            else:
                self._buf.clear()
                break
        self._flush()

    def _data_step(self) -> bool:
        """Move buffered input into the body; True once the end marker was found."""
        body = self._body
        body += self._buf
        self._buf.clear()
        idx = body.find(_END, self._scan)
        if idx < 0:
            limit = self.factory.max_size
            if self._overflow or (limit and len(body) - 2 > limit):
                # Too big: keep only the tail that could start the end marker.
                self._overflow = True
                del body[:-4]
            self._scan = max(0, len(body) - 4)
            return False
        self._buf += body[idx + 5 :]
        self._mode = _Mode.COMMAND
        if self._overflow or (self.factory.max_size and idx > self.factory.max_size):
            self._body = bytearray()
            self._end_of_message(None)
            return True
        # body starts with a CRLF sentinel, so one replace unstuffs every line,
        # the first one included, and the end marker needs no special first case.
        raw = bytes(body[: idx + 2])
        self._body = bytearray()
        if b"\r\n.." in raw:
            raw = raw.replace(b"\r\n..", b"\r\n.")
        self._end_of_message(raw[2:])
        return True

    def _bdat_step(self) -> bool:
        """Slice the current BDAT chunk off the buffer; True once it is complete."""
        buf = self._buf
        take = min(self._bdat_left, len(buf))
        if take:
            if not self._bdat_discard and not self._overflow:
                limit = self.factory.max_size
                if limit and len(self._body) + take > limit:
                    self._overflow = True
                    self._body = bytearray()
                else:
                    self._body += buf[:take]
            del buf[:take]
            self._bdat_left -= take
        if self._bdat_left:
            return False
        self._mode = _Mode.COMMAND
        size = self._bdat_size
        if self._bdat_discard:
            self._bdat_discard = False
            if self._bdat_error is not None:
                self._send(self._bdat_error)
            return True
        if self._bdat_last:
            if self._overflow:
                self._end_of_message(None)
            else:
                body, self._body = bytes(self._body), bytearray()
                self._end_of_message(body)
        else:
            self._send(f"250 2.0.0 {size} octets received")
        return True

    # ---- commands

    def _reset_transaction(self) -> None:
        self._sender = None
        self._mail_params = ()
        self._rcpts = []
        self._txn_fault = None
        self._txn_counted = False
        self._body = bytearray()
        self._scan = 0
        self._overflow = False
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_discard = False
        self._bdat_error = None
        self._bdat_failed = False

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("latin-1")
        verb, _, arg = text.strip().partition(" ")
        handler = self._handlers.get(verb.upper())
        if handler is None:
            self._send("500 5.5.2 Command not recognized")
            return
        handler(self, arg.strip())

    def _hello(self, arg: str, esmtp: bool) -> None:
        if not arg:
            self._send(f"501 5.5.4 Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        f = self.factory
        self._reset_transaction()
        self._helo, self._esmtp = arg, esmtp
        if esmtp:
            lines = [f"{f.hostname} greets {arg}", "PIPELINING", f"SIZE {f.max_size}"]
            lines += ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
            if f.tls_context is not None and not self._tls:
                lines.append("STARTTLS")
            if f.options.auth is not None and (self._tls or f.tls_context is None):
                lines.append("AUTH PLAIN")
            if f.options.chunking:
                lines.append("CHUNKING")
            for line in lines[:-1]:
                self._send(f"250-{line}")
            self._send(f"250 {lines[-1]}")
        else:
            self._send(f"250 {f.hostname}")
        if f.drop_after_ehlo:
            self._close()

    def do_EHLO(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def do_AUTH(self, arg: str) -> None:
        expected = self.factory.options.auth
        mechanism, _, token = arg.partition(" ")
        if expected is None or (self.factory.tls_context is not None and not self._tls):
            self._send("502 5.5.1 AUTH not available")
        elif self._auth_user is not None:
            self._send("503 5.5.1 Already authenticated")
        elif mechanism.upper() != "PLAIN" or not token:
            self._send("504 5.5.4 Only AUTH PLAIN with an initial response")
        else:
            try:
                _, user, password = base64.b64decode(token, validate=True).split(b"\0")
            except ValueError:
                self._send("501 5.5.2 Cannot decode the AUTH PLAIN response")
                return
            if (user.decode("utf-8", "replace"), password.decode("utf-8", "replace")) == expected:
                self._auth_user = expected[0]
                self._send("235 2.7.0 Authentication successful")
            else:
                self._send("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg: str) -> None:
        if self._helo is None:
            self._send("503 5.5.1 Send HELO/EHLO first")
            return
        if self.factory.options.auth is not None and self._auth_user is None:
            self._send("530 5.7.0 Authentication required")
            return
        if self._sender is not None:
            self._send("503 5.5.1 Nested MAIL command")
            return
        m = _MAIL_RE.match(arg)
        if not m:
            self._send("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        params = tuple(m.group(2).split())
        limit = self.factory.max_size
        for param in params:
            name, _, value = param.partition("=")
            if name.upper() == "SIZE":
                if not value.isdigit():
                    self._send("501 5.5.4 Bad SIZE parameter")
                    return
                if limit and int(value) > limit:
                    self._send("552 5.3.4 Message size exceeds fixed maximum message size")
                    return
        self._sender, self._mail_params = m.group(1), params
        self._send("250 2.1.0 Sender OK")

    def do_RCPT(self, arg: str) -> None:
        if self._sender is None:
            self._send("503 5.5.1 Need MAIL command")
            return
        m = _RCPT_RE.match(arg)
        if not m or not m.group(1):
            self._send("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        address = m.group(1)
        f = self.factory
        if not self._txn_counted:
            self._txn_counted = True
            self._txn_fault = f.first_fault_for_new_transaction()
        fault = next((x for x in f.rcpt_faults if x.matches(address)), None) or self._txn_fault
        if fault is not None and fault.reply is not None:
            f.stats.rejected_recipients += 1
            self._reply(fault.reply)
            if fault.reply.code == 421:
                self._close()
            return
        if f.max_recipients and len(self._rcpts) >= f.max_recipients:
            self._send("452 4.5.3 Too many recipients")
            return
        self._rcpts.append(address)
        self._send("250 2.1.5 Recipient OK")

    def do_DATA(self, arg: str) -> None:
        if arg:
            self._send("501 5.5.4 Syntax: DATA")
        elif self._sender is None:
            self._send("503 5.5.1 Need MAIL command")
        elif not self._rcpts:
            self._send("554 5.5.1 No valid recipients")
        elif self._bdat_failed or self._body:
            self._send("503 5.5.1 DATA not allowed after BDAT")
        else:
            self._mode = _Mode.DATA
            self._body = bytearray(b"\r\n")
            self._scan = 0
            self._overflow = False
            self._send("354 End data with <CR><LF>.<CR><LF>")

    def do_BDAT(self, arg: str) -> None:
        m = _BDAT_RE.match(arg)
        if not m:
            # Without a valid size the chunk cannot be skipped: give up on the session.
            self._send("501 5.5.4 Syntax: BDAT size [LAST]")
            self._close()
            return
        size, last = int(m.group(1)), m.group(2) is not None
        self._mode = _Mode.BDAT
        self._bdat_left, self._bdat_size, self._bdat_last = size, size, last
        error = None
        if self._sender is None:
            error = "503 5.5.1 Need MAIL command"
        elif not self._rcpts:
            error = "554 5.5.1 No valid recipients"
        elif self._bdat_failed:
            error = "503 5.5.1 Previous BDAT failed, send RSET"
        if error is not None:
            # The chunk is read and thrown away, then the error is answered.
            self._bdat_discard, self._bdat_error = True, error
            self._bdat_failed = self._sender is not None and not last

    def do_RSET(self, arg: str) -> None:
        self._reset_transaction()
        self._send("250 2.0.0 Reset")

    def do_NOOP(self, arg: str) -> None:
        self._send("250 2.0.0 OK")

    def do_VRFY(self, arg: str) -> None:
        self._send("252 2.5.0 Cannot VRFY user, but will accept message")

    def do_HELP(self, arg: str) -> None:
        self._send("214 2.0.0 Sendarix sink: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT")

    def do_QUIT(self, arg: str) -> None:
        self._send(f"221 2.0.0 {self.factory.hostname} closing connection")
        self._close()

    def do_STARTTLS(self, arg: str) -> None:
        ctx = self.factory.tls_context
        if ctx is None:
            self._send("502 5.5.1 STARTTLS not available")
        elif self._tls:
            self._send("503 5.5.1 TLS already active")
        elif arg:
            self._send("501 5.5.4 Syntax: STARTTLS")
        else:
            self._send("220 2.0.0 Ready to start TLS")
            self._flush()
            # RFC 3207: input pipelined after STARTTLS is discarded, state starts afresh.
            self._buf.clear()
            self._reset_transaction()
            self._helo, self._esmtp = None, False
            self._auth_user = None
            self._t.startTLS(ctx)
            self._tls = True

    _handlers: dict[str, Callable[[SinkProtocol, str], None]] = {
        "EHLO": do_EHLO,
        "HELO": do_HELO,
        "MAIL": do_MAIL,
        "RCPT": do_RCPT,
        "DATA": do_DATA,
        "BDAT": do_BDAT,
        "RSET": do_RSET,
        "NOOP": do_NOOP,
        "VRFY": do_VRFY,
        "HELP": do_HELP,
        "QUIT": do_QUIT,
        "STARTTLS": do_STARTTLS,
        "AUTH": do_AUTH,
    }

    # ---- end of message

    def _tls_info(self) -> TLSInfo | None:
        if not self._tls:
            return None
        try:
            handle = self._t.getHandle()
            return TLSInfo(
                version=str(handle.get_protocol_version_name()),
                cipher=str(handle.get_cipher_name()),
            )
        except Exception:
            return TLSInfo(version="unknown", cipher="unknown")

    def _end_of_message(self, body: bytes | None) -> None:
        """Answer a complete message (``None``: it was too big)."""
        f = self.factory
        if body is None:
            f.stats.rejected_messages += 1
            self._reset_transaction()
            self._send("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        stall = f.stall_data
        if stall is not None:
            if stall.seconds is None:
                # Not paused: a stalled session must still notice the client leaving.
                self._mode = _Mode.STALLED
                return
            self._block()
            self._timer = f.reactor.callLater(stall.seconds, self._finish_message, body)
            return
        self._finish_message(body)

    def _finish_message(self, body: bytes) -> None:
        self._timer = None
        if self._mode is _Mode.CLOSED:
            return
        f = self.factory
        fault = f.data_fault
        if fault is not None and fault.reply is not None:
            f.stats.rejected_messages += 1
            self._reset_transaction()
            self._reply(fault.reply)
            if fault.reply.code == 421:
                self._close()
            elif self._blocked:
                self._unblock()
            return
        message = ReceivedMessage(
            queue_id=f.next_queue_id(),
            sender=self._sender or "",
            recipients=tuple(self._rcpts),
            body=body,
            helo=self._helo or "",
            auth_user=self._auth_user,
            esmtp=self._esmtp,
            peer=self._peer,
            peer_port=self._peer_port,
            local=self._local,
            tls=self._tls_info(),
            received_at=f.reactor.seconds(),
            message_id=_message_id(body),
            mail_params=self._mail_params,
        )
        self._reset_transaction()
        stored = f.store(message)
        if stored is None:
            self._send(f"250 2.0.0 OK: queued as {message.queue_id}")
            if self._blocked:
                self._unblock()
            return
        if not self._blocked:
            self._block()

        def answered(ok: bool) -> None:
            if self._mode is _Mode.CLOSED:
                return
            if ok:
                self._send(f"250 2.0.0 OK: queued as {message.queue_id}")
            else:
                self._send("451 4.3.0 Could not store the message")
            self._unblock()

        stored.addCallback(answered)


# --------------------------------------------------------------------------- factory


def _load_tls(options: SinkOptions) -> ssl.CertificateOptions | None:
    if options.certificate is None or options.key is None:
        return None
    pem = Path(options.certificate).read_bytes() + b"\n" + Path(options.key).read_bytes()
    return ssl.PrivateCertificate.loadPEM(pem).options()


def _write_files(directory: str, stem: str, body: bytes, meta: dict[str, Any]) -> None:
    """Write ``stem.json`` then ``stem.eml``, each through a temporary name, so a
    reader that sees the .eml file also finds its envelope."""
    base = os.path.join(directory, stem)
    for path, data in (
        (base + ".json", json.dumps(meta, indent=1).encode("utf-8")),
        (base + ".eml", body),
    ):
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)


class SinkFactory(ServerFactory):
    """Builds :class:`SinkProtocol` sessions and holds what they share: faults,
    counters, the received messages and the waiters of :meth:`wait_for`."""

    noisy = False

    def __init__(self, options: SinkOptions, reactor: Any) -> None:
        # reactor: IReactorTime + IReactorThreads (+ IReactorTCP when listening).
        self.options = options
        self.reactor = reactor
        self.hostname = options.hostname
        self.max_size = options.max_message_size
        self.max_recipients = options.max_recipients
        self.idle_timeout = options.idle_timeout
        self.stats = SinkStats()
        self.messages: deque[ReceivedMessage] = deque(maxlen=options.max_messages)
        self.tls_context = _load_tls(options)
        self.on_change: Callable[[], None] | None = None

        faults = options.faults

        def first_of(kind: FaultKind) -> Fault | None:
            return next((x for x in faults if x.kind is kind), None)

        self.refuse = first_of(FaultKind.REFUSE) is not None
        self.connect = first_of(FaultKind.CONNECT)
        self.stall = first_of(FaultKind.STALL)
        self.stall_data = first_of(FaultKind.STALL_DATA)
        self.data_fault = first_of(FaultKind.DATA)
        self.drop_after_ehlo = first_of(FaultKind.DROP_AFTER_EHLO) is not None
        self.rcpt_faults = [x for x in faults if x.kind is FaultKind.RCPT]
        self.first_faults = [x for x in faults if x.kind is FaultKind.FIRST]
        self._transactions = 0

        self._seq = 0
        if options.maildir is not None:
            os.makedirs(options.maildir, exist_ok=True)
            for name in os.listdir(options.maildir):
                m = re.match(r"^(\d+)", name)
                if m:
                    self._seq = max(self._seq, int(m.group(1)))
        self._protocols: set[SinkProtocol] = set()
        self._lost: dict[SinkProtocol, list[Deferred[None]]] = {}
        self._pending: set[Deferred[bool]] = set()
        self._waiters: list[tuple[int, Deferred[list[ReceivedMessage]]]] = []

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return SinkProtocol(self)

    # ---- bookkeeping called by the protocol

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def connection_made(self, proto: SinkProtocol) -> None:
        self._protocols.add(proto)
        s = self.stats
        s.connections += 1
        s.active += 1
        s.max_concurrent = max(s.max_concurrent, s.active)
        peer = proto.peer_address
        s.active_by_peer[peer] = n = s.active_by_peer.get(peer, 0) + 1
        s.max_concurrent_by_peer[peer] = max(s.max_concurrent_by_peer.get(peer, 0), n)
        self._changed()

    def connection_lost(self, proto: SinkProtocol) -> None:
        if proto in self._protocols:
            self._protocols.discard(proto)
            self.stats.active -= 1
            peer = proto.peer_address
            left = self.stats.active_by_peer.get(peer, 0) - 1
            if left > 0:
                self.stats.active_by_peer[peer] = left
            else:
                self.stats.active_by_peer.pop(peer, None)
            self._changed()
        for d in self._lost.pop(proto, []):
            d.callback(None)

    def first_fault_for_new_transaction(self) -> Fault | None:
        """Count a transaction reaching RCPT; the ``first`` fault it falls under, if any."""
        self._transactions += 1
        n = self._transactions
        return next((x for x in self.first_faults if x.count is not None and n <= x.count), None)

    def next_queue_id(self) -> str:
        self._seq += 1
        return f"{self._seq:010d}"

    def store(self, message: ReceivedMessage) -> Deferred[bool] | None:
        """Keep ``message``; None when done at once, else a Deferred firing with success."""
        directory = self.options.maildir
        if directory is None:
            self.messages.append(message)
            self._received(message)
            return None
        stem = message.queue_id
        if message.message_id:
            stem += "-" + _UNSAFE_RE.sub("_", message.message_id.strip("<> "))[:120]
        d: Deferred[None] = deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            _write_files,
            directory,
            stem,
            message.body,
            message.to_dict(),
        )

        def ok(_: None) -> bool:
            self._received(message)
            return True

        def failed(reason: Failure) -> bool:
            log.failure("could not write message {queue_id}", reason, queue_id=message.queue_id)
            return False

        result: Deferred[bool] = d.addCallbacks(ok, failed)
        self._pending.add(result)

        def settled(ok: bool) -> bool:
            self._pending.discard(result)
            return ok

        return result.addCallback(settled)

    def _received(self, message: ReceivedMessage) -> None:
        s = self.stats
        s.messages += 1
        s.recipients += len(message.recipients)
        s.bytes += len(message.body)
        s.message_ids.append(message.message_id or "")
        if self.options.verbose:
            tls = message.tls.version if message.tls else "none"
            rcpts = ",".join(f"<{r}>" for r in message.recipients)
            sys.stdout.write(
                f"received {message.queue_id} from=<{message.sender}> to={rcpts} "
                f"size={len(message.body)} message_id={message.message_id or '-'} "
                f"peer={message.peer} local={message.local} tls={tls}\n"
            )
            sys.stdout.flush()
        self._changed()
        waiters, self._waiters = self._waiters, []
        for count, d in waiters:
            if s.messages >= count:
                d.callback(list(self.messages))
            else:
                self._waiters.append((count, d))

    # ---- for tests and the server

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred[list[ReceivedMessage]]:
        """Fire with the retained messages once ``count`` messages have been received
        in all; fail with ``twisted.internet.defer.TimeoutError`` after ``timeout``."""
        if self.stats.messages >= count:
            return succeed(list(self.messages))

        def cancel(d: Deferred[list[ReceivedMessage]]) -> None:
            self._waiters = [w for w in self._waiters if w[1] is not d]

        d: Deferred[list[ReceivedMessage]] = Deferred(cancel)
        self._waiters.append((count, d))
        d.addTimeout(timeout, self.reactor)
        return d

    def close_connections(self) -> Deferred[None]:
        """Abort every open session; fires when all of them are gone."""
        waits: list[Deferred[None]] = []
        for proto in list(self._protocols):
            d: Deferred[None] = Deferred()
            self._lost.setdefault(proto, []).append(d)
            waits.append(d)
            proto.abort()
        pending: list[Deferred[Any]] = [*waits, *self._pending]
        return gatherResults(pending).addCallback(lambda _: None)


# --------------------------------------------------------------------------- server


class SinkServer:
    """A sink listening on every endpoint of its options, with the stats file kept up
    to date (at most once per second, and at stop)."""

    def __init__(self, options: SinkOptions, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor
        self.factory = SinkFactory(options, reactor)
        self.factory.on_change = self._mark_dirty
        self.ports: list[IListeningPort] = []
        self._dirty = True
        self._writer: LoopingCall | None = None

    @property
    def stats(self) -> SinkStats:
        """The sink's counters."""
        return self.factory.stats

    @property
    def messages(self) -> deque[ReceivedMessage]:
        """The messages kept in memory (none with ``maildir``), oldest first."""
        return self.factory.messages

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred[list[ReceivedMessage]]:
        """See :meth:`SinkFactory.wait_for`."""
        return self.factory.wait_for(count, timeout)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every TCP listening port."""
        out = []
        for port in self.ports:
            addr: Any = port.getHost()
            if hasattr(addr, "port"):
                out.append((addr.host, addr.port))
        return out

    def start(self) -> Deferred[list[IListeningPort]]:
        """Listen on every endpoint; fires with the listening ports.  If one endpoint
        fails, the others are closed again and the Deferred fails."""

        async def run() -> list[IListeningPort]:
            results = await DeferredList(
                [
                    serverFromString(self.reactor, desc).listen(self.factory)
                    for desc in self.options.listen
                ],
                consumeErrors=True,
            )
            ports = [value for ok, value in results if ok]
            errors = [value for ok, value in results if not ok]
            if errors:
                for port in ports:
                    await maybeDeferred(port.stopListening)
                errors[0].raiseException()
            self.ports = ports
            if self.options.stats_file:
                self._write_stats()
                self._writer = LoopingCall(self._write_stats_if_dirty)
                self._writer.clock = self.reactor
                self._writer.start(1.0, now=False)
            return ports

        return Deferred.fromCoroutine(run())

    def stop(self) -> Deferred[None]:
        """Stop listening, drop open sessions, write the stats file a last time."""

        async def run() -> None:
            ports, self.ports = self.ports, []
            for port in ports:
                await maybeDeferred(port.stopListening)
            await self.factory.close_connections()
            if self._writer is not None and self._writer.running:
                self._writer.stop()
            self._writer = None
            if self.options.stats_file:
                self._write_stats()

        return Deferred.fromCoroutine(run())

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _write_stats_if_dirty(self) -> None:
        if self._dirty:
            self._write_stats()

    def _write_stats(self) -> None:
        path = self.options.stats_file
        if not path:
            return
        self._dirty = False
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.stats.to_dict(), fh)
            os.replace(tmp, path)
        except OSError:
            log.failure("could not write the stats file {path}", path=path)


# --------------------------------------------------------------------------- command


class SinkCommandOptions(usage.Options):
    """``sendarix sink`` command-line options."""

    synopsis = "sendarix sink --listen ENDPOINT [--listen ENDPOINT]... [options]"
    longdesc = "Run a sandbox SMTP server that accepts mail and injects faults on request."

    optFlags = [
        ["verbose", "v", "Print one line per received message to stdout."],
        ["chunking", None, "Advertise CHUNKING (BDAT is always understood)."],
    ]
    optParameters = [
        ["hostname", None, None, "Host name for the banner and EHLO reply."],
        ["maildir", None, None, "Write each message to DIR as NNN-MSGID.eml + .json."],
        ["tls-cert", None, None, "PEM certificate: offer STARTTLS with it."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["auth", None, None, "USER:PASSWORD: offer AUTH PLAIN and require it before MAIL."],
        ["stats-file", None, None, "Keep JSON counters in this file (rewritten atomically)."],
        ["max-size", None, 100 * 1024 * 1024, "Largest message accepted (0: any).", int],
        ["idle-timeout", None, 300.0, "Close idle sessions after SECONDS (0: never).", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["fault"] = []

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted server endpoint to listen on, e.g. tcp:2526:interface=127.0.0.1
        (repeatable)."""
        self["listen"].append(endpoint)

    def opt_fault(self, spec: str) -> None:
        """A fault to inject (repeatable): refuse, connect:CODE[:ENH][:TEXT],
        rcpt:CODE[:ENH]:PATTERN[:TEXT], first:N:CODE[:ENH][:TEXT],
        data:CODE[:ENH][:TEXT], stall[:SECONDS], stall-data[:SECONDS], drop-after-ehlo."""
        try:
            self["fault"].append(parse_fault(spec))
        except FaultSpecError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key must be given together")
        for name in ("tls-cert", "tls-key"):
            if self[name] is not None and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["auth"] is not None and ":" not in self["auth"]:
            raise usage.UsageError("--auth needs USER:PASSWORD")
        if self["max-size"] < 0 or self["idle-timeout"] < 0:
            raise usage.UsageError("--max-size and --idle-timeout must be >= 0")

    def sink_options(self) -> SinkOptions:
        """The parsed options as :class:`SinkOptions`."""
        kwargs: dict[str, Any] = {}
        if self["listen"]:
            kwargs["listen"] = tuple(self["listen"])
        if self["hostname"]:
            kwargs["hostname"] = self["hostname"]
        return SinkOptions(
            maildir=self["maildir"],
            certificate=self["tls-cert"],
            key=self["tls-key"],
            faults=tuple(self["fault"]),
            stats_file=self["stats-file"],
            verbose=bool(self["verbose"]),
            chunking=bool(self["chunking"]),
            max_message_size=self["max-size"],
            idle_timeout=self["idle-timeout"],
            auth=tuple(self["auth"].split(":", 1)) if self["auth"] else None,
            # Nobody can read the in-memory list of a separate process: keep no bodies.
            max_messages=0,
            **kwargs,
        )


def _describe(port: IListeningPort) -> str:
    addr: Any = port.getHost()
    if hasattr(addr, "port"):
        return f"{addr.host}:{addr.port}"
    return f"unix:{getattr(addr, 'name', addr)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sendarix sink``; ``argv`` is the arguments after ``sink``.

    Runs the global reactor until SIGTERM/SIGINT; returns the exit status.
    """
    config = SinkCommandOptions()
    try:
        config.parseOptions(list(sys.argv[1:] if argv is None else argv))
        options = config.sink_options()
    except usage.UsageError as e:
        sys.stderr.write(f"sendarix sink: {e}\n")
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    level = LogLevel.info if options.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=level)],
            )
        ],
        redirectStandardIO=False,
    )
    try:
        server = SinkServer(options, reactor)
    except (OSError, ValueError, ssl.SSL.Error) as e:
        sys.stderr.write(f"sendarix sink: {e}\n")
        return 1
    status = [0]

    def started(ports: list[IListeningPort]) -> None:
        for port in ports:
            sys.stdout.write(f"listening on {_describe(port)}\n")
        sys.stdout.flush()
        reactor.addSystemEventTrigger("before", "shutdown", server.stop)

    def failed(reason: Failure) -> None:
        sys.stderr.write(f"sendarix sink: cannot listen: {reason.getErrorMessage()}\n")
        status[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: server.start().addCallbacks(started, failed))
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
