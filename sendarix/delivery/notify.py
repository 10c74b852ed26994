"""Sending delivery status notifications: when recipients of a message fail for good
(bounced or expired), the sender is told, if it asked (``NOTIFY=FAILURE``) or, when
it did not say, if its tenant's ``dsn`` says so.

Never for mail from the null sender (a DSN, or a bounce of one): no loops.  The DSN
is handed to :class:`~sendarix.cleanup.intake.Intake` like any message, so it is
signed, spooled and delivered (and retried) through the normal path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from attrs import define
from twisted.logger import Logger

from sendarix.cleanup.dsn import Failure, build_dsn
from sendarix.cleanup.intake import Submission
from sendarix.model.event import Event
from sendarix.model.message import Envelope, LeasedDelivery

log = Logger()


#: The NOTIFY word that asks for each kind of notice.
_WORD = {"bounced": "FAILURE", "expired": "FAILURE", "delivered": "SUCCESS",
         "deferred": "DELAY"}


def wants_failure_notice(envelope: Envelope, recipient: str, tenant_default: bool) -> bool:
    """Does the sender want to hear that ``recipient`` failed?"""
    return wants_notice(envelope, recipient, "bounced", tenant_default)


def wants_notice(envelope: Envelope, recipient: str, kind: str, tenant_default: bool) -> bool:
    """Does the sender want a notice of ``kind`` (an event type) for ``recipient``?
    Without NOTIFY, only failures, and only when the tenant's ``dsn`` says so."""
    if not envelope.sender or kind not in _WORD:
        return False
    notify = envelope.notify_of(recipient)
    if notify is None:
        return tenant_default and _WORD[kind] == "FAILURE"
    return _WORD[kind] in notify.split(",")


@define
class DSNNotifier:
    """Builds and queues DSNs for failed recipients."""

    intake: Any  # Intake (typed loosely: delivery must not depend on its wiring)
    hostname: str
    clock: Any
    #: tenant -> whether it gets DSNs when the client did not ask.
    tenant_default: Callable[[str], bool] = lambda tenant: False

    def failures(self, delivery: LeasedDelivery, events: Sequence[Event]) -> list[Event]:
        """The outcomes of ``delivery`` its sender wants to hear about: final failures
        (NOTIFY=FAILURE), deliveries (SUCCESS) and first deferrals (DELAY: one notice
        per recipient, at its first deferral)."""
        default = self.tenant_default(delivery.meta.tenant)
        return [e for e in events
                if e.recipient
                and (e.type != "deferred" or e.attempt == 1)
                and wants_notice(delivery.envelope, e.recipient, e.type, default)]

    async def notify(self, delivery: LeasedDelivery, failed: Sequence[Event],
                     original: bytes) -> str:
        """Queue one DSN about ``failed`` to the envelope sender; its queue id."""
        envelope = delivery.envelope
        failures = []
        for event in failed:
            assert event.recipient is not None
            reply = event.response
            action = {"delivered": "delivered", "deferred": "delayed"}.get(event.type,
                                                                            "failed")
            fallback = {"delivered": "2.0.0", "delayed": "4.0.0"}.get(action, "5.0.0")
            status = reply.enhanced if reply and reply.enhanced else fallback
            if event.type == "expired" and not status.startswith("5"):
                status = "4.4.7"  # RFC 3463: delivery time expired
            diagnostic = (f"{reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}"
                          f"{reply.text}" if reply else "delivery time expired")
            failures.append(Failure(
                event.recipient, envelope.orcpt_of(event.recipient), action, status,
                diagnostic, event.mx,
            ))
        body = build_dsn(self.hostname, envelope.sender, envelope.envid, failures, original,
                         envelope.ret == "FULL", self.clock.seconds())
        queue_id = self.intake.new_queue_id()
        await self.intake.accept(Submission(
            queue_id=queue_id,
            envelope=Envelope(sender="", recipients=(envelope.sender,)),
            body=body,
            tenant=delivery.meta.tenant,
            listener="dsn",
            protocol="ESMTP",
        ))
        log.info("DSN {dsn} to {sender} about {count} recipient(s) of {queue_id}",
                 dsn=queue_id, sender=envelope.sender, count=len(failures),
                 queue_id=delivery.queue_id)
        return queue_id
