"""One SMTP session of the sink: ESMTP with PIPELINING, CHUNKING, STARTTLS and
AUTH PLAIN, answering as the faults say."""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from sendarix.control.cli.sink.faults import Fault
from sendarix.control.cli.sink.records import ReceivedMessage, message_id_of
from sendarix.model.message import Reply, TLSInfo

if TYPE_CHECKING:
    from sendarix.control.cli.sink.factory import SinkFactory


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
            message_id=message_id_of(body),
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


