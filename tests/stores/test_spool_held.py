"""Held messages in the SQLite spool: fresh mail leased at its commit whose recipient
and delivery rows are written only when something needs them.

Every scenario runs on two spools side by side: one that holds fresh mail (the
default) and one that writes every row at once (``hold_fresh=False``, the earlier
layout's behaviour).  Each step must answer the same on both, and so must the spool
afterwards, read through the whole ISpool interface.  Real database files; nothing
is mocked.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from attrs import evolve
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from sendarix.model.message import (
    LeasedDelivery,
    NewMessage,
    RecipientOutcome,
    RecipientStatus,
)
from sendarix.stores import codec
from sendarix.stores.errors import DuplicateQueueId, LeaseLost, SpoolError
from sendarix.stores.sqlite.spool import LAYOUT, SQLiteSpool
from tests.stores.test_spool_sqlite import LAYOUT_1_SCHEMA
from tests.support.spool_contract import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    NO_SUCH_USER,
    OK_250,
    T0,
    TRY_LATER,
    sample_message,
)

reactor: Any = _reactor

LEASE_END = T0 + 300



def delivered(*addresses: str) -> list[RecipientOutcome]:
    return [RecipientOutcome(a, DELIVERED, OK_250) for a in addresses]


def rows(path: str, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        count: int = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return count
    finally:
        conn.close()


class HeldAgainstWrittenTests(TestCase):
    """Each scenario: the same steps on a holding spool and on a writing one."""

    async def spools(self) -> tuple[SQLiteSpool, SQLiteSpool]:
        self.held_path = os.path.abspath(self.mktemp()) + ".db"
        written_path = os.path.abspath(self.mktemp()) + ".db"
        held = SQLiteSpool.at_path(self.held_path, reactor)
        written = SQLiteSpool.at_path(written_path, reactor, hold_fresh=False)
        for spool in (held, written):
            await spool.start()
            self.addCleanup(spool.stop)
        self.pair = (held, written)
        self.qids: list[str] = []
        return held, written

    async def same(self, step: Callable[[SQLiteSpool], Awaitable[Any]]) -> Any:
        """Run ``step`` on both spools; it must give the same result (or the same
        exception type); the result."""
        results: list[tuple[str, Any]] = []
        for spool in self.pair:
            try:
                results.append(("ok", await step(spool)))
            except Exception as e:  # noqa: BLE001 - compared between the two
                results.append(("raised", type(e)))
        self.assertEqual(results[0], results[1])
        return results[0][1]

    async def same_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`same` for one method of the spools."""
        return await self.same(lambda s: getattr(s, method)(*args, **kwargs))

    async def complete(
        self, outcomes: list[RecipientOutcome], now: float, *, qid: str = "Q1",
        domain: str = "one.test", node: str = "node-a",
    ) -> Any:
        """:meth:`same` for ``complete`` (by default of Q1 at one.test by node-a)."""
        return await self.same_call("complete", qid, domain, node, outcomes, now)

    async def same_view(self) -> None:
        """What the interface shows without writing anything: the queue's figures,
        the plain listing, each message and its body."""
        await self.same_call("stats")
        await self.same_call("list_messages")
        for qid in self.qids:
            await self.same_call("get", qid)
            await self.same_call("body", qid)

    async def same_state(self, *, now: float, filtered: bool = True) -> None:
        """Everything the interface shows, on both spools: the view, another node's
        poll at ``now`` (which writes the rows of held messages whose lease has
        ended), then, with ``filtered``, the filtered listings (which write the rows
        of every held message, so they come last) and the view again."""
        await self.same_view()
        # Leases compared without their node, which is the poller's.
        await self.same(lambda s: _unleased(s.lease_due("node-z", now, 100, 60)))
        if not filtered:
            return
        for status in (RecipientStatus.PENDING, DEFERRED):
            await self.same_call("list_messages", status=status)
        await self.same_call("list_messages", domain="one.test")
        await self.same_view()

    async def fresh(self, *recipients: str, qid: str = "Q1") -> NewMessage:
        message = sample_message(qid, recipients or ("a@one.test",))
        self.qids.append(qid)
        handed = await self.same_call("enqueue_leased", message, "node-a", LEASE_END)
        self.assertTrue(handed)
        return message

    async def test_delivered_at_once(self) -> None:
        """The usual end: the message is gone, with its body, and held rows were
        never written."""
        held, _ = await self.spools()
        await self.fresh("a@one.test", "b@one.test")
        self.assertEqual(rows(self.held_path, "spool_recipient"), 0)
        self.assertEqual(rows(self.held_path, "spool_delivery"), 0)
        await self.same_state(now=T0 + 1, filtered=False)
        self.assertEqual(rows(self.held_path, "spool_recipient"), 0)
        await self.complete([RecipientOutcome("a@one.test", DELIVERED, OK_250),
                             RecipientOutcome("b@one.test", BOUNCED, NO_SUCH_USER)], T0 + 1)
        await self.same_state(now=T0 + 1000)
        for table in ("spool_message", "spool_body", "spool_recipient", "spool_delivery"):
            self.assertEqual(rows(self.held_path, table), 0, table)

    async def test_deferred_recipient(self) -> None:
        """One recipient deferred: the rows are written with the outcomes applied,
        and the deferred one is due at its next attempt."""
        await self.spools()
        await self.fresh("a@one.test", "b@one.test")
        await self.complete(
            [RecipientOutcome("a@one.test", DELIVERED, OK_250),
             RecipientOutcome("b@one.test", DEFERRED, TRY_LATER, next_attempt=T0 + 600)],
            T0 + 1)
        await self.same_state(now=T0 + 10)
        await self.same_state(now=T0 + 601)

    async def test_all_deferred_then_delivered(self) -> None:
        await self.spools()
        await self.fresh("a@one.test")
        await self.complete(
            [RecipientOutcome("a@one.test", DEFERRED, TRY_LATER, next_attempt=T0 + 60)], T0 + 1)
        await self.same_state(now=T0 + 30)
        leased = await self.same(lambda s: _unleased(s.lease_due("node-a", T0 + 61, 10, 60)))
        self.assertEqual(len(leased), 1)
        await self.complete(delivered("a@one.test"), T0 + 62)
        await self.same_state(now=T0 + 1000)

    async def test_two_domains(self) -> None:
        """Delivered at one domain: the other stays leased to the node until it
        completes there too."""
        await self.spools()
        await self.fresh("a@one.test", "b@two.test", "c@one.test")
        await self.complete(delivered("a@one.test", "c@one.test"), T0 + 1)
        await self.same_state(now=T0 + 10)
        await self.complete(delivered("b@two.test"), T0 + 2, domain="two.test")
        await self.same_state(now=LEASE_END + 1)

    async def test_other_node_and_unknown_domain(self) -> None:
        """A node that does not hold the lease, or a domain the message does not go
        to, gets LeaseLost; the message is untouched."""
        await self.spools()
        await self.fresh("a@one.test")
        lost = await self.complete(delivered("a@one.test"), T0 + 1, node="node-b")
        self.assertIs(lost, LeaseLost)
        lost = await self.complete(delivered("a@one.test"), T0 + 1, domain="two.test")
        self.assertIs(lost, LeaseLost)
        await self.same_call("renew", "Q1", "one.test", "node-b", T0 + 900)
        await self.same_call("renew", "Q1", "two.test", "node-a", T0 + 900)
        await self.same_call("release", "Q1", "one.test", "node-b")
        await self.same_state(now=T0 + 10)

    async def test_unknown_and_repeated_outcomes(self) -> None:
        """Outcomes for addresses the message lacks are ignored; a final outcome is
        not overwritten by a later one in the same call."""
        await self.spools()
        await self.fresh("a@one.test", "b@one.test")
        await self.complete(
            [RecipientOutcome("x@one.test", DELIVERED, OK_250),
             RecipientOutcome("a@one.test", DELIVERED, OK_250),
             RecipientOutcome("a@one.test", DEFERRED, TRY_LATER, next_attempt=T0 + 5)],
            T0 + 1)
        await self.same_state(now=T0 + 10)

    async def test_node_died(self) -> None:
        """Nobody else takes the message while its lease lasts; once it has run out,
        another node's poll does, and the first node's late outcome is refused."""
        await self.spools()
        await self.fresh("a@one.test", "b@two.test")
        await self.same_state(now=LEASE_END - 1, filtered=False)
        taken = await self.same(
            lambda s: _unleased(s.lease_due("node-b", LEASE_END + 1, 10, 60)))
        self.assertEqual(len(taken), 2)
        late = await self.complete(delivered("a@one.test"), LEASE_END + 2)
        self.assertIs(late, LeaseLost)
        await self.complete(delivered("a@one.test"), LEASE_END + 2, node="node-b")
        await self.same_state(now=LEASE_END + 100)

    async def test_renew(self) -> None:
        await self.spools()
        await self.fresh("a@one.test")
        self.assertTrue(await self.same_call("renew", "Q1", "one.test", "node-a", T0 + 900))
        await self.same_state(now=LEASE_END + 1, filtered=False)
        await self.same_state(now=T0 + 901)

    async def test_release_and_reclaim(self) -> None:
        await self.spools()
        await self.fresh("a@one.test", qid="Q1")
        await self.fresh("b@one.test", "c@two.test", qid="Q2")
        self.assertTrue(await self.same_call("release", "Q1", "one.test", "node-a"))
        await self.same_state(now=T0 + 1, filtered=False)
        self.assertEqual(await self.same_call("reclaim", "node-a"), 2)
        await self.same_state(now=T0 + 1)

    async def test_operator_actions(self) -> None:
        """Retry and delete act on a held message as on a written one."""
        await self.spools()
        await self.fresh("a@one.test", qid="Q1")
        await self.fresh("b@one.test", qid="Q2")
        self.assertEqual(await self.same_call("retry", "Q1", T0 + 5), 1)
        self.assertTrue(await self.same_call("delete", "Q2"))
        await self.complete(delivered("b@one.test"), T0 + 6, qid="Q2")
        await self.same_state(now=T0 + 10)
        await self.complete(delivered("a@one.test"), T0 + 6)
        await self.same_state(now=LEASE_END + 1)

    async def test_duplicate_queue_id(self) -> None:
        await self.spools()
        message = await self.fresh("a@one.test")
        again = await self.same_call("enqueue_leased", message, "node-a", LEASE_END)
        self.assertIs(again, DuplicateQueueId)
        self.assertIs(await self.same_call("enqueue", message), DuplicateQueueId)
        await self.same_state(now=T0 + 1)

    async def test_start_time_is_written(self) -> None:
        """Mail with a start time of its own (already reached) is not held: its
        recipients' rows carry that time."""
        held, _ = await self.spools()
        message = evolve(sample_message("Q1", ("a@one.test",)), not_before=T0 - 5)
        self.qids.append("Q1")
        await self.same_call("enqueue_leased", message, "node-a", LEASE_END)
        self.assertEqual(rows(self.held_path, "spool_recipient"), 1)
        await self.same_state(now=LEASE_END + 1)


