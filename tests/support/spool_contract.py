"""The ISpool conformance suite: every spool backend must pass these tests.

A backend's test case mixes :class:`SpoolContractMixin` into
``twisted.trial.unittest.TestCase`` and implements ``make_spool``.  The tests use only
the ISpool interface and pass time explicitly (the spool API takes ``now``), so
they run unchanged against SQLite and Redis.

Behaviour pinned here beyond the interface docstrings:

- ``enqueue`` of a queue id already spooled fails with ``DuplicateQueueId``; a message
  without recipients fails with ``ValueError``; repeated recipients are stored once.
- A recipient's domain is the part after the last ``@``, lower-cased.
- ``complete`` by a node that does not hold the lease fails with ``LeaseLost``;
  outcomes for recipients that are unknown or already final are ignored.
- Attempts count DELIVERED, BOUNCED and DEFERRED outcomes (and EXPIRED with a reply).
- ``stats()`` lists only non-zero counts.
- ``stop()`` may be called twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from unittest import SkipTest

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from sendarix.ingress.queueid import QueueIdGenerator
from sendarix.interfaces import ISelectiveLease, ISpool
from sendarix.model.message import (
    Envelope,
    LeasedDelivery,
    MessageMeta,
    NewMessage,
    RecipientOutcome,
    RecipientStatus,
    Reply,
    TLSInfo,
)
from sendarix.stores import codec
from sendarix.stores.spool import DuplicateQueueId, LeaseLost

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase

    _Base = TestCase
else:
    _Base = object

T0 = 1_700_000_000.0
"""The time every test's first message is received."""

DELIVERED = RecipientStatus.DELIVERED
BOUNCED = RecipientStatus.BOUNCED
DEFERRED = RecipientStatus.DEFERRED
PENDING = RecipientStatus.PENDING
SUPPRESSED = RecipientStatus.SUPPRESSED
EXPIRED = RecipientStatus.EXPIRED

OK_250 = Reply(250, "2.0.0", "ok queued as 123")
NO_SUCH_USER = Reply(550, "5.1.1", "no such user")
TRY_LATER = Reply(451, "4.3.0", "try again later")

BIG_BODY = bytes(range(256)) * 4096
"""1 MiB holding every byte value: NULs, bare CR and LF, 8-bit bytes."""


def sample_message(
    queue_id: str,
    recipients: tuple[str, ...] = ("alice@example.com",),
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    received_at: float = T0,
) -> NewMessage:
    """A message with every envelope and metadata field filled in."""
    return NewMessage(
        queue_id=queue_id,
        envelope=Envelope(sender="app@sender.example", recipients=recipients, body="8BITMIME"),
        meta=MessageMeta(
            tenant="acme",
            received_at=received_at,
            client_ip="192.0.2.7",
            helo="app.sender.example",
            credential="ci-bot",
            listener="submission",
            tls=TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"),
            message_id="<m1@sender.example>",
            tags=("welcome", "batch-7"),
            stream="transactional",
            node="node-a",
        ),
        body=body,
    )


