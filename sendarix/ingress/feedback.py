"""The feedback loop: reports that come back to the ``[feedback] domains`` become
events and suppressions, never relayed mail.

An ARF ``abuse`` report is a ``complained`` event for the original recipient and
suppresses it (reason ``complaint``); a delivery status notification is a ``bounced``
event (classified like a synchronous reply; a hard one suppresses, as the tenant's
``suppress_hard_bounces`` says) or, for a delayed report, a ``deferred`` event.

The original message is found by the reference it carried (unforgeable: see
:mod:`sendarix.cleanup.reference`), else by its Message-ID in the delivery log; and a
reported recipient counts only when the delivery log shows it was a recipient of that
message, so a report cannot suppress addresses its message never went to.  Anything
else is dropped with a log line (and counted, through ``on_result``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from sendarix.cleanup.reference import read_reference, read_verp
from sendarix.ingress.reports import Report, ReportedRecipient, parse_report
from sendarix.interfaces import IEventLog, IEventSink, ISuppressionStore
from sendarix.model.event import Event, EventQuery
from sendarix.model.message import Reply
from sendarix.scheduler.classify import BounceRules, Verdict, classify

log = Logger()


@define
class Original:
    """The message a report is about."""

    queue_id: str
    tenant: str
    message_id: str | None
    sender: str | None


def _reply(recipient: ReportedRecipient) -> Reply:
    """The reply a report carries for ``recipient``: its diagnostic code when it is
    an SMTP reply, else one made of the status."""
    status = recipient.status or ("5.0.0" if recipient.action == "failed" else "4.0.0")
    text = recipient.diagnostic or f"reported {recipient.action}"
    m = re.match(r"([245]\d\d)[ -]", text)
    default = int(status[0]) * 100 + (50 if status.startswith("5") else 51)
    code = int(m.group(1)) if m else default
    return Reply(code, status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status) else None,
                 text[:500])


@define
class FeedbackHandler:
    """Turns one received report into events and suppressions."""

    events: IEventSink
    eventlog: IEventLog
    suppressions: ISuppressionStore
    clock: Any
    node: str
    #: The key references are made with (None: only Message-ID matching).
    key: bytes | None
    rules: BounceRules
    #: tenant -> whether its hard bounces suppress.
    suppress_hard: Callable[[str], bool] = lambda tenant: True
    #: Told what came of each report (``dropped: ...`` or what was recorded; metrics).
    on_result: Callable[[str], None] | None = None

    def handle(self, body: bytes, recipients: Sequence[str] = ()) -> Deferred[str]:
        """Read one report sent to ``recipients``; fires with what came of it."""
        d = Deferred.fromCoroutine(self._handle(body, tuple(recipients)))
        if self.on_result is not None:
            d.addCallback(self._tell)
        return d

    def _tell(self, result: str) -> str:
        assert self.on_result is not None
        self.on_result(result)
        return result

    async def _handle(self, body: bytes, recipients: tuple[str, ...]) -> str:
        try:
            report = parse_report(body)
        except Exception:  # noqa: BLE001 - a report that breaks the parser is dropped
            log.failure("could not read a feedback report")
            report = None
        if report is None:
            return self._dropped("not an ARF or DSN report")
        original = await self._original(report, recipients)
        if original is None:
            return self._dropped("no message of ours matches the report")
        done = []
        for recipient in report.recipients:
            if not await self._was_recipient(original, recipient.address):
                log.warn("report names {address}, not a recipient of {queue_id}: ignored",
                         address=recipient.address, queue_id=original.queue_id)
                continue
            what = await self._apply(report, original, recipient)
            if what:
                done.append(what)
        if not done:
            return self._dropped(f"nothing to record in a {report.kind} report")
        return ", ".join(done)

    def _dropped(self, why: str) -> str:
        log.info("feedback report dropped: {why}", why=why)
        return f"dropped: {why}"

    async def _original(self, report: Report, recipients: tuple[str, ...]) -> Original | None:
        if report.reference and self.key is not None:
            ref = read_reference(self.key, report.reference)
            if ref is not None:
                accepted = await self._accepted(EventQuery(queue_id=ref.queue_id, type="accepted",
                                                           limit=1))
                return Original(ref.queue_id, ref.tenant,
                                accepted.message_id if accepted else report.message_id,
                                accepted.sender if accepted else None)
            log.warn("feedback report with a reference we did not make: ignored")
            return None
        if report.message_id:
            accepted = await self._accepted(EventQuery(message_id=report.message_id,
                                                       type="accepted", limit=1))
            if accepted is not None and accepted.queue_id and accepted.tenant:
                return Original(accepted.queue_id, accepted.tenant, accepted.message_id,
                                accepted.sender)
        # A bounce to a VERP return path names its message in the address itself.
        for address in recipients if self.key is not None else ():
            assert self.key is not None
            queue_id = read_verp(self.key, address)
            if queue_id is None:
                continue
            accepted = await self._accepted(EventQuery(queue_id=queue_id, type="accepted",
                                                       limit=1))
            if accepted is not None and accepted.tenant:
                return Original(queue_id, accepted.tenant, accepted.message_id,
                                accepted.sender)
        return None

    async def _accepted(self, query: EventQuery) -> Event | None:
        page = await self.eventlog.search(query)
        return page.events[0] if page.events else None

    async def _was_recipient(self, original: Original, address: str) -> bool:
        page = await self.eventlog.search(EventQuery(queue_id=original.queue_id,
                                                     recipient=address, limit=1))
        return bool(page.events)

    async def _apply(
        self, report: Report, original: Original, recipient: ReportedRecipient
    ) -> str | None:
        now = self.clock.seconds()
        common: dict[str, Any] = {
            "queue_id": original.queue_id, "message_id": original.message_id,
            "tenant": original.tenant, "sender": original.sender,
            "recipient": recipient.address, "node": self.node,
        }
        if report.kind == "complaint":
            # Counted against the provider the message went to, so the complaint
            # guard sees which provider's users complain.
            delivered = await self._accepted(EventQuery(
                queue_id=original.queue_id, recipient=recipient.address, type="delivered",
                limit=1))
            provider = delivered.provider if delivered is not None else None
            # The suppression first: whoever reacts to the event finds it in place.
            await self.suppressions.add(original.tenant, recipient.address,
                                        "complaint (feedback report)", "complaint", now)
            await self._emit(Event.make("complained", now, provider=provider, **common))
            return f"complaint for {recipient.address}"
        if report.kind != "dsn" or recipient.action not in ("failed", "delayed"):
            return None
        reply = _reply(recipient)
        verdict = classify(reply, self.rules)
        if recipient.action == "delayed" or verdict.verdict is not Verdict.BOUNCED:
            await self._emit(Event.make("deferred", now, response=reply,
                                        bounce_category=verdict.category, **common))
            return f"delay for {recipient.address}"
        if self.suppress_hard(original.tenant):
            await self.suppressions.add(original.tenant, recipient.address,
                                        f"late bounce: {reply.code} {reply.text}"[:200],
                                        "bounce", now)
        await self._emit(Event.make("bounced", now, response=reply,
                                    bounce_category=verdict.category, **common))
        return f"bounce for {recipient.address}"

    async def _emit(self, event: Event) -> None:
        await maybeDeferred(self.events.emit, event)
