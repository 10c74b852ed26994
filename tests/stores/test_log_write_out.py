"""The database thread syncs the write-ahead log once it is idle after commits made
without an fsync, so that the next durable commit writes out only its own pages.

SQLite's own syncs happen inside its C code; the thread's own sync goes through
``os.fdatasync``, which these tests wrap to see which file it was given (the real
call still runs).  Real database files, nothing else replaced.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from sendarix.stores.sqlite import database
from sendarix.stores.sqlite.database import SQLiteDatabase

reactor: Any = _reactor


class LogWriteOutTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.path = os.path.abspath(self.mktemp()) + ".db"
        self.db = SQLiteDatabase(self.path, reactor, schema="CREATE TABLE t (n INTEGER);")
        await self.db.open()
        self.addCleanup(self.db.close)
        self.synced: list[str] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            self.synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        self.patch(database.os, "fdatasync", fdatasync)

    def insert(self, n: int) -> Any:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (n) VALUES (?)", (n,))

        return job

    async def synced_count(self, expected: int) -> int:
        """How many syncs were made, once ``expected`` were (or 10 s passed), and a
        moment more in which any further one would show."""
        for _ in range(1000):
            if len(self.synced) >= expected:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.1, lambda: None)
        return len(self.synced)

    async def settle(self) -> None:
        """Give the database thread time to find its queue empty (and to sync, if it
        were going to)."""
        await deferLater(reactor, 0.5, lambda: None)

    async def test_idle_after_a_commit_without_fsync(self) -> None:
        await self.db.run(self.insert(1), durable=False)
        self.assertEqual(await self.synced_count(1), 1)
        self.assertEqual(self.synced, [os.path.realpath(self.path) + "-wal"])

    async def test_nothing_added_after_a_durable_commit(self) -> None:
        await self.db.run(self.insert(1))
        await self.settle()
        self.assertEqual(self.synced, [])

    async def behind_a_commit_without_fsync(self, queue_next: Any) -> None:
        """Run a job without an fsync, with ``queue_next()`` queued while it runs (so
        that it is taken next, with no idle moment in between), and wait for both."""
        started, gate = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (n) VALUES (0)")
            started.set()
            gate.wait(10)

        held = self.db.run(hold, durable=False)
        self.assertTrue(started.wait(10))
        queued = queue_next()
        gate.set()
        await held
        await queued

    async def test_a_durable_commit_covers_what_came_before(self) -> None:
        # The durable commit syncs both jobs' pages: nothing is left to sync once
        # the thread is idle.
        await self.behind_a_commit_without_fsync(lambda: self.db.run(self.insert(1)))
        await self.settle()
        self.assertEqual(self.synced, [])

    async def test_once_for_commits_that_follow_each_other(self) -> None:
        # No sync between the two, one after both.
        await self.behind_a_commit_without_fsync(
            lambda: self.db.run(self.insert(1), durable=False)
        )
        self.assertEqual(await self.synced_count(1), 1)
        rows = await self.db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0])
        self.assertEqual(rows, 2)

    async def nondurable_twice(self) -> int:
        """Two commits without an fsync, each followed by an idle moment; the syncs."""
        await self.db.run(self.insert(1), durable=False)
        self.assertEqual(await self.synced_count(1), 1)
        await self.db.run(self.insert(2), durable=False)
        return await self.synced_count(2)

    async def test_none_for_a_while_after_a_slow_one(self) -> None:
        # Every sync counts as slow here: after the first, none is made while idle.
        self.db.write_out_limit = 0.0
        self.assertEqual(await self.nondurable_twice(), 1)

    async def test_again_once_the_pause_is_over(self) -> None:
        self.db.write_out_limit = 0.0
        self.db.write_out_pause = 0.0
        self.assertEqual(await self.nondurable_twice(), 2)
