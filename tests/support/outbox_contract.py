"""The IWebhookOutbox conformance suite: what every outbox backend does the same way.

A TestCase mixes in :class:`OutboxContractMixin` and provides ``open_outbox()``,
which returns ``(outbox, log)``: the outbox and the delivery log it writes with.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from zope.interface.verify import verifyObject

from sendarix.interfaces import IWebhookOutbox
from sendarix.model.event import Event, EventQuery
from sendarix.model.webhook import DeadBatch, WebhookBatch

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase

    _Base = TestCase
else:
    _Base = object

T0 = 1_800_000_000.0
FILL = 1.0
MAX = 100
LEASE = 60.0


def event(type: str = "delivered", ts: float = T0, queue_id: str | None = "Q1", **kw: Any) -> Event:
    """A new event of tenant ``acme``."""
    kw.setdefault("recipient", "rcpt@example.com")
    return Event.make(type, ts, queue_id=queue_id, tenant="acme", **kw)


def payload(batch: WebhookBatch) -> list[dict[str, Any]]:
    """The events of a batch's body, after checking the body's outer shape."""
    body = json.loads(batch.body)
    assert set(body) == {"type", "timestamp", "data"}, body
    assert body["type"] == "events", body
    events: list[dict[str, Any]] = body["data"]["events"]
    return events


class OutboxContractMixin(_Base):
    """What every IWebhookOutbox does."""

    outbox: Any
    log: Any

    async def open_outbox(self) -> tuple[Any, Any]:
        raise NotImplementedError

    async def setUp(self) -> None:  # type: ignore[override]
        self.outbox, self.log = await self.open_outbox()

    async def lease(
        self, node: str = "n1", now: float = T0 + FILL, **limits: int
    ) -> list[WebhookBatch]:
        wanted = limits or {"hook": 10}
        batches: list[WebhookBatch] = await self.outbox.lease_due(
            node, now, wanted, LEASE, FILL, MAX
        )
        return batches

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IWebhookOutbox, self.outbox))

    async def test_event_is_logged_and_queued(self) -> None:
        """``add`` writes the delivery-log entry too; the batch carries the event's
        public JSON and its sequence."""
        e = event()
        await self.outbox.add(e, ["hook"])
        page = await self.log.search(EventQuery(queue_id="Q1"))
        self.assertEqual([x.id for x in page.events], [e.id])
        (batch,) = await self.lease()
        self.assertEqual((batch.endpoint, batch.attempts, batch.count), ("hook", 0, 1))
        self.assertTrue(batch.id.startswith("msg_"))
        (sent,) = payload(batch)
        self.assertEqual(sent, {**e.to_json(), "sequence": 1})

    async def test_no_endpoint_only_logs(self) -> None:
        e = event()
        await self.outbox.add(e, [])
        self.assertEqual(len((await self.log.search(EventQuery())).events), 1)
        self.assertEqual(await self.lease(now=T0 + 100), [])

    async def test_batch_waits_to_fill(self) -> None:
        """A batch is formed once its first event waited the fill time, or once full."""
        await self.outbox.add(event(ts=T0), ["hook"])
        await self.outbox.add(event(ts=T0 + 0.5), ["hook"])
        self.assertEqual(await self.lease(now=T0 + 0.9), [])
        (batch,) = await self.lease(now=T0 + 1.0)
        self.assertEqual(batch.count, 2)
        self.assertEqual(len(payload(batch)), 2)

    async def test_full_batches_go_at_once(self) -> None:
        """250 events make batches of 100 and 100 at once; the last 50 wait to fill."""
        for i in range(250):
            await self.outbox.add(event(queue_id=f"Q{i}", ts=T0), ["hook"])
        batches = await self.lease(now=T0 + 0.1)
        self.assertEqual([b.count for b in batches], [100, 100])
        self.assertEqual([len(payload(b)) for b in batches], [100, 100])
        (rest,) = await self.lease(now=T0 + FILL)
        self.assertEqual(rest.count, 50)
        queue_ids = [e["queue_id"] for b in (*batches, rest) for e in payload(b)]
        self.assertEqual(queue_ids, [f"Q{i}" for i in range(250)])

    async def test_added_twice_queued_once(self) -> None:
        e = event()
        await self.outbox.add(e, ["hook"])
        await self.outbox.add(e, ["hook"])
        (batch,) = await self.lease()
        self.assertEqual(batch.count, 1)

    async def test_sequence_per_message(self) -> None:
        """Each event carries its position among its message's events; an event of no
        message carries null."""
        for type in ("accepted", "deferred", "delivered"):
            await self.outbox.add(event(type, queue_id="QA"), ["hook"])
            await self.outbox.add(event(type, queue_id="QB"), ["hook"])
        await self.outbox.add(event("rejected", queue_id=None), ["hook"])
        (batch,) = await self.lease()
        got = [(e["queue_id"], e["type"], e["sequence"]) for e in payload(batch)]
        self.assertEqual(got, [
            ("QA", "accepted", 1), ("QB", "accepted", 1),
            ("QA", "deferred", 2), ("QB", "deferred", 2),
            ("QA", "delivered", 3), ("QB", "delivered", 3),
            (None, "rejected", None),
        ])  # fmt: skip

    async def test_endpoints_are_apart(self) -> None:
        """Each endpoint has its own queue and its own limit."""
        e = event()
        await self.outbox.add(e, ["a", "b"])
        for i in range(3):
            await self.outbox.add(event(queue_id=f"B{i}"), ["b"])
        batches = await self.lease(a=1, b=1)
        self.assertEqual(sorted((b.endpoint, b.count) for b in batches), [("a", 1), ("b", 4)])
        self.assertNotEqual(batches[0].id, batches[1].id)
        self.assertEqual(await self.lease(a=0, b=5, now=T0 + 2), [])

    async def test_lease_is_exclusive_until_it_runs_out(self) -> None:
        """Another node gets nothing while the lease holds, then the same batch."""
        await self.outbox.add(event(), ["hook"])
        (first,) = await self.lease("n1", now=T0 + 1)
        self.assertEqual(await self.lease("n2", now=T0 + 2), [])
        (again,) = await self.lease("n2", now=T0 + 1 + LEASE)
        self.assertEqual((again.id, again.body, again.attempts), (first.id, first.body, 0))

    async def test_retry_keeps_id_and_body(self) -> None:
        await self.outbox.add(event(), ["hook"])
        (batch,) = await self.lease("n1", now=T0 + 1)
        self.assertFalse(await self.outbox.retry(batch.id, "other", T0 + 6, "HTTP 500"))
        self.assertTrue(await self.outbox.retry(batch.id, "n1", T0 + 6, "HTTP 500"))
        self.assertEqual(await self.lease("n1", now=T0 + 5.9), [])
        (again,) = await self.lease("n2", now=T0 + 6)
        self.assertEqual((again.id, again.body, again.created), (batch.id, batch.body, T0 + 1))
        self.assertEqual(again.attempts, 1)

    async def test_ack_forgets(self) -> None:
        await self.outbox.add(event(), ["hook"])
        (batch,) = await self.lease()
        self.assertTrue(await self.outbox.ack(batch.id))
        self.assertFalse(await self.outbox.ack(batch.id))
        self.assertEqual(await self.lease(now=T0 + 10 * LEASE), [])
        self.assertEqual(
            await self.outbox.counts("hook"), {"queued": 0, "batches": 0, "dead": 0}
        )

    async def test_dead_letter_and_replay(self) -> None:
        """A dead batch is listed with its error, is never leased, and comes back with
        the same id and body when replayed."""
        await self.outbox.add(event(), ["hook"])
        await self.outbox.add(event(queue_id="Q2"), ["other"])
        (batch,) = await self.lease(hook=1)
        self.assertFalse(await self.outbox.dead_letter(batch.id, "n2", "HTTP 500", T0 + 9))
        self.assertTrue(await self.outbox.dead_letter(batch.id, "n1", "HTTP 500", T0 + 9))
        dead = await self.outbox.list_dead(None, 10)
        self.assertEqual(dead, [DeadBatch(batch.id, "hook", T0 + 1, 1, T0 + 9, "HTTP 500", 1)])
        self.assertEqual(await self.outbox.list_dead("other", 10), [])
        self.assertEqual(await self.lease(now=T0 + 10 * LEASE, hook=1), [])
        self.assertFalse(await self.outbox.ack(batch.id))
        self.assertEqual(
            await self.outbox.counts("hook"), {"queued": 0, "batches": 0, "dead": 1}
        )
        self.assertTrue(await self.outbox.replay(batch.id, T0 + 100))
        self.assertFalse(await self.outbox.replay(batch.id, T0 + 100))
        self.assertEqual(await self.outbox.list_dead(None, 10), [])
        (again,) = await self.lease(now=T0 + 100, hook=1)
        self.assertEqual((again.id, again.body, again.attempts), (batch.id, batch.body, 0))

    async def test_purge_drops_one_endpoint(self) -> None:
        """``purge`` drops an endpoint's queued events and batches (leased, ready and
        dead) and says how many; another endpoint's stay; the log keeps the events."""
        for i in range(3):
            await self.outbox.add(event(queue_id=f"Q{i}"), ["hook", "other"])
        (leased,) = await self.lease(hook=1)
        await self.outbox.add(event(queue_id="Q9", ts=T0 + 2), ["hook"])
        await self.outbox.add(event(queue_id="Q8", ts=T0 + 2), ["hook"])
        (dead,) = await self.lease(now=T0 + 3, hook=1)
        self.assertTrue(await self.outbox.dead_letter(dead.id, "n1", "HTTP 500", T0 + 4))
        await self.outbox.add(event(queue_id="Q7", ts=T0 + 5), ["hook"])
        self.assertEqual(await self.outbox.purge("hook"),
                         {"queued": 1, "batches": 1, "dead": 1})
        self.assertEqual(await self.outbox.counts("hook"),
                         {"queued": 0, "batches": 0, "dead": 0})
        self.assertFalse(await self.outbox.ack(leased.id))
        self.assertFalse(await self.outbox.retry(leased.id, "n1", T0 + 9, "late"))
        self.assertEqual(await self.outbox.list_dead(None, 10), [])
        self.assertEqual(await self.lease(now=T0 + 10 * LEASE, hook=5), [])
        (kept,) = await self.lease(now=T0 + 10 * LEASE, other=5)
        self.assertEqual(kept.count, 3)
        self.assertEqual(len((await self.log.search(EventQuery())).events), 6)
        self.assertEqual(await self.outbox.purge("hook"),
                         {"queued": 0, "batches": 0, "dead": 0})

    async def test_disabled_endpoint(self) -> None:
        """Nothing is queued for or leased to a disabled endpoint until it is enabled."""
        await self.outbox.add(event(queue_id="Q1"), ["hook"])
        await self.outbox.disable("hook", "HTTP 410 Gone", T0)
        await self.outbox.add(event(queue_id="Q2"), ["hook"])
        self.assertEqual(await self.lease(now=T0 + 5), [])
        (off,) = await self.outbox.disabled()
        self.assertEqual((off.endpoint, off.disabled_at, off.reason), ("hook", T0, "HTTP 410 Gone"))
        self.assertTrue(await self.outbox.enable("hook"))
        self.assertFalse(await self.outbox.enable("hook"))
        self.assertEqual(await self.outbox.disabled(), [])
        (batch,) = await self.lease(now=T0 + 5)
        self.assertEqual([e["queue_id"] for e in payload(batch)], ["Q1"])

    async def test_unicode_survives(self) -> None:
        """The body is the event's JSON byte for byte, whatever it holds."""
        e = event(recipient="josé@exämple.com", tags=["ünï", 'quote"d'])
        await self.outbox.add(e, ["hook"])
        (batch,) = await self.lease()
        (sent,) = payload(batch)
        self.assertEqual(sent["recipient"], "josé@exämple.com")
        self.assertEqual(sent["tags"], ["ünï", 'quote"d'])

    async def test_reclaim_own_leases(self) -> None:
        """A restarting node takes its leases back at once; others' stay leased."""
        await self.outbox.add(event(queue_id="Q1"), ["a"])
        await self.outbox.add(event(queue_id="Q2"), ["b"])
        (mine,) = await self.lease("n1", a=1)
        (theirs,) = await self.lease("n2", b=1)
        self.assertEqual(await self.outbox.reclaim("n1"), 1)
        self.assertEqual(await self.outbox.reclaim("n1"), 0)
        (again,) = await self.lease("n3", now=T0 + 2, a=1, b=1)
        self.assertEqual(again.id, mine.id)
        self.assertFalse(await self.outbox.retry(mine.id, "n1", T0 + 9, "late"))
        self.assertTrue(await self.outbox.retry(theirs.id, "n2", T0 + 9, "HTTP 500"))

    async def test_trim_dead(self) -> None:
        """Dead batches older than the retention go; newer ones and live ones stay."""
        for i in range(3):
            await self.outbox.add(event(queue_id=f"Q{i}"), ["hook"])
        old, new, live = await self.outbox.lease_due("n1", T0 + 1, {"hook": 3}, LEASE, FILL, 1)
        await self.outbox.dead_letter(old.id, "n1", "HTTP 500", T0 + 10)
        await self.outbox.dead_letter(new.id, "n1", "HTTP 500", T0 + 20)
        self.assertEqual(await self.outbox.trim(T0 + 15), 1)
        self.assertEqual(await self.outbox.trim(T0 + 15), 0)
        self.assertEqual([d.id for d in await self.outbox.list_dead(None, 10)], [new.id])
        self.assertEqual([d.id for d in await self.outbox.list_dead("hook", 10)], [new.id])
        self.assertFalse(await self.outbox.replay(old.id, T0 + 30))
        self.assertTrue(await self.outbox.ack(live.id))
