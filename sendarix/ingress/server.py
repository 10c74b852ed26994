"""The ESMTP submission server: Twisted's ``ESMTP`` with the defects an MTA cannot have
fixed (docs/library-defects.md), and our policy.

What this subclass changes, each covered by a regression test:

- input is buffered and dispatched by us: replies always come in command order, even
  when a check is asynchronous (input waits while a Deferred is pending);
- STARTTLS discards anything pipelined after it and resets HELO, AUTH and the
  transaction; it is never offered on implicit TLS;
- AUTH only over TLS (``530 5.7.0``), with failure slowing and lockout (``421 4.7.0``);
- DATA and BDAT are read by whole buffers (``sendarix.ingress.datareader``); an over-long line
  never drops the session back into command mode; bare CR/LF are normalised or
  refused so nothing can be smuggled;
- SIZE, recipient, line and connection limits; enhanced status codes on every reply;
- one spool record per message; a spool failure answers ``451 4.3.0``, never 550.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from attrs import field, frozen
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from sendarix.cleanup.headers import received_protocol
from sendarix.cleanup.intake import Intake, Refused, Submission
from sendarix.cleanup.keyring import DomainKeyring
from sendarix.config.settings import LimitsConfig, ListenerConfig
from sendarix.ingress import policy
from sendarix.ingress.activity import IntakeActivity
from sendarix.ingress.authlimit import client_key
from sendarix.ingress.datareader import ChunkDataReader, DataResult, DotDataReader
from sendarix.ingress.ratelimit import RateLimiter
from sendarix.ingress.sasl import MECHANISMS, SASLError, XOAuth2Mechanism
from sendarix.ingress.tls import ReloadableServerTLS, connection_tls_info
from sendarix.interfaces import (
    IAuthLimiter,
    ICredentialStore,
    IRateLimiter,
    ISubmitter,
    ISuppressionStore,
)
from sendarix.model.address import (
    AddressSyntaxError,
    parse_command_arg,
    parse_params,
    parse_path,
)
from sendarix.model.credential import Credential
from sendarix.model.domain import SendingDomain
from sendarix.model.message import Envelope, Reply, TLSInfo
from sendarix.stores.errors import StoreUnavailable

log = Logger()

COMMAND, DATA, BDAT, AUTH, CLOSED = "COMMAND", "DATA", "BDAT", "AUTH", "CLOSED"

# A command line is limited by policy (512 octets); AUTH responses may be longer
# (RFC 4954 section 4), up to this much buffered without a line end.
_MAX_BUFFERED_LINE = 16384
# While a reply is pending, stop reading from the socket past this much input.
_PAUSE_ABOVE = 256 * 1024

# RFC 3461 xtext: printable ASCII without "+" and "=", and "+XX" hex escapes.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_ORCPT = re.compile(r"[A-Za-z0-9-]+;(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _valid_notify(value: str | None) -> bool:
    """NOTIFY=NEVER, or a comma list of SUCCESS, FAILURE and DELAY (RFC 3461 4.1)."""
    if not value:
        return False
    words = value.split(",")
    return words == ["NEVER"] or (len(set(words)) == len(words) and set(words) <= _NOTIFY_WORDS)
_MAX_ERRORS = 20
_TOO_BIG = "Message size exceeds fixed maximum message size"
# Session state after a refused XOAUTH2 token: the error challenge awaits its answer.
_XOAUTH2_REFUSED = object()


def _sends_at_once(transport: object) -> bool:
    """Whether a reply written to ``transport`` now leaves at once: the listeners'
    plain connections say so (``sends_at_once``); a TLS layer, like Twisted's own
    transports, holds writes until the reactor's next look at its sockets."""
    check = getattr(transport, "sends_at_once", None)
    return bool(check is not None and check())


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


@functools.lru_cache(maxsize=4096)
def _in_networks(ip: str, networks: tuple[Any, ...]) -> bool:
    # Asked once per session, mostly about the same few clients: each address is
    # parsed and matched once (a bounded cache, so many clients only cost misses).
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


@frozen
class ListenerSettings:
    """Everything a session on one listener needs, shared by its connections."""

    listener: ListenerConfig
    limits: LimitsConfig
    hostname: str
    intake: Intake
    clock: IReactorTime
    portal: Portal | None
    credentials: ICredentialStore | None
    auth_limiter: IAuthLimiter
    rate_limiter: IRateLimiter
    tls_options: CertificateOptions | ReloadableServerTLS | None
    suppressions: ISuppressionStore | None = None
    bare_line_endings: str = "normalize"
    #: Sending domains, for ``require_verified_domains`` at MAIL FROM.
    keyring: DomainKeyring | None = None
    require_verified_domains: bool = False
    #: tenant name → (messages, period seconds) from ``[tenant.NAME] rate``.
    tenant_rates: Mapping[str, tuple[float, float]] = field(factory=dict)
    #: tenant name → messages per rolling day, from ``[tenant.NAME] quota``.
    tenant_quotas: Mapping[str, int] = field(factory=dict)
    #: Is this recipient a feedback address (a report: accepted from anyone, read,
    #: never relayed)?
    is_feedback: Callable[[str], bool] = lambda address: False
    #: The simulator's domain (its ``suppressed`` address is refused as suppressed).
    simulator_domain: str | None = None
    #: The process's count of clients sending mail (delivery reads it).
    activity: IntakeActivity | None = None

    @property
    def implicit_tls(self) -> bool:
        return self.listener.tls == "implicit"

    def trusted(self, ip: str) -> bool:
        return _in_networks(ip, self.listener.trusted_networks)