class SpoolContractMixin(_Base):
    """Tests every ISpool backend passes.  Implement ``make_spool``."""

    def make_spool(self) -> ISpool | Deferred[ISpool]:
        """A new, not yet started spool on this test's store.

        Every call within one test must reach the same stored data, so a second call
        stands for a second node, or for the same node after a restart.
        """
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------

    async def started(self) -> ISpool:
        """A started spool from ``make_spool``, stopped when the test ends."""
        made = self.make_spool()
        spool = (await made) if isinstance(made, Deferred) else made
        await spool.start()
        self.addCleanup(spool.stop)
        return spool

    def new_message(
        self,
        recipients: tuple[str, ...] = ("alice@example.com",),
        body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
        received_at: float = T0,
        queue_id: str | None = None,
    ) -> NewMessage:
        """A message with a fresh queue id (ids increase in creation order)."""
        if not hasattr(self, "_ids"):
            clock = Clock()
            clock.advance(T0)
            self._ids = QueueIdGenerator("contract-node", clock)
        return sample_message(queue_id or self._ids.next(), recipients, body, received_at)

    async def enqueued(self, spool: ISpool, **kwargs: Any) -> NewMessage:
        """Enqueue a new message and return it."""
        message = self.new_message(**kwargs)
        await spool.enqueue(message)
        return message

    def by_domain(self, deliveries: list[LeasedDelivery]) -> dict[str, LeasedDelivery]:
        return {d.domain: d for d in deliveries}

    def addresses(self, delivery: LeasedDelivery) -> list[str]:
        return [r.address for r in delivery.recipients]

    async def statuses(self, spool: ISpool, queue_id: str) -> dict[str, RecipientStatus]:
        stored = await spool.get(queue_id)
        assert stored is not None
        return {r.address: r.status for r in stored.recipients}

    # -- interface and storage ---------------------------------------------------------

    async def test_provides_interface(self) -> None:
        """The spool provides every ISpool method."""
        spool = await self.started()
        self.assertTrue(verifyObject(ISpool, spool))

    async def test_enqueue_then_get(self) -> None:
        """A stored message comes back with its envelope, metadata and pending recipients."""
        spool = await self.started()
        message = await self.enqueued(
            spool,
            recipients=("Alice@Example.COM", "bob@xn--bcher-kva.Example", "carol@[192.0.2.1]"),
        )
        stored = await spool.get(message.queue_id)
        assert stored is not None
        self.assertEqual(stored.queue_id, message.queue_id)
        self.assertEqual(stored.envelope, message.envelope)
        self.assertEqual(stored.meta, message.meta)
        self.assertEqual(stored.size, len(message.body))
        self.assertEqual(
            [(r.address, r.domain, r.status, r.attempts) for r in stored.recipients],
            [
                ("Alice@Example.COM", "example.com", PENDING, 0),
                ("bob@xn--bcher-kva.Example", "xn--bcher-kva.example", PENDING, 0),
                ("carol@[192.0.2.1]", "[192.0.2.1]", PENDING, 0),
            ],
        )

    async def test_body_byte_for_byte(self) -> None:
        """Bodies come back exactly: NULs, CR/LF in any mix, 8-bit bytes, 1 MiB."""
        spool = await self.started()
        small = b"Subject: \xe9t\xe9\r\n\r\n\x00bare\nlf\rcr\r\n.\r\n..\r\n\xff"
        first = await self.enqueued(spool, body=small)
        big = await self.enqueued(spool, body=BIG_BODY)
        empty = await self.enqueued(spool, body=b"")
        self.assertEqual(await spool.body(first.queue_id), small)
        self.assertEqual(await spool.body(big.queue_id), BIG_BODY)
        self.assertEqual(await spool.body(empty.queue_id), b"")
        stored = await spool.get(big.queue_id)
        assert stored is not None
        self.assertEqual(stored.size, len(BIG_BODY))

    async def test_unknown_queue_id(self) -> None:
        """An unknown queue id has no message, no body, nothing to retry or delete."""
        spool = await self.started()
        self.assertIsNone(await spool.get("0000000000UNKNOWN000"))
        self.assertIsNone(await spool.body("0000000000UNKNOWN000"))
        self.assertEqual(await spool.retry("0000000000UNKNOWN000", T0), 0)
        self.assertFalse(await spool.delete("0000000000UNKNOWN000"))

    async def test_duplicate_queue_id_refused(self) -> None:
        """A second message with a spooled queue id fails and changes nothing."""
        spool = await self.started()
        first = await self.enqueued(spool, recipients=("a@one.example",))
        impostor = self.new_message(
            recipients=("x@two.example", "y@three.example"),
            body=b"other",
            queue_id=first.queue_id,
        )
        before = await spool.stats()
        await self.assertFailure(spool.enqueue(impostor), DuplicateQueueId)
        stored = await spool.get(first.queue_id)
        assert stored is not None
        self.assertEqual(stored.envelope, first.envelope)
        self.assertEqual(await spool.body(first.queue_id), first.body)
        self.assertEqual(await spool.stats(), before)
        leased = await spool.lease_due("n1", T0, 10, 60)
        self.assertEqual([d.domain for d in leased], ["one.example"])

    async def test_no_recipients_refused(self) -> None:
        """A message without recipients is refused and not stored."""
        spool = await self.started()
        message = self.new_message(recipients=())
        await self.assertFailure(spool.enqueue(message), ValueError)
        self.assertIsNone(await spool.get(message.queue_id))

    async def test_repeated_recipient_stored_once(self) -> None:
        """A recipient named twice in the envelope gets one record and one attempt."""
        spool = await self.started()
        message = await self.enqueued(
            spool, recipients=("a@one.example", "b@one.example", "a@one.example")
        )
        stored = await spool.get(message.queue_id)
        assert stored is not None
        self.assertEqual([r.address for r in stored.recipients], ["a@one.example", "b@one.example"])
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        self.assertEqual(self.addresses(delivery), ["a@one.example", "b@one.example"])

    # -- leasing ---------------------------------------------------------------------

    async def test_lease_groups_by_domain(self) -> None:
        """A message to three domains gives three deliveries, each with its recipients."""
        spool = await self.started()
        message = await self.enqueued(
            spool,
            recipients=("a@one.example", "b@Two.Example", "c@three.example", "d@ONE.example"),
        )
        leased = await spool.lease_due("node-1", T0 + 5, 10, 300)
        self.assertEqual(len(leased), 3)
        deliveries = self.by_domain(leased)
        self.assertEqual(set(deliveries), {"one.example", "two.example", "three.example"})
        self.assertEqual(
            self.addresses(deliveries["one.example"]), ["a@one.example", "d@ONE.example"]
        )
        self.assertEqual(self.addresses(deliveries["two.example"]), ["b@Two.Example"])
        for delivery in leased:
            self.assertEqual(delivery.queue_id, message.queue_id)
            self.assertEqual(delivery.envelope, message.envelope)
            self.assertEqual(delivery.meta, message.meta)
            self.assertEqual((delivery.lease.node, delivery.lease.expires), ("node-1", T0 + 305))
            self.assertTrue(all(r.status is PENDING for r in delivery.recipients))

    async def test_scheduled_message_waits(self) -> None:
        """A message with ``not_before`` is stored at once but leased only from then on;
        its recipients show the time as their next attempt."""
        from attrs import evolve

        spool = await self.started()
        message = evolve(self.new_message(recipients=("a@one.example",)), not_before=T0 + 3600)
        await spool.enqueue(message)
        self.assertEqual(await spool.lease_due("node-1", T0 + 5, 10, 300), [])
        stored = await spool.get(message.queue_id)
        assert stored is not None
        self.assertEqual(stored.recipients[0].next_attempt, T0 + 3600)
        self.assertEqual(stored.recipients[0].status, PENDING)
        leased = await spool.lease_due("node-1", T0 + 3600, 10, 300)
        self.assertEqual([d.queue_id for d in leased], [message.queue_id])

    async def test_lease_due_except(self) -> None:
        """lease_due_except leaves deliveries to the skipped domains (any case) in the
        spool, due as before, and leases the others oldest first."""
        spool: Any = await self.started()
        if not ISelectiveLease.providedBy(spool):
            raise SkipTest("this spool cannot leave domains out of a lease")
        verifyObject(ISelectiveLease, spool)
        slow = [await self.enqueued(spool, recipients=(f"u{i}@slow.example",),
                                    received_at=T0 + i) for i in range(3)]
        other = await self.enqueued(spool, recipients=("x@other.example",), received_at=T0 + 5)
        leased = await spool.lease_due_except("n1", T0 + 10, 10, 60, ["SLOW.example"])
        self.assertEqual([d.queue_id for d in leased], [other.queue_id])
        rest = await spool.lease_due("n1", T0 + 10, 10, 60)
        self.assertEqual([d.queue_id for d in rest], [m.queue_id for m in slow])

    async def test_lease_due_except_looks_past_a_bounded_number(self) -> None:
        """One lease looks past at most ``look_past_limit(limit)`` deliveries of
        skipped domains; past that it leases the next ones whatever their domain (the
        delivery agent parks them), so a huge backlog of a full site neither makes
        every poll walk all of it nor hides the mail behind it."""
        spool: Any = await self.started()
        if not ISelectiveLease.providedBy(spool):
            raise SkipTest("this spool cannot leave domains out of a lease")
        budget = codec.look_past_limit(1)
        # Enqueued together, so that a spool that commits in groups takes them so.
        await gatherResults([
            Deferred.fromCoroutine(self.enqueued(
                spool, recipients=(f"u{i}@slow.example",), received_at=T0 + i
            ))
            for i in range(budget + 1)
        ])
        await self.enqueued(spool, recipients=("x@other.example",),
                            received_at=T0 + budget + 5)
        now = T0 + budget + 10
        (first,) = await spool.lease_due_except("n1", now, 1, 60, ["slow.example"])
        self.assertEqual(first.domain, "slow.example")
        self.assertEqual(first.recipients[0].address, f"u{budget}@slow.example")
        (second,) = await spool.lease_due_except("n1", now, 1, 60, ["slow.example"])
        self.assertEqual(second.domain, "other.example")
        # Within the budget, nothing of a skipped domain is leased.
        self.assertEqual(await spool.lease_due_except("n1", now, 1, 60, ["slow.example"]), [])
        (oldest,) = await spool.lease_due("n1", now, 1, 60)
        self.assertEqual(oldest.recipients[0].address, "u0@slow.example")

    async def test_not_due_before_received(self) -> None:
        """A delivery is due from the time its message was received, not before."""
        spool = await self.started()
        await self.enqueued(spool, received_at=T0 + 100)
        self.assertEqual(await spool.lease_due("n1", T0 + 99, 10, 60), [])
        self.assertEqual(len(await spool.lease_due("n1", T0 + 100, 10, 60)), 1)

    async def test_limit_and_order(self) -> None:
        """lease_due hands out at most ``limit`` deliveries, the longest due first."""
        spool = await self.started()
        messages = [await self.enqueued(spool, received_at=T0 + 4 - i) for i in range(5)]
        oldest_first = [m.queue_id for m in reversed(messages)]
        first = await spool.lease_due("n1", T0 + 10, 2, 60)
        second = await spool.lease_due("n1", T0 + 10, 2, 60)
        third = await spool.lease_due("n1", T0 + 10, 2, 60)
        self.assertEqual([d.queue_id for d in first + second + third], oldest_first)
        self.assertEqual(len(third), 1)
        self.assertEqual(await spool.lease_due("n1", T0 + 10, 2, 60), [])

    async def test_leased_delivery_not_leased_twice(self) -> None:
        """A leased delivery is not handed out again until its lease expires; then
        another node takes it over."""
        spool = await self.started()
        message = await self.enqueued(spool)
        (mine,) = await spool.lease_due("node-a", T0, 10, 60)
        self.assertEqual(await spool.lease_due("node-a", T0 + 1, 10, 60), [])
        self.assertEqual(await spool.lease_due("node-b", T0 + 59.9, 10, 60), [])
        (taken,) = await spool.lease_due("node-b", T0 + 60, 10, 60)
        self.assertEqual((taken.queue_id, taken.domain), (mine.queue_id, mine.domain))
        self.assertEqual(taken.queue_id, message.queue_id)
        self.assertEqual(taken.lease.node, "node-b")
        self.assertEqual(taken.lease.expires, T0 + 120)

    async def test_two_spool_objects_share_leases(self) -> None:
        """Two spool objects on one store (two nodes) see each other's messages and
        leases."""
        spool_a = await self.started()
        spool_b = await self.started()
        message = await self.enqueued(spool_a)
        (delivery,) = await spool_b.lease_due("node-b", T0, 10, 60)
        self.assertEqual(delivery.queue_id, message.queue_id)
        self.assertEqual(await spool_a.lease_due("node-a", T0 + 30, 10, 60), [])
        await self.assertFailure(
            spool_a.complete(message.queue_id, delivery.domain, "node-a", [], T0 + 31),
            LeaseLost,
        )
        await spool_b.complete(
            message.queue_id,
            delivery.domain,
            "node-b",
            [RecipientOutcome("alice@example.com", DELIVERED, OK_250)],
            T0 + 31,
        )
        self.assertIsNone(await spool_a.get(message.queue_id))

    async def test_renew_extends(self) -> None:
        """Renewing keeps a delivery ours past the first expiry; only the holder can."""
        spool = await self.started()
        await self.enqueued(spool)
        (delivery,) = await spool.lease_due("node-a", T0, 10, 60)
        self.assertTrue(await spool.renew(delivery.queue_id, delivery.domain, "node-a", T0 + 300))
        self.assertFalse(await spool.renew(delivery.queue_id, delivery.domain, "node-b", T0 + 900))
        self.assertEqual(await spool.lease_due("node-b", T0 + 100, 10, 60), [])
        self.assertEqual(await spool.lease_due("node-b", T0 + 299, 10, 60), [])
        (taken,) = await spool.lease_due("node-b", T0 + 300, 10, 60)
        self.assertEqual(taken.lease.node, "node-b")
        self.assertFalse(await spool.renew(delivery.queue_id, delivery.domain, "node-a", T0 + 999))

    async def test_release_makes_due(self) -> None:
        """A released delivery is due again at once; a stranger cannot release it."""
        spool = await self.started()
        await self.enqueued(spool)
        (delivery,) = await spool.lease_due("node-a", T0 + 10, 10, 300)
        await spool.release(delivery.queue_id, delivery.domain, "node-b")
        self.assertEqual(await spool.lease_due("node-b", T0 + 11, 10, 300), [])
        await spool.release(delivery.queue_id, delivery.domain, "node-a")
        (again,) = await spool.lease_due("node-b", T0 + 11, 10, 300)
        self.assertEqual(again.queue_id, delivery.queue_id)
        self.assertEqual(self.addresses(again), self.addresses(delivery))

    async def test_reclaim(self) -> None:
        """reclaim frees all of one node's leases and no other node's."""
        spool = await self.started()
        for _ in range(3):
            await self.enqueued(spool)
        mine = await spool.lease_due("node-a", T0, 2, 300)
        theirs = await spool.lease_due("node-b", T0, 10, 300)
        self.assertEqual((len(mine), len(theirs)), (2, 1))
        self.assertEqual(await spool.reclaim("node-a"), 2)
        self.assertEqual(await spool.reclaim("node-c"), 0)
        again = await spool.lease_due("node-a", T0 + 1, 10, 300)
        self.assertEqual(sorted(d.queue_id for d in again), sorted(d.queue_id for d in mine))

    # -- outcomes --------------------------------------------------------------------

    async def test_complete_mixed_outcomes(self) -> None:
        """Delivered, bounced and suppressed recipients are final; a deferred one is due
        again only at its next attempt; the message goes when all are final."""
        spool = await self.started()
        recipients = ("ok@d.example", "gone@d.example", "later@d.example", "quiet@d.example")
        message = await self.enqueued(spool, recipients=recipients)
        (delivery,) = await spool.lease_due("n1", T0, 10, 300)
        self.assertEqual(self.addresses(delivery), list(recipients))
        await spool.complete(
            message.queue_id,
            "d.example",
            "n1",
            [
                RecipientOutcome("ok@d.example", DELIVERED, OK_250),
                RecipientOutcome("gone@d.example", BOUNCED, NO_SUCH_USER),
                RecipientOutcome("later@d.example", DEFERRED, TRY_LATER, next_attempt=T0 + 600),
                RecipientOutcome("quiet@d.example", SUPPRESSED),
            ],
            T0 + 2,
        )
        stored = await spool.get(message.queue_id)
        assert stored is not None
        records = {r.address: r for r in stored.recipients}
        self.assertEqual(
            {a: (r.status, r.attempts, r.last_reply) for a, r in records.items()},
            {
                "ok@d.example": (DELIVERED, 1, OK_250),
                "gone@d.example": (BOUNCED, 1, NO_SUCH_USER),
                "later@d.example": (DEFERRED, 1, TRY_LATER),
                "quiet@d.example": (SUPPRESSED, 0, None),
            },
        )
        self.assertEqual(records["later@d.example"].next_attempt, T0 + 600)
        self.assertIsNone(records["ok@d.example"].next_attempt)
        self.assertEqual(records["ok@d.example"].updated_at, T0 + 2)

        # The lease is gone, but nothing is due before the deferred recipient's time.
        self.assertEqual(await spool.lease_due("n1", T0 + 599, 10, 300), [])
        (retry,) = await spool.lease_due("n2", T0 + 600, 10, 300)
        self.assertEqual(self.addresses(retry), ["later@d.example"])
        self.assertEqual(
            (retry.recipients[0].attempts, retry.recipients[0].last_reply), (1, TRY_LATER)
        )

        await spool.complete(
            message.queue_id,
            "d.example",
            "n2",
            [RecipientOutcome("later@d.example", DELIVERED, OK_250)],
            T0 + 601,
        )
        self.assertIsNone(await spool.get(message.queue_id))
        self.assertIsNone(await spool.body(message.queue_id))
        self.assertEqual((await spool.stats()).messages, 0)
        self.assertEqual(await spool.lease_due("n1", T0 + 10_000, 10, 300), [])

    async def test_attempts_accumulate(self) -> None:
        """Each deferral counts an attempt and keeps the newest reply."""
        spool = await self.started()
        message = await self.enqueued(spool)
        now = T0
        for n, reply in enumerate([TRY_LATER, Reply(421, None, "busy")], start=1):
            (delivery,) = await spool.lease_due("n1", now, 10, 60)
            now += 10
            await spool.complete(
                message.queue_id,
                delivery.domain,
                "n1",
                [RecipientOutcome("alice@example.com", DEFERRED, reply, next_attempt=now + 50)],
                now,
            )
            stored = await spool.get(message.queue_id)
            assert stored is not None
            (record,) = stored.recipients
            self.assertEqual((record.attempts, record.last_reply), (n, reply))
            now += 50

    async def test_expired_is_final(self) -> None:
        """An expired recipient is final: the message leaves the spool."""
        spool = await self.started()
        message = await self.enqueued(spool)
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        await spool.complete(
            message.queue_id,
            delivery.domain,
            "n1",
            [RecipientOutcome("alice@example.com", EXPIRED, TRY_LATER)],
            T0 + 1,
        )
        self.assertIsNone(await spool.get(message.queue_id))

    async def test_unreported_recipients_stay_due(self) -> None:
        """Recipients a completion does not mention stay pending and due at once."""
        spool = await self.started()
        message = await self.enqueued(spool, recipients=("a@d.example", "b@d.example"))
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        await spool.complete(
            message.queue_id,
            delivery.domain,
            "n1",
            [
                RecipientOutcome("a@d.example", DELIVERED, OK_250),
                RecipientOutcome("stranger@d.example", DELIVERED, OK_250),
            ],
            T0 + 1,
        )
        (again,) = await spool.lease_due("n1", T0 + 1, 10, 60)
        self.assertEqual(self.addresses(again), ["b@d.example"])
        self.assertEqual(again.recipients[0].status, PENDING)
        self.assertEqual(
            await self.statuses(spool, message.queue_id),
            {"a@d.example": DELIVERED, "b@d.example": PENDING},
        )

    async def test_final_state_not_overwritten(self) -> None:
        """A later outcome for a recipient already final is ignored."""
        spool = await self.started()
        message = await self.enqueued(spool, recipients=("a@d.example", "b@d.example"))
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        await spool.complete(
            message.queue_id,
            delivery.domain,
            "n1",
            [
                RecipientOutcome("a@d.example", BOUNCED, NO_SUCH_USER),
                RecipientOutcome("b@d.example", DEFERRED, TRY_LATER, next_attempt=T0 + 100),
            ],
            T0 + 1,
        )
        (again,) = await spool.lease_due("n1", T0 + 100, 10, 60)
        await spool.complete(
            message.queue_id,
            delivery.domain,
            "n1",
            [
                RecipientOutcome("a@d.example", DELIVERED, OK_250),
                RecipientOutcome("b@d.example", DEFERRED, TRY_LATER, next_attempt=T0 + 500),
            ],
            T0 + 101,
        )
        self.assertEqual(
            await self.statuses(spool, message.queue_id),
            {"a@d.example": BOUNCED, "b@d.example": DEFERRED},
        )

    async def test_message_removed_when_every_domain_final(self) -> None:
        """A message stays while any domain has work left, and goes with the last one."""
        spool = await self.started()
        message = await self.enqueued(spool, recipients=("a@one.example", "b@two.example"))
        deliveries = self.by_domain(await spool.lease_due("n1", T0, 10, 60))
        await spool.complete(
            message.queue_id,
            "one.example",
            "n1",
            [RecipientOutcome("a@one.example", DELIVERED, OK_250)],
            T0 + 1,
        )
        self.assertEqual(
            await self.statuses(spool, message.queue_id),
            {"a@one.example": DELIVERED, "b@two.example": PENDING},
        )
        await spool.complete(
            message.queue_id,
            deliveries["two.example"].domain,
            "n1",
            [RecipientOutcome("b@two.example", BOUNCED, NO_SUCH_USER)],
            T0 + 2,
        )
        self.assertIsNone(await spool.get(message.queue_id))
        self.assertIsNone(await spool.body(message.queue_id))

    async def test_repeated_outcome_for_one_recipient(self) -> None:
        """Two outcomes for one recipient in one completion apply in order (the first
        final one stays), and do not stand for another recipient: the message stays
        while that one is left."""
        spool = await self.started()
        message = await self.enqueued(spool, recipients=("a@d.example", "b@d.example"))
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        await spool.complete(
            message.queue_id,
            delivery.domain,
            "n1",
            [
                RecipientOutcome("a@d.example", BOUNCED, NO_SUCH_USER),
                RecipientOutcome("a@d.example", DELIVERED, OK_250),
            ],
            T0 + 1,
        )
        self.assertEqual(
            await self.statuses(spool, message.queue_id),
            {"a@d.example": BOUNCED, "b@d.example": PENDING},
        )
        (again,) = await spool.lease_due("n1", T0 + 1, 10, 60)
        await spool.complete(
            message.queue_id, again.domain, "n1",
            [
                RecipientOutcome("b@d.example", DEFERRED, TRY_LATER, next_attempt=T0 + 100),
                RecipientOutcome("b@d.example", DELIVERED, OK_250),
            ],
            T0 + 2,
        )
        self.assertIsNone(await spool.get(message.queue_id))

    async def test_complete_after_lease_lost_fails(self) -> None:
        """A node whose lease expired and was taken over cannot record outcomes."""
        spool = await self.started()
        message = await self.enqueued(spool)
        (first,) = await spool.lease_due("node-a", T0, 10, 60)
        (second,) = await spool.lease_due("node-b", T0 + 61, 10, 60)
        await self.assertFailure(
            spool.complete(
                message.queue_id,
                first.domain,
                "node-a",
                [RecipientOutcome("alice@example.com", BOUNCED, NO_SUCH_USER)],
                T0 + 62,
            ),
            LeaseLost,
        )
        self.assertEqual(
            await self.statuses(spool, message.queue_id), {"alice@example.com": PENDING}
        )
        await spool.complete(
            message.queue_id,
            second.domain,
            "node-b",
            [RecipientOutcome("alice@example.com", DELIVERED, OK_250)],
            T0 + 63,
        )
        self.assertIsNone(await spool.get(message.queue_id))

    async def test_complete_without_lease_fails(self) -> None:
        """Completing a delivery never leased, released, or deleted fails."""
        spool = await self.started()
        message = await self.enqueued(spool)
        outcome = [RecipientOutcome("alice@example.com", DELIVERED, OK_250)]
        await self.assertFailure(
            spool.complete(message.queue_id, "example.com", "n1", outcome, T0), LeaseLost
        )
        await spool.lease_due("n1", T0, 10, 60)
        await spool.release(message.queue_id, "example.com", "n1")
        await self.assertFailure(
            spool.complete(message.queue_id, "example.com", "n1", outcome, T0), LeaseLost
        )
        await spool.lease_due("n1", T0, 10, 60)
        self.assertTrue(await spool.delete(message.queue_id))
        await self.assertFailure(
            spool.complete(message.queue_id, "example.com", "n1", outcome, T0), LeaseLost
        )

    async def test_deferred_needs_next_attempt(self) -> None:
        """A deferral without a next attempt is refused and changes nothing."""
        spool = await self.started()
        message = await self.enqueued(spool)
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        await self.assertFailure(
            spool.complete(
                message.queue_id,
                delivery.domain,
                "n1",
                [RecipientOutcome("alice@example.com", DEFERRED, TRY_LATER)],
                T0 + 1,
            ),
            ValueError,
        )
        self.assertTrue(await spool.renew(message.queue_id, delivery.domain, "n1", T0 + 60))

    # -- inspection and operator actions -------------------------------------------------

    async def test_stats(self) -> None:
        """stats counts messages and recipients by status and by domain."""
        spool = await self.started()
        self.assertEqual(
            (await spool.stats()).to_dict(), {"messages": 0, "by_status": {}, "by_domain": {}}
        )
        first = await self.enqueued(spool, recipients=("a@x.example", "b@y.example"))
        await self.enqueued(spool, recipients=("c@x.example",))
        leased = await spool.lease_due("n1", T0, 1, 60)
        self.assertEqual([(d.queue_id, d.domain) for d in leased], [(first.queue_id, "x.example")])
        await spool.complete(
            first.queue_id,
            "x.example",
            "n1",
            [RecipientOutcome("a@x.example", DEFERRED, TRY_LATER, next_attempt=T0 + 60)],
            T0 + 1,
        )
        stats = await spool.stats()
        self.assertEqual(stats.messages, 2)
        self.assertEqual(stats.by_status, {"pending": 2, "deferred": 1})
        self.assertEqual(
            stats.by_domain,
            {"x.example": {"pending": 1, "deferred": 1}, "y.example": {"pending": 1}},
        )

    async def test_list_messages_filters_and_pages(self) -> None:
        """list_messages filters by status and domain and pages in queue-id order."""
        spool = await self.started()
        m1 = await self.enqueued(spool, recipients=("a@x.example", "b@y.example"))
        m2 = await self.enqueued(spool, recipients=("c@y.example",))
        m3 = await self.enqueued(spool, recipients=("d@z.example",))
        deliveries = await spool.lease_due("n1", T0, 10, 60)
        z = next(d for d in deliveries if d.queue_id == m3.queue_id)
        await spool.complete(
            m3.queue_id,
            z.domain,
            "n1",
            [RecipientOutcome("d@z.example", DEFERRED, TRY_LATER, next_attempt=T0 + 60)],
            T0 + 1,
        )

        async def ids(**kwargs: Any) -> list[str]:
            return [m.queue_id for m in await spool.list_messages(**kwargs)]

        self.assertEqual(await ids(), [m1.queue_id, m2.queue_id, m3.queue_id])
        self.assertEqual(await ids(domain="y.example"), [m1.queue_id, m2.queue_id])
        self.assertEqual(await ids(domain="Y.EXAMPLE"), [m1.queue_id, m2.queue_id])
        self.assertEqual(await ids(status="deferred"), [m3.queue_id])
        self.assertEqual(await ids(status=DEFERRED), [m3.queue_id])
        self.assertEqual(await ids(status="pending", domain="z.example"), [])
        self.assertEqual(await ids(status="pending", domain="x.example"), [m1.queue_id])
        self.assertEqual(await ids(limit=2), [m1.queue_id, m2.queue_id])
        self.assertEqual(await ids(limit=2, after=m2.queue_id), [m3.queue_id])
        self.assertEqual(await ids(after=m3.queue_id), [])
        (listed,) = await spool.list_messages(status="deferred")
        stored = await spool.get(m3.queue_id)
        self.assertEqual(listed, stored)

    async def test_retry_makes_due_now(self) -> None:
        """retry makes deferred recipients due at once and counts them."""
        spool = await self.started()
        message = await self.enqueued(spool, recipients=("a@x.example", "b@x.example"))
        (delivery,) = await spool.lease_due("n1", T0, 10, 60)
        await spool.complete(
            message.queue_id,
            delivery.domain,
            "n1",
            [
                RecipientOutcome("a@x.example", DELIVERED, OK_250),
                RecipientOutcome("b@x.example", DEFERRED, TRY_LATER, next_attempt=T0 + 3600),
            ],
            T0 + 1,
        )
        self.assertEqual(await spool.lease_due("n1", T0 + 10, 10, 60), [])
        self.assertEqual(await spool.retry(message.queue_id, T0 + 10), 1)
        (again,) = await spool.lease_due("n1", T0 + 10, 10, 60)
        self.assertEqual(self.addresses(again), ["b@x.example"])

    async def test_retry_keeps_lease(self) -> None:
        """retry on a delivery in flight does not hand it to a second node."""
        spool = await self.started()
        message = await self.enqueued(spool)
        await spool.lease_due("n1", T0, 10, 60)
        self.assertEqual(await spool.retry(message.queue_id, T0 + 5), 1)
        self.assertEqual(await spool.lease_due("n2", T0 + 5, 10, 60), [])

    async def test_delete(self) -> None:
        """delete removes the message, its body and its deliveries."""
        spool = await self.started()
        message = await self.enqueued(spool, recipients=("a@x.example", "b@y.example"))
        keep = await self.enqueued(spool)
        self.assertTrue(await spool.delete(message.queue_id))
        self.assertIsNone(await spool.get(message.queue_id))
        self.assertIsNone(await spool.body(message.queue_id))
        self.assertFalse(await spool.delete(message.queue_id))
        leased = await spool.lease_due("n1", T0, 10, 60)
        self.assertEqual([d.queue_id for d in leased], [keep.queue_id])
        stats = await spool.stats()
        self.assertEqual((stats.messages, stats.by_status), (1, {"pending": 1}))

    # -- durability and concurrency -----------------------------------------------------

    async def test_many_concurrent_enqueues(self) -> None:
        """200 enqueues started at once all succeed and all read back."""
        spool = await self.started()
        messages = [
            self.new_message(recipients=(f"user{i}@d{i % 7}.example",), body=b"body %d\r\n" % i)
            for i in range(200)
        ]
        await gatherResults([spool.enqueue(m) for m in messages], consumeErrors=True)
        bodies = await gatherResults([spool.body(m.queue_id) for m in messages])
        self.assertEqual(bodies, [m.body for m in messages])
        listed = await spool.list_messages(limit=1000)
        self.assertEqual([m.queue_id for m in listed], [m.queue_id for m in messages])
        self.assertEqual((await spool.stats()).by_status, {"pending": 200})

    async def test_survives_restart(self) -> None:
        """A fresh spool object on the same store finds messages, bodies and leases."""
        spool = await self.started()
        message = await self.enqueued(
            spool, recipients=("a@x.example", "b@y.example"), body=BIG_BODY
        )
        (delivery,) = await spool.lease_due("node-a", T0, 1, 300)
        await spool.stop()
        await spool.stop()  # a second stop is harmless

        reopened = await self.started()
        stored = await reopened.get(message.queue_id)
        assert stored is not None
        self.assertEqual((stored.envelope, stored.meta), (message.envelope, message.meta))
        self.assertEqual(await reopened.body(message.queue_id), BIG_BODY)
        # The lease outlived the restart: only the other domain is due.
        others = await reopened.lease_due("node-b", T0 + 1, 10, 300)
        self.assertEqual(
            [d.domain for d in others],
            [d for d in ("x.example", "y.example") if d != delivery.domain],
        )
        self.assertEqual(await reopened.reclaim("node-a"), 1)
        (back,) = await reopened.lease_due("node-a", T0 + 2, 10, 300)
        self.assertEqual(back.domain, delivery.domain)
