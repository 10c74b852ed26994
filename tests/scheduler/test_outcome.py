"""Tests for :mod:`sendarix.scheduler.outcome`: what happens to each recipient after an
attempt, decided without I/O (classification, schedule, events, suppressions)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.model.event import Event
from sendarix.model.message import (
    Envelope,
    Lease,
    LeasedDelivery,
    MessageMeta,
    RecipientRecord,
    RecipientStatus,
    Reply,
)
from sendarix.scheduler.classify import BounceRules
from sendarix.scheduler.outcome import (
    Attempt,
    OutcomeRules,
    Suppress,
    plan_outcomes,
)
from sendarix.scheduler.retry import RetrySchedule

T0 = 1_700_000_000.0
DAY = 86400.0


def rules(suppresses: bool = True) -> OutcomeRules:
    return OutcomeRules(
        rules=BounceRules.default(), soft_codes=(), schedule=RetrySchedule.default(),
        node="n1", suppresses=lambda tenant: suppresses,
        provider_for=lambda mx: "gmail" if mx.endswith("google.com") else None,
    )


def delivery(addresses: list[str], attempts: int = 0, received_at: float = T0) -> LeasedDelivery:
    return LeasedDelivery(
        queue_id="Q1", domain="example.org",
        envelope=Envelope("app@example.com", tuple(addresses)),
        meta=MessageMeta(tenant="acme", received_at=received_at, message_id="<m@x>",
                         tags=("t",)),
        recipients=tuple(
            RecipientRecord(a, "example.org", RecipientStatus.PENDING, attempts=attempts)
            for a in addresses
        ),
        lease=Lease("n1", T0 + 300),
    )


OK = Reply(250, "2.0.0", "OK")
HARD = Reply(550, "5.1.1", "no such user")
SOFT = Reply(451, "4.3.0", "try later")


class PlanTests(SynchronousTestCase):
    def plan(self, replies: list[Reply], suppresses: bool = True, attempts: int = 0,
             now: float = T0 + 10, received_at: float = T0, mx: str | None = None,
             not_before: float | None = None):
        addresses = [f"r{i}@example.org" for i in range(len(replies))]
        d = delivery(addresses, attempts, received_at)
        tried = [Attempt(r, reply, mx=mx, not_before=not_before)
                 for r, reply in zip(d.recipients, replies)]
        return plan_outcomes(d, tried, now, rules(suppresses), random.Random(1))

    def test_deferral_waits_for_not_before(self) -> None:
        """A deferral for a dead site is not due before the site's suspension ends,
        whatever the schedule's step; a later step is kept; the lifetime still
        bounds it."""
        now = T0 + 10
        (early,) = self.plan([SOFT], now=now).outcomes
        assert early.next_attempt is not None
        self.assertLess(early.next_attempt, now + 100)  # the first step, about 60 s
        (floored,) = self.plan([SOFT], now=now, not_before=now + 300).outcomes
        self.assertEqual((floored.status, floored.next_attempt),
                         (RecipientStatus.DEFERRED, now + 300))
        (later,) = self.plan([SOFT], now=now, attempts=3, not_before=now + 300).outcomes
        assert later.next_attempt is not None
        self.assertGreater(later.next_attempt, now + 1000)  # the fourth step, 30 min
        deadline = T0 + RetrySchedule.default().max_lifetime
        (last,) = self.plan([SOFT], now=deadline - 100, not_before=deadline + 300).outcomes
        self.assertEqual((last.status, last.next_attempt),
                         (RecipientStatus.DEFERRED, deadline))

    def test_not_before_leaves_other_verdicts_alone(self) -> None:
        delivered, bounced = self.plan([OK, HARD], not_before=T0 + 900).outcomes
        self.assertEqual((delivered.status, delivered.next_attempt),
                         (RecipientStatus.DELIVERED, None))
        self.assertEqual((bounced.status, bounced.next_attempt),
                         (RecipientStatus.BOUNCED, None))

    def test_delivered(self) -> None:
        """A 250 is delivered, one event, nothing suppressed."""
        plan = self.plan([OK], mx="alt1.gmail-smtp-in.l.google.com")
        self.assertEqual([o.status for o in plan.outcomes], [RecipientStatus.DELIVERED])
        (event,) = plan.effects
        assert isinstance(event, Event)
        self.assertEqual((event.type, event.recipient, event.attempt, event.provider),
                         ("delivered", "r0@example.org", 1, "gmail"))
        self.assertIsNone(event.bounce_category)

    def test_hard_bounce_suppresses(self) -> None:
        """A 5xx bounces and suppresses the recipient for its tenant with the reply;
        the suppression comes first, so that it is in place once the event is out."""
        plan = self.plan([HARD])
        self.assertEqual(plan.outcomes[0].status, RecipientStatus.BOUNCED)
        suppress, event = plan.effects
        assert isinstance(event, Event)
        self.assertEqual(event.type, "bounced")
        self.assertIsNotNone(event.bounce_category)
        self.assertEqual(suppress, Suppress("acme", "r0@example.org", "bounce",
                                            "550 5.1.1 no such user"))

    def test_tenant_that_keeps_bounces(self) -> None:
        """Without suppression for the tenant, a bounce is only an event."""
        plan = self.plan([HARD], suppresses=False)
        self.assertEqual([type(e) for e in plan.effects], [Event])

    def test_deferred_is_scheduled(self) -> None:
        """A 4xx within the lifetime is deferred to a later attempt."""
        now = T0 + 10
        plan = self.plan([SOFT], now=now)
        (outcome,) = plan.outcomes
        self.assertEqual(outcome.status, RecipientStatus.DEFERRED)
        assert outcome.next_attempt is not None
        self.assertGreater(outcome.next_attempt, now)

    def test_expired_after_lifetime(self) -> None:
        """A 4xx past the message's lifetime expires, and suppresses like a bounce."""
        plan = self.plan([SOFT], attempts=30, now=T0 + 6 * DAY)
        self.assertEqual(plan.outcomes[0].status, RecipientStatus.EXPIRED)
        suppress, event = plan.effects
        assert isinstance(event, Event) and isinstance(suppress, Suppress)
        self.assertEqual((event.type, suppress.source), ("expired", "expired"))

    @given(st.lists(st.sampled_from([OK, HARD, SOFT, Reply(421, "4.7.0", "slow down"),
                                     Reply(552, "5.2.2", "mailbox full")]),
                    min_size=1, max_size=20),
           st.booleans(), st.integers(0, 40), st.floats(0, 10 * DAY))
    def test_every_recipient_once(self, replies: list[Reply], suppresses: bool,
                                  attempts: int, elapsed: float) -> None:
        """Every recipient gets exactly one outcome and one event, in order; only final
        failures are suppressed; a deferral is always in the future."""
        now = T0 + elapsed
        plan = self.plan(replies, suppresses, attempts, now)
        addresses = [f"r{i}@example.org" for i in range(len(replies))]
        self.assertEqual([o.address for o in plan.outcomes], addresses)
        events = [e for e in plan.effects if isinstance(e, Event)]
        self.assertEqual([e.recipient for e in events], addresses)
        for outcome, event in zip(plan.outcomes, events):
            self.assertEqual(event.type, outcome.status.value)
            if outcome.status is RecipientStatus.DEFERRED:
                assert outcome.next_attempt is not None
                self.assertGreater(outcome.next_attempt, now)
            else:
                self.assertIsNone(outcome.next_attempt)
        suppressed = {s.address for s in plan.effects if isinstance(s, Suppress)}
        final_failures = {o.address for o in plan.outcomes
                          if o.status in (RecipientStatus.BOUNCED, RecipientStatus.EXPIRED)}
        self.assertEqual(suppressed, final_failures if suppresses else set())