class SubmissionServer(smtp.ESMTP):
    """One SMTP session on a submission (or relay) listener."""

    factory: SubmissionFactory
    # Always a TCP/TLS transport once connected (typed loosely: Twisted's is Optional).
    transport: Any

    def __init__(self, settings: ListenerSettings) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=settings.tls_options)
        self.settings = settings
        # The address the factory counted this session under (its per-IP limit).
        self.counted_ip = ""
        self.host = settings.hostname.encode("idna") if settings.hostname else b"localhost"
        self.timeout = int(settings.limits.command_timeout)
        self._inbuf = b""
        self._skipping_long_line = False
        self._waiting = False
        self._processing = False
        self._paused = False
        self._mode = COMMAND
        self._errors = 0
        self._shutdown_requested = False
        # Counted in settings.activity as sending mail: from the connection until the
        # reply that ends its first transaction, then from each MAIL to that reply.
        self._receiving = False
        self._reset_session()

    def callLater(self, period: float, func: Callable[..., Any]) -> Any:
        # TimeoutMixin schedules idle timeouts through this: the injected clock.
        return self.settings.clock.callLater(period, func)

    # -- state ------------------------------------------------------------------

    def _reset_session(self) -> None:
        """Forget everything negotiated on the connection (greeting, AUTH, transaction)."""
        self._helo_name: str | None = None
        self._esmtp = False
        self._credential: Credential | None = None
        self._sasl: Any = None
        self._reset_transaction()

    def _drop_transaction(self) -> None:
        """RSET, or a new greeting: the transaction under way (if any) is dropped."""
        if self.in_transaction:
            self._stop_counting()
        self._reset_transaction()

    def _count_as_sending(self) -> None:
        if not self._receiving and self.settings.activity is not None:
            self._receiving = True
            self.settings.activity.began()

    def _stop_counting(self) -> None:
        if self._receiving:
            self._receiving = False
            assert self.settings.activity is not None
            self.settings.activity.ended()

    def _reset_transaction(self) -> None:
        self._ret: str | None = None
        self._envid: str | None = None
        self._notify: dict[str, str] = {}
        self._orcpt: dict[str, str] = {}
        self._sender: str | None = None
        self._recipients: list[str] = []
        self._body_type: str | None = None
        self._smtputf8 = False
        self._queue_id: str | None = None
        self._reader: DotDataReader | None = None
        self._chunks: ChunkDataReader | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_failed: Reply | None = None

    @cached_property
    def client_ip(self) -> str:
        # The peer of a connection never changes; policy asks for it on every command.
        peer = self.transport.getPeer()
        return str(getattr(peer, "host", peer))

    @cached_property
    def _client_trusted(self) -> bool:
        return self.settings.trusted(self.client_ip)

    @property
    def tls_active(self) -> bool:
        return self.settings.implicit_tls or self.startedTLS

    @property
    def in_transaction(self) -> bool:
        return self._sender is not None

    def _tls_info(self) -> TLSInfo | None:
        if not self.tls_active:
            return None
        info = connection_tls_info(self.transport)
        return TLSInfo(*info) if info else None

    def _tenant(self) -> str:
        return self._credential.tenant if self._credential else self.settings.listener.tenant

    # -- connection -------------------------------------------------------------

    def connectionMade(self) -> None:
        # A client that connects has come to send, most likely: counted until its
        # first transaction ends (or it leaves), however long its greeting takes.
        self._count_as_sending()
        transport = self.transport
        self._helo = (None, self.client_ip.encode())
        self.canStartTLS = (
            ITLSTransport.providedBy(transport)
            and self.ctx is not None
            and self.settings.listener.tls == "starttls"
        )
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass
        self.reply(220, None, f"{self.settings.hostname} ESMTP Sendarix")
        self.setTimeout(self.timeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._mode = CLOSED
        self._reset_transaction()
        self._stop_counting()
        self.setTimeout(None)
        self.factory.session_ended(self)

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.settings.hostname} Timeout, closing connection")
        self._close()

    def shutdown(self) -> None:
        """The server is stopping: end the session now if idle, else after the reply
        to the current transaction."""
        self._shutdown_requested = True
        self._maybe_end_for_shutdown()

    def _maybe_end_for_shutdown(self) -> None:
        if (
            self._shutdown_requested
            and self._mode == COMMAND
            and not self._waiting
            and not self.in_transaction
        ):
            self.reply(421, "4.3.2", f"{self.settings.hostname} Service shutting down")
            self._close()

    def force_close(self) -> None:
        """End the session at once (shutdown grace period is over)."""
        if self._mode != CLOSED:
            self.reply(421, "4.3.2", f"{self.settings.hostname} Service shutting down")
            self._close()

    def _close(self) -> None:
        self._mode = CLOSED
        self._inbuf = b""
        if self.transport is not None:
            self.transport.loseConnection()

    # -- replies ----------------------------------------------------------------

    def reply(self, code: int, enhanced: str | None, text: str | list[str]) -> None:
        """Send a (possibly multi-line) reply with its enhanced status code."""
        if self._mode == CLOSED and code != 421:
            return
        lines = text if isinstance(text, list) else [text]
        prefix = f"{enhanced} " if enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{prefix}{line}")
        self.transport.write(("\r\n".join(out) + "\r\n").encode("utf-8", "replace"))

    def _send(self, r: Reply) -> None:
        self.reply(r.code, r.enhanced, r.text)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        # Only reached from inherited Twisted code paths we did not override.
        self.reply(code, None, _text(message).splitlines() or [""])

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A reply for a client error; too many of them end the session."""
        self.reply(code, enhanced, text)
        self._errors += 1
        if self._errors >= _MAX_ERRORS:
            self.reply(
                421, "4.7.0", f"{self.settings.hostname} Too many errors, closing connection"
            )
            self._close()

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == CLOSED:
            return
        self._inbuf += data
        self._process()

    def _process(self) -> None:
        """Consume buffered input until it runs out or a reply is pending."""
        if self._processing:
            return
        self._processing = True
        try:
            while self._inbuf and not self._waiting and self._mode != CLOSED:
                if self._mode == DATA:
                    self._consume_data()
                elif self._mode == BDAT:
                    self._consume_bdat()
                elif not self._consume_line():
                    break
        finally:
            self._processing = False
        self._flow_control()
        self._maybe_end_for_shutdown()

    def _flow_control(self) -> None:
        if self.transport is None:
            return
        if self._waiting and len(self._inbuf) > _PAUSE_ABOVE and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not self._waiting:
            self._paused = False
            self.transport.resumeProducing()

    def _wait(self, d: Deferred[Any]) -> None:
        """Hold further input until ``d`` fires, so replies stay in command order."""
        self._waiting = True

        def resume(result: object) -> None:
            self._waiting = False
            if self._mode != CLOSED:
                self._process()
            if isinstance(result, Failure):
                log.failure("unhandled error in SMTP session", result)

        d.addBoth(resume)

    def _consume_line(self) -> bool:
        idx = self._inbuf.find(b"\n")
        if idx < 0:
            if len(self._inbuf) > self._line_limit():
                # Keep no more of an endless line, and answer at once: a client that
                # never sends CR LF must not wait for the command timeout.  The rest
                # of the line, up to its end, is dropped without another reply.
                self._inbuf = b""
                if not self._skipping_long_line:
                    self._skipping_long_line = True
                    if self._mode == AUTH:
                        self._mode = COMMAND
                        self._sasl = None
                    self._error(500, "5.5.2", "Line too long")
            return False
        line, self._inbuf = self._inbuf[:idx], self._inbuf[idx + 1 :]
        if self._skipping_long_line:
            self._skipping_long_line = False
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        self.resetTimeout()
        if self._mode == AUTH:
            self._auth_response(line)
        else:
            self._command(line)
        return True

    def _line_limit(self) -> int:
        """The longest partial line kept while waiting for its end: a command line's
        limit, or the SASL bound for AUTH (its responses and initial responses, such
        as XOAUTH2 tokens, are long)."""
        if self._mode == AUTH or self._inbuf[:5].upper() == b"AUTH ":
            return _MAX_BUFFERED_LINE
        return self.settings.limits.max_command_length

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.strip().partition(b" ")
        is_auth = verb.upper() == b"AUTH"
        if len(line) + 2 > self.settings.limits.max_command_length and not is_auth:
            self._error(500, "5.5.2", "Line too long")
            return
        if b"\0" in line or not verb:
            self._error(500, "5.5.2", "Syntax error")
            return
        if not (verb.isalpha() and len(verb) <= 16):
            self._error(500, "5.5.2", "Command unrecognized")
            return
        handler = getattr(self, "smtp_" + verb.decode("ascii").upper(), None)
        if handler is None:
            self._error(500, "5.5.2", "Command unrecognized")
            return
        handler(rest.strip())

    # -- session commands -------------------------------------------------------

    def smtp_HELO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=False)

    def smtp_EHLO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=True)

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not rest or b" " in rest:
            self._error(501, "5.5.4", f"Syntax: {verb} hostname")
            return
        self._drop_transaction()
        self._helo_name = _text(rest)
        self._esmtp = esmtp
        first = f"{self.settings.hostname} Hello {self._helo_name} [{self.client_ip}]"
        if not esmtp:
            self.reply(250, None, first)
            return
        self.reply(250, None, [first, *self.extensions_list()])

    def extensions_list(self) -> list[str]:
        """The EHLO keywords for the current state of the session."""
        ext = [
            "PIPELINING",
            f"SIZE {self.settings.limits.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        if self.canStartTLS and not self.tls_active:
            ext.append("STARTTLS")
        if self.tls_active and self.settings.listener.auth != "none" and self._credential is None:
            ext.append("AUTH " + " ".join(m.decode() for m in self._mechanisms()))
        return ext

    def _mechanisms(self) -> dict[bytes, Any]:
        """The SASL mechanisms the portal has a checker for."""
        if self.settings.portal is None:
            return {}
        supported = self.settings.portal.listCredentialsInterfaces()
        return {n: m for n, m in MECHANISMS.items() if m.credential_interface in supported}

    def smtp_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "OK")

    def smtp_RSET(self, rest: bytes) -> None:
        self._drop_transaction()
        self.reply(250, "2.0.0", "OK")

    def smtp_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, rest: bytes) -> None:
        self.reply(502, "5.5.1", "EXPN not available")

    def smtp_HELP(self, rest: bytes) -> None:
        self.reply(
            214,
            "2.0.0",
            ["Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
             "See RFC 5321"],
        )

    def smtp_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", f"{self.settings.hostname} closing connection")
        self._close()

    def smtp_STARTTLS(self, rest: bytes) -> None:
        if self.tls_active:
            self._error(503, "5.5.1", "TLS already active")
            return
        if not self.canStartTLS:
            self._error(502, "5.5.1", "STARTTLS not available")
            return
        if rest:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 4.2 and the CVE-2011-0411 class: nothing sent before the handshake
        # may be acted on, and the session starts over.
        self._inbuf = b""
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self._reset_session()

    # -- AUTH -------------------------------------------------------------------

    def smtp_AUTH(self, rest: bytes) -> None:
        if self.settings.listener.auth == "none" or self.settings.portal is None:
            self._error(502, "5.5.1", "AUTH not available")
            return
        if not self.tls_active:
            self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if self._helo_name is None:
            self._error(503, "5.5.1", "Send EHLO first")
            return
        if self._credential is not None:
            self._error(503, "5.5.1", "Already authenticated")
            return
        if self.in_transaction:
            self._error(503, "5.5.1", "AUTH not permitted during a mail transaction")
            return
        now = self.settings.clock.seconds()
        if self.settings.auth_limiter.is_locked(self.client_ip, now):
            self.reply(421, "4.7.0", "Too many authentication failures, try again later")
            self._close()
            return
        mech_name, _, initial = rest.partition(b" ")
        mechanism = self._mechanisms().get(mech_name.upper())
        if mechanism is None:
            self._error(504, "5.5.4", "Unrecognized authentication type")
            return
        self._sasl = mechanism()
        initial = initial.strip()
        if initial:
            self._auth_response(initial, initial_response=True)
        else:
            self._mode = AUTH
            self._challenge()

    def _challenge(self) -> None:
        self.reply(334, None, base64.b64encode(self._sasl.challenge()).decode("ascii"))

    def _auth_response(self, line: bytes, initial_response: bool = False) -> None:
        self._mode = COMMAND
        if self._sasl is _XOAUTH2_REFUSED:
            # The client's answer to the XOAUTH2 error challenge: now the 535.
            self._sasl = None
            self._error(535, "5.7.8", "Authentication credentials invalid")
            return
        if line == b"*":
            self._sasl = None
            self._error(501, "5.0.0", "Authentication aborted")
            return
        try:
            data = b"" if (initial_response and line == b"=") else base64.b64decode(
                line, validate=True
            )
            self._sasl.respond(data)
        except (binascii.Error, ValueError, SASLError):
            self._sasl = None
            self._error(501, "5.5.2", "Cannot decode the authentication response")
            return
        if not self._sasl.done:
            self._mode = AUTH
            self._challenge()
            return
        mechanism, self._sasl = self._sasl, None
        assert self.settings.portal is not None
        d: Deferred[Any] = self.settings.portal.login(mechanism, None, ISubmitter)
        d.addCallback(self._authenticated)
        d.addErrback(self._auth_failed, mechanism)
        self._wait(d)

    def _authenticated(self, result: tuple[Any, Credential, Callable[[], None]]) -> None:
        _, credential, _ = result
        if (
            not credential.active
            or not credential.has_scope("smtp")
            or not credential.allows_ip(self.client_ip)
        ):
            raise UnauthorizedLogin("credential not usable from here")
        self.settings.auth_limiter.succeeded(self.client_ip, self.settings.clock.seconds())
        self._credential = credential
        self.reply(235, "2.7.0", "Authentication successful")

    def _auth_failed(self, failure: Failure, mechanism: Any = None) -> Deferred[None] | None:
        if not failure.check(UnauthorizedLogin):
            log.failure("authentication backend failed", failure)
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return None
        now = self.settings.clock.seconds()
        ip = self.client_ip
        self.settings.auth_limiter.failed(ip, now)
        delay = self.settings.auth_limiter.delay_for(ip, now)

        def answer() -> None:
            if self._mode == CLOSED:
                return
            if self.settings.auth_limiter.is_locked(ip, self.settings.clock.seconds()):
                self.reply(421, "4.7.0", "Too many authentication failures, try again later")
                self._close()
            elif isinstance(mechanism, XOAuth2Mechanism):
                # XOAUTH2: an error challenge first; 535 after the client answers it.
                self._sasl = _XOAUTH2_REFUSED
                self._mode = AUTH
                self.reply(334, None, base64.b64encode(XOAuth2Mechanism.ERROR).decode("ascii"))
            else:
                self._error(535, "5.7.8", "Authentication credentials invalid")

        if delay <= 0:
            answer()
            return None
        return defer.Deferred.fromCoroutine(_sleep_then(self.settings.clock, delay, answer))

    # -- the mail transaction ---------------------------------------------------

    def _client(self) -> policy.Client:
        return policy.Client(self.client_ip, self._client_trusted, self._credential)

    def smtp_MAIL(self, rest: bytes) -> None:
        if self._helo_name is None:
            self._error(503, "5.5.1", "Send EHLO/HELO first")
            return
        if self.in_transaction:
            self._error(503, "5.5.1", "Nested MAIL command")
            return
        try:
            raw_path, raw_params = parse_command_arg(rest, b"FROM")
            params = parse_params(raw_params) if self._esmtp else {}
            if raw_params.strip() and not self._esmtp:
                raise AddressSyntaxError("parameters need EHLO")
        except AddressSyntaxError as e:
            self._error(501, "5.5.4", f"Syntax: MAIL FROM:<address> [parameters] ({e})")
            return
        smtputf8 = "SMTPUTF8" in params
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self._error(501, "5.5.4", "SIZE needs a number")
                    return
                if int(value) > self.settings.limits.max_message_size:
                    self._refuse(Reply(552, "5.3.4", _TOO_BIG))
                    return
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self._error(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                    return
            elif key == "SMTPUTF8":
                if value is not None:
                    self._error(501, "5.5.4", "SMTPUTF8 takes no value")
                    return
            elif key == "RET":
                if (value or "").upper() not in ("FULL", "HDRS"):
                    self._error(501, "5.5.4", "RET must be FULL or HDRS")
                    return
            elif key == "ENVID":
                if not value or len(value) > 100 or not _XTEXT.fullmatch(value):
                    self._error(501, "5.5.4", "ENVID must be xtext of at most 100 characters")
                    return
            elif key == "AUTH":
                pass  # advisory (RFC 4954): who the message is on behalf of
            else:
                self._error(555, "5.5.4", f"Unsupported parameter {key}")
                return
        try:
            path = parse_path(raw_path, allow_null=True, utf8=smtputf8)
        except AddressSyntaxError as e:
            if getattr(e, "needs_utf8", False):
                self._error(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
            else:
                self._error(553, "5.1.7", f"Bad sender address syntax ({e})")
            return
        client = self._client()
        refusal = policy.relay_refusal(self.settings.listener.auth, client)
        if refusal is not None:
            self._refuse(refusal, sender=path.address)
            return
        if self._credential is None:
            if policy.recipient_relay_refusal(self.settings.listener.auth, client):
                # Every recipient will be refused: nothing to count or look up.
                self._start_transaction(path.address, params, smtputf8)
                return
            if self._tenant_rate_ok(path.address):
                checking = self._start_if_domain_allowed(path.address, params, smtputf8)
                if checking is not None:
                    self._wait(checking)
            return
        # Revocation and rotation take effect at once: re-read the credential.
        d: Deferred[Any] = defer.maybeDeferred(self._recheck_credential, path.address)
        def proceed(ok: bool) -> Deferred[None] | None:
            if ok and self._tenant_rate_ok(path.address):
                return self._start_if_domain_allowed(path.address, params, smtputf8)
            return None

        d.addCallback(proceed)
        d.addErrback(self._internal_error)
        self._wait(d)

    def _recheck_credential(self, sender: str) -> Deferred[bool] | bool:
        assert self._credential is not None
        if self.settings.credentials is None:
            return self._check_sender_scope(self._credential, sender)

        presented = self._credential

        def check(current: Credential | None) -> bool:
            refusal = policy.credential_refusal(presented, current, self.client_ip)
            if refusal is not None:
                self._credential = None
                self._refuse(refusal, sender=sender)
                return False
            assert current is not None
            self._credential = current
            return self._check_sender_scope(current, sender)

        return self.settings.credentials.get(presented.name).addCallback(check)

    def _check_sender_scope(self, cred: Credential, sender: str) -> bool:
        settings = self.settings
        refusal = policy.sender_refusal(
            cred, sender, settings.rate_limiter, settings.clock.seconds()
        )
        if refusal is not None:
            self._refuse(refusal, sender=sender)
            return False
        return True

    def _start_if_domain_allowed(
        self, sender: str, params: dict[str, str | None], smtputf8: bool
    ) -> Deferred[None] | None:
        """Start the transaction, or refuse it (550 5.7.1) when verified sending domains
        are required and the sender's is not one; a Deferred while the lookup runs."""
        keyring = self.settings.keyring
        if keyring is None or not policy.needs_verified_domain(
            self.settings.require_verified_domains, sender
        ):
            self._start_transaction(sender, params, smtputf8)
            return None
        domain = policy.domain_of(sender)
        tenant = self._tenant()

        def checked(sd: SendingDomain | None) -> None:
            refusal = policy.verified_domain_refusal(domain, sd, tenant)
            if refusal is not None:
                self._refuse(refusal, sender=sender)
                return
            self._start_transaction(sender, params, smtputf8)

        d = keyring.lookup(domain).addCallback(checked)
        d.addErrback(self._internal_error)
        return d
    def _tenant_rate_ok(self, sender: str) -> bool:
        """The tenant's ``[tenant.NAME] rate`` (messages per period, all credentials
        and listeners of the tenant together on this node): 450 4.7.1 when over it."""
        settings = self.settings
        now = settings.clock.seconds()
        refusal = policy.tenant_rate_refusal(
            self._tenant(), settings.tenant_rates, settings.rate_limiter, now
        ) or policy.tenant_quota_refusal(
            self._tenant(), settings.tenant_quotas, settings.rate_limiter, now
        )
        if refusal is None:
            return True
        self._refuse(refusal, sender=sender)
        return False

    def _start_transaction(
        self, sender: str, params: dict[str, str | None], smtputf8: bool
    ) -> None:
        self._reset_transaction()
        self._sender = sender
        self._body_type = (params.get("BODY") or "").upper() or None
        self._smtputf8 = smtputf8
        self._ret = (params.get("RET") or "").upper() or None
        self._envid = params.get("ENVID")
        self._queue_id = self.settings.intake.new_queue_id()
        self._count_as_sending()
        self.reply(250, "2.1.0", "Sender OK")

    def smtp_RCPT(self, rest: bytes) -> None:
        if not self.in_transaction:
            self._error(503, "5.5.1", "Need MAIL before RCPT")
            return
        try:
            raw_path, raw_params = parse_command_arg(rest, b"TO")
            params = parse_params(raw_params) if raw_params.strip() else {}
            path = parse_path(raw_path, allow_null=False, utf8=self._smtputf8)
        except AddressSyntaxError as e:
            if getattr(e, "needs_utf8", False):
                self._error(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
            else:
                self._error(501, "5.1.3", f"Bad recipient address syntax ({e})")
            return
        for key in params:
            if key not in ("NOTIFY", "ORCPT"):
                self._error(555, "5.5.4", f"Unsupported parameter {key}")
                return
        notify = (params.get("NOTIFY") or "").upper() or None
        if "NOTIFY" in params and not _valid_notify(notify):
            self._error(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS, FAILURE, DELAY")
            return
        orcpt = params.get("ORCPT")
        if "ORCPT" in params and not (orcpt and _ORCPT.fullmatch(orcpt)):
            self._error(501, "5.5.4", "ORCPT must be addr-type;xtext")
            return
        if notify:
            self._notify[path.address] = notify
        if orcpt:
            self._orcpt[path.address] = orcpt
        if self.settings.is_feedback(path.address):
            # Reports come from anyone (mailbox providers): no relay, rate or
            # suppression check applies; the message is read, never relayed.
            self._recipient_ok(path.address)
            return
        refusal = policy.recipient_relay_refusal(self.settings.listener.auth, self._client())
        if refusal is not None:
            self._refuse(refusal, sender=self._sender, recipients=[path.address])
            return
        refusal = policy.recipient_count_refusal(len(self._recipients),
                                                 self.settings.limits.max_recipients)
        if refusal is not None:
            self._send(refusal)  # the client sends the rest in another transaction
            return
        refusal = policy.recipient_rate_refusal(
            self._credential, self.settings.limits.recipient_rate, self.settings.rate_limiter,
            self.settings.clock.seconds(),
        )
        if refusal is not None:
            self._refuse(refusal, sender=self._sender, recipients=[path.address])
            return
        simulated = policy.simulator_suppressed(
            path.address, self.settings.simulator_domain,
            self._credential is not None and self._credential.sandbox,
        )
        if self.settings.suppressions is None and not simulated:
            self._recipient_ok(path.address)
            return
        tenant = self._tenant()
        d: Deferred[Any] = (
            succeed(None) if self.settings.suppressions is None or simulated
            else self.settings.suppressions.is_suppressed(tenant, path.address)
        )

        def checked(entry: object) -> None:
            refusal = policy.suppression_refusal(entry, simulated)
            if refusal is None:
                self._recipient_ok(path.address)
                return
            self.settings.intake.suppressed(path.address, tenant=tenant, sender=self._sender)
            assert refusal.enhanced is not None
            self._error(refusal.code, refusal.enhanced, refusal.text)

        d.addCallbacks(checked, self._internal_error)
        self._wait(d)

    def _recipient_ok(self, address: str) -> None:
        if not self.in_transaction:
            return  # the session was reset while the check ran
        self._recipients.append(address)
        self.reply(250, "2.1.5", "Recipient OK")

    def smtp_DATA(self, rest: bytes) -> None:
        if self._chunks is not None:
            self._error(503, "5.5.1", "DATA not allowed after BDAT")
            return
        if not self.in_transaction:
            self._error(503, "5.5.1", "Need MAIL before DATA")
            return
        if not self._recipients:
            self._error(554, "5.5.1", "No valid recipients")
            return
        self._reader = DotDataReader(
            self.settings.limits.max_message_size,
            self.settings.limits.max_line_length,
            self.settings.bare_line_endings,
        )
        self._mode = DATA
        self.setTimeout(int(self.settings.limits.data_timeout))
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _consume_data(self) -> None:
        assert self._reader is not None
        chunk, self._inbuf = self._inbuf, b""
        self.resetTimeout()
        used = self._reader.feed(chunk)
        if used is None:
            return
        self._inbuf = chunk[used:]
        result = self._reader.result()
        self._reader = None
        self._mode = COMMAND
        self.setTimeout(self.timeout)
        self._end_of_message(result)

    def smtp_BDAT(self, rest: bytes) -> None:
        parts = rest.split()
        if not parts or len(parts) > 2 or not parts[0].isdigit() or (
            len(parts) == 2 and parts[1].upper() != b"LAST"
        ):
            # Without a valid size the chunk cannot be skipped: the session is lost.
            self.reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
            self._close()
            return
        size = int(parts[0])
        self._bdat_remaining = size
        self._bdat_last = len(parts) == 2
        if self._reader is not None:
            self._bdat_failed = Reply(503, "5.5.1", "BDAT not allowed after DATA")
        elif not self.in_transaction:
            self._bdat_failed = self._bdat_failed or Reply(503, "5.5.1", "Need MAIL before BDAT")
        elif not self._recipients:
            self._bdat_failed = self._bdat_failed or Reply(554, "5.5.1", "No valid recipients")
        if self._chunks is None and self._bdat_failed is None:
            self._chunks = ChunkDataReader(
                self.settings.limits.max_message_size,
                self.settings.limits.max_line_length,
                self.settings.bare_line_endings,
            )
        self._mode = BDAT
        self.setTimeout(int(self.settings.limits.data_timeout))
        if size == 0:
            self._end_bdat_chunk()

    def _consume_bdat(self) -> None:
        take = min(self._bdat_remaining, len(self._inbuf))
        chunk, self._inbuf = self._inbuf[:take], self._inbuf[take:]
        self._bdat_remaining -= take
        self.resetTimeout()
        if self._chunks is not None and self._bdat_failed is None:
            self._chunks.add_chunk(chunk)
        if self._bdat_remaining == 0:
            self._end_bdat_chunk()

    def _end_bdat_chunk(self) -> None:
        self._mode = COMMAND
        self.setTimeout(self.timeout)
        if self._bdat_failed is not None:
            failed, self._bdat_failed = self._bdat_failed, None
            if self._bdat_last or failed.code != 503 or self._chunks is None:
                self._chunks = None
            self._error(failed.code, failed.enhanced or "5.5.1", failed.text)
            return
        assert self._chunks is not None
        if not self._bdat_last:
            self.reply(250, "2.0.0", f"{self._chunks.size} octets received")
            return
        result = self._chunks.result()
        self._chunks = None
        self._end_of_message(result)

    def _end_of_message(self, result: DataResult) -> None:
        refusal = None
        if result.oversize:
            refusal = Reply(552, "5.3.4", _TOO_BIG)
        elif result.long_line:
            refusal = Reply(
                554, "5.6.0",
                f"Message has a line longer than {self.settings.limits.max_line_length} octets",
            )
        elif result.bare_line_ending and self.settings.bare_line_endings == "reject":
            refusal = Reply(554, "5.6.11", "Bare CR or LF not allowed in message text")
        if refusal is not None:
            self._refuse(refusal, sender=self._sender, recipients=self._recipients)
            self._reset_transaction()
            self._stop_counting()
            return
        assert self._sender is not None and self._queue_id is not None
        tls = self._tls_info()
        submission = Submission(
            queue_id=self._queue_id,
            envelope=Envelope(
                sender=self._sender,
                recipients=tuple(self._recipients),
                body=self._body_type,
                smtputf8=self._smtputf8,
                ret=self._ret,
                envid=self._envid,
                notify=tuple((a, n) for a, n in self._notify.items() if a in self._recipients),
                orcpt=tuple((a, o) for a, o in self._orcpt.items() if a in self._recipients),
            ),
            body=result.body,
            tenant=self._tenant(),
            client_ip=self.client_ip,
            helo=self._helo_name or "",
            listener=self.settings.listener.name,
            protocol=received_protocol(self._esmtp, self.tls_active, self._credential is not None),
            tls=tls,
            credential=self._credential,
        )
        self._reset_transaction()
        d = self.settings.intake.accept(
            submission, reply_sent_at_once=_sends_at_once(self.transport)
        )
        d.addCallbacks(self._queued, self._not_queued, errbackArgs=(submission,))
        # Counted until answered.  The message is handed to delivery after its reply
        # (Intake's after_reply), when this session no longer counts: a lone message
        # never waits for company.
        d.addBoth(self._answered)
        self._wait(d)

    def _answered(self, result: object) -> object:
        self._stop_counting()
        return result

    def _queued(self, queue_id: str) -> None:
        self.reply(250, "2.0.0", f"OK: queued as {queue_id}")

    def _not_queued(self, failure: Failure, sub: Submission) -> None:
        if failure.check(Refused):
            refused = failure.value
            assert isinstance(refused, Refused)
            self._refuse(refused.reply, sender=sub.envelope.sender,
                         recipients=sub.envelope.recipients, queue_id=sub.queue_id)
            return
        if failure.check(StoreUnavailable):
            log.warn("spool did not take {queue_id}: {why}", queue_id=sub.queue_id,
                     why=failure.getErrorMessage())
        else:
            log.failure("spool did not take {queue_id}", failure, queue_id=sub.queue_id)
        self._refuse(Reply(451, "4.3.0", "Temporary failure storing the message, try again"),
                     sender=sub.envelope.sender, recipients=sub.envelope.recipients)

    def _refuse(
        self,
        reply: Reply,
        *,
        sender: str | None = None,
        recipients: list[str] | tuple[str, ...] = (),
        queue_id: str | None = None,
    ) -> None:
        """Answer a policy refusal and record a ``rejected`` event."""
        self.settings.intake.rejected(
            reply, tenant=self._tenant(), sender=sender, recipients=tuple(recipients),
            queue_id=queue_id,
        )
        self._error(reply.code, reply.enhanced or "", reply.text)

    def _internal_error(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            log.warn("store unavailable in SMTP session: {why}", why=failure.getErrorMessage())
        else:
            log.failure("error in SMTP session", failure)
        self.reply(451, "4.3.0", "Local error in processing, try again")


async def _sleep_then(clock: IReactorTime, delay: float, fn: Callable[[], None]) -> None:
    d: Deferred[None] = Deferred()
    clock.callLater(delay, d.callback, None)
    await d
    fn()


class _Refuser(Protocol):
    """Answers ``421`` and closes: the connection limit is reached."""

    transport: Any

    def __init__(self, hostname: str, why: str) -> None:
        self._hostname = hostname
        self._why = why

    def connectionMade(self) -> None:
        self.transport.write(f"421 4.7.0 {self._hostname} {self._why}\r\n".encode())
        self.transport.loseConnection()


class SubmissionFactory(ServerFactory):
    """Builds sessions for one listener; enforces connection limits; drains on stop."""

    def __init__(self, settings: ListenerSettings) -> None:
        self.settings = settings
        self.sessions: set[SubmissionServer] = set()
        self._per_ip: dict[str, int] = {}
        self._drained: list[Deferred[None]] = []
        self._connection_rate = RateLimiter()

    def buildProtocol(self, addr: Any) -> Protocol:
        ip = str(getattr(addr, "host", addr))
        listener = self.settings.listener
        if len(self.sessions) >= listener.max_connections:
            p: Protocol = _Refuser(self.settings.hostname, "Too many connections, try again later")
            p.factory = self
            return p
        if self._per_ip.get(ip, 0) >= listener.max_connections_per_ip:
            p = _Refuser(self.settings.hostname, "Too many connections from your address")
            p.factory = self
            return p
        rate = listener.connection_rate
        if rate is not None and not self._connection_rate.allow(
            client_key(ip), *rate, self.settings.clock.seconds()
        ):
            p = _Refuser(self.settings.hostname, "Too many new connections from your address, "
                         "slow down")
            p.factory = self
            return p
        proto = SubmissionServer(self.settings)
        proto.factory = self
        self.sessions.add(proto)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        proto.counted_ip = ip
        return proto

    def session_ended(self, proto: SubmissionServer) -> None:
        if proto in self.sessions:
            self.sessions.discard(proto)
            ip = proto.counted_ip
            left = self._per_ip.get(ip, 1) - 1
            if left <= 0:
                self._per_ip.pop(ip, None)
            else:
                self._per_ip[ip] = left
        if not self.sessions:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self, grace: float) -> Deferred[None]:
        """Ask every session to end (idle ones now, busy ones after their transaction);
        after ``grace`` seconds close the rest.  Fires when all are gone."""
        d: Deferred[None] = Deferred()
        if not self.sessions:
            d.callback(None)
            return d
        self._drained.append(d)
        for proto in list(self.sessions):
            proto.shutdown()
        clock = self.settings.clock
        call = clock.callLater(grace, self._force_close)

        def cancel_timer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        d.addBoth(cancel_timer)
        return d

    def _force_close(self) -> None:
        for proto in list(self.sessions):
            proto.force_close()
