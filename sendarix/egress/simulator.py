"""The simulator: a transport that answers like a destination would, decided by each
recipient's local part, for mail to the simulator domain (or routed
``via = "simulator"``) and all mail of sandbox credentials.  Nothing leaves the node
(docs/delivery.md, "The simulator").

:func:`simulate` is the pure answer to one recipient's attempt.  :class:`SimulatorRouter`
routes any domain to the one simulator hop, and :class:`SimulatorTransport` carries a
session to it: every recipient answered by :func:`simulate`, and each accepted
``complaint`` recipient reported back a moment later as a genuine ARF abuse report
(RFC 5965) handed to the node's feedback handler, as a mailbox provider's would be.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Sequence
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IRouter, ITransport
from sendarix.model.message import Reply
from sendarix.model.session import (
    SIMULATOR_TRANSPORT,
    Hop,
    MessageResult,
    OutboundMessage,
    RecipientReply,
    SessionOptions,
    SessionResult,
)
from sendarix.model.simulation import COMPLAINT, SUPPRESSED, local_part, simulated_kind
from sendarix.routing.mx import Route

__all__ = [
    "COMPLAINT_DELAY",
    "SIMULATOR_HOP",
    "SIMULATOR_MX",
    "SimulatorRouter",
    "SimulatorTransport",
    "abuse_report",
    "simulate",
]

log = Logger()

#: The ``mx`` of events for simulated deliveries (the simulator hop's host).
SIMULATOR_MX = "simulator"
#: The one hop every domain routed to the simulator has.
SIMULATOR_HOP = Hop(SIMULATOR_MX, SIMULATOR_MX, 0, 0, transport=SIMULATOR_TRANSPORT)
#: Seconds between a ``complaint`` recipient's delivery and its abuse report: the
#: delivery is settled (its events logged) by then, so the report finds them.
COMPLAINT_DELAY = 1.0
#: What a ``suppressed`` recipient that reached the simulator gets: such addresses
#: are refused at RCPT by the listeners, so only mail routed ``via = "simulator"``
#: to another domain gets here (bounced, as a suppressed mailbox would be).
SUPPRESSED_REPLY = Reply(550, "5.1.1", "simulated suppressed recipient: no such user")


def simulate(local: str, attempt: int) -> Reply | None:
    """The reply to a recipient's ``attempt``-th attempt (1-based), by local part;
    None means the recipient is suppressed."""
    kind = simulated_kind(local)
    if kind == SUPPRESSED:
        return None
    if kind == "bounce":
        return Reply(550, "5.1.1", "simulated bounce: no such user")
    if kind == "defer" and attempt <= 1:
        return Reply(421, "4.7.0", "simulated deferral: try again later")
    if kind == "greylist" and attempt <= 1:
        return Reply(450, "4.2.0", "simulated greylisting: greylisted, try again later")
    if kind == "timeout":
        return Reply(451, "4.4.2", "simulated timeout waiting for the server")
    return Reply(250, "2.0.0", "simulated delivery: OK")


def complains(address: str) -> bool:
    """True when ``address`` complains about the mail it accepts."""
    return simulated_kind(local_part(address)) == COMPLAINT


@implementer(IRouter)
class SimulatorRouter:
    """Routes every domain to the simulator's one hop (no DNS)."""

    def route(self, domain: str) -> Deferred[Route]:
        """See :obj:`IRouter.route`."""
        return succeed(Route(domain, (SIMULATOR_HOP,), None))