async def _unleased(d: Awaitable[list[LeasedDelivery]]) -> list[tuple[Any, ...]]:
    """Leased deliveries without their lease."""
    return [_view(x) for x in await d]


def _view(d: LeasedDelivery) -> tuple[Any, ...]:
    return (d.queue_id, d.domain, d.envelope, d.meta, d.recipients)


class HeldLayoutTests(TestCase):
    """What holding changes in the file, and a spool of the earlier layout."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".db"

    async def test_fewer_pages_per_message(self) -> None:
        """A held message's commit writes fewer pages to the log than the same
        message with its rows."""

        async def pages(path: str, hold: bool) -> list[int]:
            spool = SQLiteSpool.at_path(path, reactor, hold_fresh=hold)
            await spool.start()
            self.addCleanup(spool.stop)
            counts = []
            for i in range(5):
                before = os.path.getsize(path + "-wal")
                await spool.enqueue_leased(
                    sample_message(f"Q{i}", ("a@one.test", "b@one.test")), "node", LEASE_END)
                counts.append((os.path.getsize(path + "-wal") - before) // 4096)
            return counts

        held = await pages(self.path, True)
        written = await pages(os.path.abspath(self.mktemp()) + ".db", False)
        # At least the recipient and delivery tables' pages and their indexes'.
        self.assertLessEqual(max(held) + 4, min(written), (held, written))

    async def test_crash_before_the_outcome(self) -> None:
        """A held message whose node stopped without an outcome is delivered by the
        next poll after its lease: the message row alone brings it back."""
        spool = SQLiteSpool.at_path(self.path, reactor)
        await spool.start()
        handed = await spool.enqueue_leased(
            sample_message("Q1", ("a@one.test", "b@two.test")), "node-a", LEASE_END)
        await spool.stop()
        again = SQLiteSpool.at_path(self.path, reactor)
        await again.start()
        self.addCleanup(again.stop)
        self.assertEqual(await again.lease_due("node-a", LEASE_END - 1, 10, 60), [])
        polled = await again.lease_due("node-a", LEASE_END, 10, 60)
        self.assertEqual([_view(d) for d in polled], [_view(d) for d in handed])

    async def test_layout_1_file(self) -> None:
        """A spool of layout 1, with mail in it, gets the held columns and index and
        is marked layout 2; its mail is delivered as before, and new mail is held."""
        old = sample_message("Q0", ("z@one.test",))
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode = WAL")
        for sql in LAYOUT_1_SCHEMA:
            conn.execute(sql)
        conn.execute("INSERT INTO spool_info (key, value) VALUES ('format', '1')")
        conn.execute(
            "INSERT INTO spool_message (queue_id, envelope, meta, size, created)"
            " VALUES ('Q0', ?, ?, ?, ?)",
            (codec.encode_envelope(old.envelope), codec.encode_meta(old.meta),
             len(old.body), T0))
        conn.execute("INSERT INTO spool_body (queue_id, body) VALUES ('Q0', ?)", (old.body,))
        conn.execute(
            "INSERT INTO spool_recipient (queue_id, address, domain, status, updated_at)"
            " VALUES ('Q0', 'z@one.test', 'one.test', 'pending', ?)", (T0,))
        conn.execute(
            "INSERT INTO spool_delivery (queue_id, domain, due) VALUES ('Q0', 'one.test', ?)",
            (T0,))
        conn.commit()
        conn.close()
        spool = SQLiteSpool.at_path(self.path, reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        await spool.enqueue(sample_message("Q1", ("a@one.test",)))
        await spool.enqueue_leased(sample_message("Q2", ("b@one.test",)), "node-a", LEASE_END)
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(
            conn.execute("SELECT value FROM spool_info WHERE key = 'format'").fetchone(),
            (str(LAYOUT),))
        self.assertEqual(
            conn.execute("SELECT queue_id, held_node FROM spool_message ORDER BY queue_id")
            .fetchall(), [("Q0", None), ("Q1", None), ("Q2", "node-a")])
        self.assertEqual(
            conn.execute("SELECT name FROM sqlite_schema WHERE name = 'spool_message_held'")
            .fetchall(), [("spool_message_held",)])
        polled = await spool.lease_due("node-a", T0 + 1, 10, 60)
        self.assertEqual([(d.queue_id, [r.address for r in d.recipients]) for d in polled],
                         [("Q0", ["z@one.test"]), ("Q1", ["a@one.test"])])

    async def test_newer_layout_refused(self) -> None:
        spool = SQLiteSpool.at_path(self.path, reactor)
        await spool.start()
        await spool.stop()
        conn = sqlite3.connect(self.path)
        conn.execute("UPDATE spool_info SET value = ? WHERE key = 'format'", (str(LAYOUT + 1),))
        conn.commit()
        conn.close()
        again = SQLiteSpool.at_path(self.path, reactor)
        try:
            await again.start()
        except SpoolError as e:
            self.assertIn(f"spool format {LAYOUT + 1} is newer", str(e))
        else:
            self.fail("a spool of a newer layout was opened")
        finally:
            await again.stop()

