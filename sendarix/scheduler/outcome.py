"""What happens to each recipient after an attempt: the pure planning step between the
egress replies and the spool (Postfix's bounce/defer/trace decisions).

:func:`plan_outcomes` takes what an attempt did for each recipient and returns, without
any I/O, the outcomes to record with ``ISpool.complete`` and, in order, the events to
emit and the suppressions to add afterwards.  The delivery agent carries them out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

from attrs import frozen

from sendarix.model.event import Event
from sendarix.model.message import (
    LeasedDelivery,
    RecipientOutcome,
    RecipientRecord,
    RecipientStatus,
    Reply,
    TLSInfo,
)
from sendarix.scheduler.classify import BounceRules, Classification, Verdict, classify
from sendarix.scheduler.retry import RetrySchedule


@frozen
class Attempt:
    """What one attempt did for one recipient, with where it went."""

    record: RecipientRecord
    reply: Reply
    mx: str | None = None
    mx_ip: str | None = None
    source_ip: str | None = None
    tls: TLSInfo | None = None
    #: If the recipient is deferred, not due again before this time (the end of a
    #: dead site's suspension: an attempt before it would only be deferred again).
    not_before: float | None = None


@frozen
class Suppress:
    """Add ``address`` to ``tenant``'s suppression list."""

    tenant: str
    address: str
    source: str
    reason: str


@frozen
class OutcomeRules:
    """What the planning needs to know of the node: the bounce rules, the codes that
    are soft whatever they say, the retry schedule, and who suppresses hard bounces."""

    rules: BounceRules
    soft_codes: Collection[str]
    schedule: RetrySchedule
    node: str
    #: Does this tenant's list take its hard bounces and expiries?
    suppresses: Callable[[str], bool]
    #: The provider name of an MX host (for events), or None.
    provider_for: Callable[[str], str | None]


@frozen
class OutcomePlan:
    """The outcomes to record, then the events and suppressions, in this order."""

    outcomes: tuple[RecipientOutcome, ...]
    effects: tuple[Event | Suppress, ...]


def make_event(
    kind: str,
    delivery: LeasedDelivery,
    attempt: Attempt,
    classification: Classification,
    now: float,
    rules: OutcomeRules,
) -> Event:
    """The ``kind`` event of one recipient's attempt."""
    meta = delivery.meta
    return Event.make(
        kind,
        now,
        queue_id=delivery.queue_id,
        message_id=meta.message_id,
        tenant=meta.tenant,
        sender=delivery.envelope.sender,
        recipient=attempt.record.address,
        attempt=attempt.record.attempts + 1,
        response=attempt.reply,
        mx=attempt.mx,
        mx_ip=attempt.mx_ip,
        source_ip=attempt.source_ip,
        tls=attempt.tls,
        provider=rules.provider_for(attempt.mx) if attempt.mx else None,
        bounce_category=classification.category if kind != "delivered" else None,
        tags=meta.tags,
        node=rules.node,
    )


def _reason(reply: Reply) -> str:
    text = str(reply.code) + (f" {reply.enhanced}" if reply.enhanced else "") + f" {reply.text}"
    return text[:500]  # a suppression keeps a short reason


def plan_outcomes(
    delivery: LeasedDelivery,
    attempts: Sequence[Attempt],
    now: float,
    rules: OutcomeRules,
    rng: random.Random,
) -> OutcomePlan:
    """Classify each attempt's reply, schedule deferrals (or expire them), and list
    what follows: one event per recipient, and before its event a suppression for
    each hard bounce and expiry where the tenant suppresses them."""
    outcomes: list[RecipientOutcome] = []
    effects: list[Event | Suppress] = []
    tenant = delivery.meta.tenant
    suppresses = rules.suppresses(tenant)
    for a in attempts:
        c = classify(a.reply, rules.rules, rules.soft_codes)
        address = a.record.address
        if c.verdict is Verdict.DELIVERED:
            status, kind, when = RecipientStatus.DELIVERED, "delivered", None
        elif c.verdict is Verdict.BOUNCED:
            status, kind, when = RecipientStatus.BOUNCED, "bounced", None
        else:
            when = rules.schedule.next_attempt(
                a.record.attempts + 1, delivery.meta.received_at, now, rng, c
            )
            if when is not None and a.not_before is not None and a.not_before > when:
                # No later than the lifetime allows: an attempt at the deadline is
                # still made.
                when = min(a.not_before, rules.schedule.deadline(delivery.meta.received_at))
            if when is None:
                status, kind = RecipientStatus.EXPIRED, "expired"
            else:
                status, kind = RecipientStatus.DEFERRED, "deferred"
        outcomes.append(RecipientOutcome(address, status, a.reply, when))
        if kind in ("bounced", "expired") and suppresses:
            # Ahead of its event: whoever reacts to a bounce (a webhook receiver
            # asking the API, say) finds the recipient suppressed already.
            source = "bounce" if kind == "bounced" else "expired"
            effects.append(Suppress(tenant, address, source, _reason(a.reply)))
        effects.append(make_event(kind, delivery, a, c, now, rules))
    return OutcomePlan(tuple(outcomes), tuple(effects))