def _header_block(body: bytes) -> bytes:
    """The header section of a message (up to its first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = body.find(sep)
        if end >= 0:
            return body[: end + len(sep)]
    return body


def abuse_report(message: OutboundMessage, recipient: str, now: float) -> bytes:
    """An ARF (RFC 5965) abuse report about ``message`` from ``recipient``, with the
    message's own header returned (text/rfc822-headers), as mailbox providers send."""
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = f"<abuse@{SIMULATOR_MX}.invalid>"
    report["Subject"] = "Simulated abuse report"
    report["Date"] = email.utils.formatdate(now)
    report["Message-ID"] = email.utils.make_msgid("arf", f"{SIMULATOR_MX}.invalid")
    report.attach(MIMEText(
        f"The recipient {recipient} marked a message as spam (a simulated complaint).\n"
    ))
    fields: Message = MIMENonMultipart("message", "feedback-report")
    fields.set_payload(
        "Feedback-Type: abuse\r\n"
        "User-Agent: sendarix-simulator/1\r\n"
        "Version: 1\r\n"
        f"Original-Mail-From: <{message.sender}>\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n"
        f"Arrival-Date: {email.utils.formatdate(now)}\r\n"
    )
    report.attach(fields)
    headers = _header_block(message.body).decode("utf-8", "replace")
    report.attach(MIMEText(headers, "rfc822-headers", "utf-8"))
    return report.as_bytes()


#: Reads one report sent to the listed recipients (the node's feedback handler).
FeedbackReader = Callable[[bytes, Sequence[str]], "Deferred[str]"]


@implementer(ITransport)
class SimulatorTransport:
    """Answers every recipient by its local part, inside the node.

    :param clock: schedules the abuse reports of ``complaint`` recipients.
    :param feedback: reads those reports (None: no complaints come back).
    """

    def __init__(self, clock: Any, feedback: FeedbackReader | None = None) -> None:
        self.clock = clock
        self.feedback = feedback
        self._reports: set[IDelayedCall] = set()

    def deliver(
        self, hop: Hop, messages: Sequence[OutboundMessage], options: SessionOptions
    ) -> Deferred[SessionResult]:
        """See :meth:`ITransport.deliver`: each recipient answered at once, as if at
        RCPT; a message with any recipient accepted is accepted as a whole.  The
        options' ``pace`` is asked before each message, as over SMTP."""
        return Deferred.fromCoroutine(self._session(messages, options))

    async def _session(
        self, messages: Sequence[OutboundMessage], options: SessionOptions
    ) -> SessionResult:
        results = []
        unsent: tuple[str, ...] = ()
        for n, message in enumerate(messages):
            if options.pace is not None and not await options.pace():
                unsent = tuple(m.queue_id for m in messages[n:])
                break
            replies = []
            for i, address in enumerate(message.recipients):
                reply = simulate(local_part(address), message.attempts_of(i) + 1)
                reply = SUPPRESSED_REPLY if reply is None else reply
                replies.append(RecipientReply(address, reply))
                if reply.code // 100 == 2 and complains(address):
                    self._complain_later(message, address)
            accepted = next((r.reply for r in replies if r.reply.code // 100 == 2), None)
            results.append(MessageResult(message.queue_id, tuple(replies), accepted))
        return SessionResult(tuple(results), None, None, None, None, True, unsent)

    def _complain_later(self, message: OutboundMessage, recipient: str) -> None:
        if self.feedback is None:
            return
        call: list[IDelayedCall] = []

        def complain() -> None:
            self._reports.discard(call[0])
            self._complain(message, recipient)

        call.append(self.clock.callLater(COMPLAINT_DELAY, complain))
        self._reports.add(call[0])

    def close(self) -> Deferred[None]:
        """See :meth:`ITransport.close`: the reports not yet made are dropped (the
        stores close with the node)."""
        for call in self._reports:
            if call.active():
                call.cancel()
        if self._reports:
            log.info("{n} simulated complaints dropped at stop", n=len(self._reports))
        self._reports.clear()
        return succeed(None)

    def _complain(self, message: OutboundMessage, recipient: str) -> Deferred[Any]:
        assert self.feedback is not None
        report = abuse_report(message, recipient, self.clock.seconds())
        d = maybeDeferred(self.feedback, report, ())
        d.addCallback(lambda result: log.info(
            "simulated complaint of {recipient} about {queue_id}: {result}",
            recipient=recipient, queue_id=message.queue_id, result=result))
        d.addErrback(lambda f: log.failure(
            "the simulated complaint of {recipient} was not read", f, recipient=recipient))
        return d
