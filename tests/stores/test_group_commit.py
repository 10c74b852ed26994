"""Group commit on the SQLite database thread: a failing job in a batch undoes its own
writes and nothing else, whether it failed before or after changing rows.

Each test holds the database thread inside a first job while the next jobs are
queued, so that those are taken as one batch; every job counts its calls, which
shows whether the batch was started over.  Real database files, nothing mocked.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from sendarix.model.event import Event
from sendarix.stores.errors import StoreUnavailable
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.eventlog import SQLiteEventLog

reactor: Any = _reactor

Job = Callable[[sqlite3.Connection], Any]
T = TypeVar("T")


class GroupCommitTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        path = os.path.abspath(self.mktemp()) + ".db"
        self.db = SQLiteDatabase(path, reactor, schema="CREATE TABLE t (n INTEGER UNIQUE);")
        await self.db.open()
        self.addCleanup(self.db.close)
        self.calls: dict[str, int] = {}

    def counted(self, name: str, job: Job) -> Job:
        def run(conn: sqlite3.Connection) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return job(conn)

        return run

    def insert(self, name: str, *values: int, then: BaseException | None = None) -> Job:
        def job(conn: sqlite3.Connection) -> int:
            for n in values:
                conn.execute("INSERT INTO t (n) VALUES (?)", (n,))
            if then is not None:
                raise then
            return len(values)

        return self.counted(name, job)

    async def as_one_batch(self, queue: Callable[[], T]) -> T:
        """``queue()``'s result; what it queues on the database runs as one batch."""
        started, gate = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> bool:
            started.set()
            return gate.wait(10)

        held = self.db.run(hold)
        # Queued once the thread is inside ``hold``'s batch, so they make the next.
        self.assertTrue(started.wait(10))
        queued = queue()
        gate.set()
        self.assertTrue(await held)
        return queued

    async def batch(self, *jobs: tuple[Job, dict[str, bool]]) -> list[Deferred[Any]]:
        """Queue ``jobs`` (each with its ``run`` options) to run as one batch."""
        return await self.as_one_batch(
            lambda: [self.db.run(job, **options) for job, options in jobs]
        )

    async def rows(self) -> list[int]:
        found = await self.db.run(lambda c: c.execute("SELECT n FROM t ORDER BY n").fetchall())
        return [n for (n,) in found]

    async def test_failure_before_any_write_keeps_the_batch_as_it_ran(self) -> None:
        """A job whose only statement fails (a duplicate) leaves nothing behind, as
        SQLite undoes the failed statement itself: the batch is not started over,
        and the jobs on either side commit."""
        await self.db.run(lambda c: c.execute("INSERT INTO t (n) VALUES (7)"))
        first, duplicate, third = await self.batch(
            (self.insert("first", 1), {}),
            (self.insert("duplicate", 7), {}),
            (self.insert("third", 3), {}),
        )
        self.assertEqual(await first, 1)
        await self.assertFailure(duplicate, sqlite3.IntegrityError)
        self.assertEqual(await third, 1)
        self.assertEqual(await self.rows(), [1, 3, 7])
        self.assertEqual(self.calls, {"first": 1, "duplicate": 1, "third": 1})

    async def test_a_statement_that_fails_halfway_is_undone_whole(self) -> None:
        """One statement that inserts two rows and fails on the second (a
        duplicate) leaves neither row, and is not counted as a change."""

        def two_rows(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (n) VALUES (4), (7)")

        await self.db.run(lambda c: c.execute("INSERT INTO t (n) VALUES (7)"))
        first, broken = await self.batch(
            (self.insert("first", 1), {}), (self.counted("broken", two_rows), {})
        )
        self.assertEqual(await first, 1)
        await self.assertFailure(broken, sqlite3.IntegrityError)
        self.assertEqual(await self.rows(), [1, 7])
        self.assertEqual(self.calls, {"first": 1, "broken": 1})

    async def test_failure_after_a_write_starts_the_batch_over(self) -> None:
        """A job that fails after changing rows: the batch is rolled back and run
        again with a savepoint around each job, so the jobs before it run twice and
        commit once, the failed job's rows are gone, and the jobs after it run once."""
        first, broken, third = await self.batch(
            (self.insert("first", 1), {}),
            (self.insert("broken", 2, then=RuntimeError("failed after writing")), {}),
            (self.insert("third", 3), {}),
        )
        self.assertEqual(await first, 1)
        await self.assertFailure(broken, RuntimeError)
        self.assertEqual(await third, 1)
        self.assertEqual(await self.rows(), [1, 3])
        self.assertEqual(self.calls, {"first": 2, "broken": 2, "third": 1})

    async def test_schema_job_runs_in_a_savepoint(self) -> None:
        """A job that changes the schema (which SQLite does not count as changed
        rows) passes ``savepoint``: when it fails, its table is not left behind,
        and the other jobs commit without the batch being started over."""

        def create_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("CREATE TABLE half (x INTEGER)")
            raise RuntimeError("failed after creating a table")

        first, schema, third = await self.batch(
            (self.insert("first", 1), {}),
            (self.counted("schema", create_then_fail), {"savepoint": True}),
            (self.insert("third", 3), {}),
        )
        self.assertEqual(await first, 1)
        await self.assertFailure(schema, RuntimeError)
        self.assertEqual(await third, 1)
        tables = await self.db.run(lambda c: c.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall())
        self.assertEqual(tables, [("t",)])
        self.assertEqual(await self.rows(), [1, 3])
        self.assertEqual(self.calls, {"first": 1, "schema": 1, "third": 1})

    async def test_transaction_ended_by_sqlite_fails_every_job(self) -> None:
        """When the transaction ends under a job (as SQLite ends it on a full disk
        or an I/O error), the earlier jobs' writes are gone with it: no job of the
        batch is reported done, and nothing of it is committed."""

        def ends_the_transaction(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (n) VALUES (2)")
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")

        first, broken, third = await self.batch(
            (self.insert("first", 1), {}),
            (self.counted("broken", ends_the_transaction), {}),
            (self.insert("third", 3), {}),
        )
        for d in (first, broken, third):
            await self.assertFailure(d, StoreUnavailable)
        self.assertEqual(await self.rows(), [])
        # The next batch has the database as before.
        self.assertEqual(await self.db.run(self.insert("after", 5)), 1)
        self.assertEqual(await self.rows(), [5])

    async def test_delivery_log_events_written_once_when_their_batch_starts_over(
        self,
    ) -> None:
        """The delivery log's job, in a batch that starts over, writes the same
        events again after the rollback: each is stored once and reported once."""
        events = SQLiteEventLog(self.db)  # its tables are made at once (the file is open)
        # The log's job joins the next batch at once instead of waiting for a pause.
        self.db.background_delay = 0.0

        def queue() -> tuple[list[Deferred[None]], Deferred[int]]:
            stored = [events.emit(Event(id=f"ev{n}", type="accepted", timestamp=1.0 + n))
                      for n in range(3)]
            return stored, self.db.run(self.insert("broken", 2, then=RuntimeError("late")))

        stored, broken = await self.as_one_batch(queue)
        await self.assertFailure(broken, RuntimeError)
        for d in stored:
            self.assertIsNone(await d)
        self.assertEqual(self.calls, {"broken": 2})
        ids = await self.db.run(lambda c: c.execute("SELECT id FROM event_log").fetchall())
        self.assertEqual(sorted(ids), [("ev0",), ("ev1",), ("ev2",)])
        self.assertEqual(await self.rows(), [])
