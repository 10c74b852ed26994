"""The SQLite spool: the ISpool conformance suite plus what only SQLite has.

Real database files in trial's temporary directory, a real child process for the
hard-kill test; nothing is mocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from typing import Any

from attrs import evolve
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.interfaces import ISpool
from sendarix.model.message import Lease, RecipientOutcome, RecipientStatus, Reply
from sendarix.stores import codec
from sendarix.stores.spool import SQLiteSpool, open_spool, sqlite_path
from sendarix.stores.sqlite.database import DatabaseClosed, SQLiteDatabase
from sendarix.stores.sqlite.spool import SCHEMA, WALK_AFTER, WALK_AT, due_query
from tests.support.paths import REPO_ROOT
from tests.support.spool_contract import T0, SpoolContractMixin, sample_message

# The global reactor provides every reactor interface these tests use (threads,
# processes, time); its stub type names none of them.
reactor: Any = _reactor

REPO = REPO_ROOT


class SQLiteSpoolTests(SpoolContractMixin, TestCase):
    """The SQLite spool passes the ISpool conformance suite."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".db"

    def make_spool(self) -> ISpool:
        return SQLiteSpool.at_path(self.path, reactor)


#: The spool's tables as releases before 2026-12-06 made them: every table with a rowid.
#: Layout 1 had no held columns.
LAYOUT_1_SCHEMA = tuple(
    sql.replace(",\n        held_node TEXT,\n        held_until REAL", "") for sql in SCHEMA
)
assert LAYOUT_1_SCHEMA != SCHEMA, "the message table's DDL changed"

ROWID_SCHEMA = tuple(sql.replace(" WITHOUT ROWID", "") for sql in LAYOUT_1_SCHEMA)


#: The spool's tables as the release before them made them (e5abbbd to 0bbd2d0): the
#: delivery table without a rowid too.
DELIVERY_WITHOUT_ROWID_SCHEMA = tuple(
    sql.replace("PRIMARY KEY (queue_id, domain))", "PRIMARY KEY (queue_id, domain)) WITHOUT ROWID")
    for sql in LAYOUT_1_SCHEMA
)
# Derived by a replace: if today's schema stopped matching it, the tests of that
# layout would silently test today's.
assert DELIVERY_WITHOUT_ROWID_SCHEMA != LAYOUT_1_SCHEMA, "the delivery table's DDL changed"


def make_old_spool_file(path: str, schema: tuple[str, ...] = ROWID_SCHEMA) -> None:
    """A spool file whose tables an earlier release made (by default, all rowid tables)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for sql in schema:
            conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def counted_connection(
    test: SynchronousTestCase, schema: tuple[str, ...], domain: str, backlog: int
) -> tuple[sqlite3.Connection, list[int]]:
    """A spool file with ``backlog`` due deliveries to ``domain`` (and nothing else),
    open with SQLite's steps counted: the list's one number goes up every 100 steps
    of its virtual machine (counted, not timed)."""
    path = os.path.abspath(test.mktemp()) + ".db"
    make_old_spool_file(path, schema)
    conn = sqlite3.connect(path)
    test.addCleanup(conn.close)
    conn.executemany(
        "INSERT INTO spool_delivery (queue_id, domain, due) VALUES (?, ?, ?)",
        [(f"Q{i:06d}", domain, T0 + i / 1000) for i in range(backlog)],
    )
    conn.commit()
    counted = [0]

    def count() -> int:
        counted[0] += 1
        return 0

    conn.set_progress_handler(count, 100)
    return conn, counted


class SQLiteRowidSpoolTests(SpoolContractMixin, TestCase):
    """A spool file made by an earlier release, whose tables all have a rowid, still
    passes the whole conformance suite: its tables are kept as they are."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".db"
        make_old_spool_file(self.path)

    def make_spool(self) -> ISpool:
        return SQLiteSpool.at_path(self.path, reactor)

    async def test_tables_kept(self) -> None:
        """Opening the older file changes none of its tables."""
        spool = SQLiteSpool.at_path(self.path, reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        for table in ("spool_message", "spool_body", "spool_delivery", "spool_recipient"):
            conn.execute(f"SELECT rowid FROM {table}").fetchall()  # raises without one


class SQLiteDeliveryWithoutRowidSpoolTests(SpoolContractMixin, TestCase):
    """A spool file whose delivery table has no rowid (made by the release before
    this one) passes the whole conformance suite too."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".db"
        make_old_spool_file(self.path, DELIVERY_WITHOUT_ROWID_SCHEMA)

    def make_spool(self) -> ISpool:
        return SQLiteSpool.at_path(self.path, reactor)


class SQLiteSpoolLayoutTests(TestCase):
    """How the spool's tables are stored, and what that saves per message."""

    async def test_message_table_has_no_rowid(self) -> None:
        """A new spool keeps messages in their primary key's B-tree; bodies keep a
        rowid (large ones read back faster with it), deliveries too (the lease poll
        walks their due index faster), and recipients the rowid that orders them."""
        path = os.path.abspath(self.mktemp()) + ".db"
        spool = SQLiteSpool.at_path(path, reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        with self.assertRaises(sqlite3.OperationalError):
            conn.execute("SELECT rowid FROM spool_message")
        for table in ("spool_body", "spool_delivery", "spool_recipient"):
            conn.execute(f"SELECT rowid FROM {table}").fetchall()

    async def test_fewer_pages_per_message(self) -> None:
        """Storing a message writes at least one page fewer to the log than the
        same message in a spool of rowid tables: the message table has no rowid."""

        async def pages_per_message(path: str) -> list[int]:
            spool = SQLiteSpool.at_path(path, reactor)
            await spool.start()
            self.addCleanup(spool.stop)
            counts = []
            for i in range(5):
                # The log is never checkpointed this early: it grows by whole frames.
                before = os.path.getsize(path + "-wal")
                await spool.enqueue_leased(sample_message(f"Q{i}"), "node", T0 + 300)
                counts.append((os.path.getsize(path + "-wal") - before) // (4096 + 24))
            return counts

        old = os.path.abspath(self.mktemp()) + ".db"
        make_old_spool_file(old)
        new = os.path.abspath(self.mktemp()) + ".db"
        old_pages = await pages_per_message(old)
        new_pages = await pages_per_message(new)
        for before, now in zip(old_pages, new_pages, strict=True):
            self.assertLessEqual(now, before - 1, (old_pages, new_pages))

    def test_poll_past_a_resting_destination(self) -> None:
        """The lease poll's statement, walking past the due mail of a destination it
        leaves out, takes fewer of SQLite's steps on this release's delivery table than on one
        without a rowid (counted, not timed: SQLite calls a progress handler every
        100 steps of its virtual machine)."""

        def steps(schema: tuple[str, ...]) -> int:
            conn, counted = counted_connection(self, schema, "resting.example", 3000)
            rows = conn.execute(
                due_query(1), (T0 + 10, T0 + 10, 3000, "resting.example", 100)
            ).fetchall()
            self.assertEqual(rows, [])
            return counted[0]

        now, before = steps(SCHEMA), steps(DELIVERY_WITHOUT_ROWID_SCHEMA)
        # 150 against 210 with SQLite 3.40 (and about a quarter of the time).
        self.assertLess(now, before, (now, before))

    def test_poll_cost_does_not_grow_with_a_left_out_backlog(self) -> None:
        """A poll that leaves out a site with 3,000 or with 30,000 due deliveries
        takes the same number of SQLite steps: it looks past at most
        ``look_past_limit`` of them (before, it walked past every one, inside the
        write transaction, at every poll)."""

        def steps(backlog: int) -> int:
            conn, counted = counted_connection(self, SCHEMA, "full.example", backlog)
            now, limit = T0 + 100, 100
            window = codec.look_past_limit(limit)
            rows = conn.execute(
                due_query(1), (now, now, window, "full.example", limit)
            ).fetchall()
            self.assertEqual(rows, [])
            last = conn.execute(WALK_AT, (now, now, window - 1)).fetchone()
            self.assertEqual(last[1], f"Q{window - 1:06d}")
            beyond = conn.execute(WALK_AFTER, (now, now, *last, limit)).fetchall()
            self.assertEqual(len(beyond), limit)
            return counted[0]

        small, large = steps(3000), steps(30000)
        self.assertLess(abs(large - small), small / 10, (small, large))

# The child enqueues one message and reports OK; then it keeps 20 enqueues in flight
# and reports MORE once 100 more are stored.  The parent kills it at MORE, so the
# kill lands in the middle of later writes.
CHILD = r"""
import sys
from twisted.internet import reactor
from sendarix.model.message import Envelope
from sendarix.model.message import MessageMeta
from sendarix.model.message import NewMessage
from sendarix.stores.spool import open_spool
from tests.support.paths import REPO_ROOT

def message(n):
    return NewMessage(
        queue_id="Q%06d" % n,
        envelope=Envelope(sender="s@example.org", recipients=("r%d@example.com" % n,)),
        meta=MessageMeta(tenant="t", received_at=1000.0 + n),
        body=(b"message %d\r\n" % n) * 1024,
    )

state = {"next": 1, "stored": 0}

def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()

def one_more(_=None):
    n = state["next"]
    if n > 5000:
        return
    state["next"] = n + 1
    spool.enqueue(message(n)).addCallbacks(stored, failed)

def stored(_):
    state["stored"] += 1
    if state["stored"] == 100:
        say("MORE")
    one_more()

def failed(f):
    say("ERR %s" % f.getErrorMessage())

def first_stored(_):
    say("OK")
    for _ in range(20):
        one_more()

spool = open_spool("sqlite:" + sys.argv[1], reactor)
d = spool.start()
d.addCallback(lambda _: spool.enqueue(message(0)))
d.addCallbacks(first_stored, failed)
reactor.run()
"""


class _Child(ProcessProtocol):
    """Collects the child's output; kills it (by its PID) once it says MORE."""

    def __init__(self) -> None:
        self.output = b""
        self.errors = b""
        self.ended: Deferred[BaseException | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if (b"MORE\n" in self.output or b"ERR" in self.output) and self.transport is not None:
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Failure) -> None:
        # The exception, not the Failure: a Failure would errback the Deferred.
        self.ended.callback(reason.value)


class SQLiteSpoolStorageTests(TestCase):
    """Settings and failure behaviour of the SQLite file underneath the spool."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".db"

    async def test_wal_and_full_sync(self) -> None:
        """The spool's connection runs in WAL mode with synchronous=FULL,
        checkpoints its log every 10,000 pages rather than SQLite's 1,000, and keeps
        its statement journals in memory (2: MEMORY) instead of temporary files."""
        db = SQLiteDatabase(self.path, reactor)
        spool = SQLiteSpool(db, owns_db=True)
        await spool.start()
        self.addCleanup(spool.stop)
        mode, sync, checkpoint, temp = await db.run(
            lambda c: (
                c.execute("PRAGMA journal_mode").fetchone()[0],
                c.execute("PRAGMA synchronous").fetchone()[0],
                c.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
                c.execute("PRAGMA temp_store").fetchone()[0],
            )
        )
        self.assertEqual((mode, sync, checkpoint, temp), ("wal", 2, 10000, 2))

    async def test_enqueue_leased(self) -> None:
        """Fresh mail stored with its deliveries leased to the accepting node: the
        deliveries it hands back are those a lease poll would read, no poll takes
        them while the lease lasts, and a restart of the node takes them back."""
        spool = SQLiteSpool.at_path(self.path, reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        msg = sample_message("Q1", ("a@one.test", "b@two.test", "c@one.test"))
        handed = await spool.enqueue_leased(msg, "node-a", T0 + 300)
        self.assertEqual([(d.domain, [r.address for r in d.recipients]) for d in handed],
                         [("one.test", ["a@one.test", "c@one.test"]),
                          ("two.test", ["b@two.test"])])
        self.assertEqual({d.lease for d in handed}, {Lease("node-a", T0 + 300)})
        self.assertEqual(await spool.lease_due("node-b", T0 + 1, 10, 300), [])
        self.assertEqual(await spool.reclaim("node-a"), 2)
        polled = await spool.lease_due("node-a", T0 + 1, 10, 300)
        self.assertEqual(
            [evolve(d, lease=None) for d in polled], [evolve(d, lease=None) for d in handed]
        )
        self.assertEqual(await spool.body("Q1"), msg.body)

    async def test_failing_job_keeps_batch(self) -> None:
        """A job that fails in a group-commit batch rolls back alone."""
        db = SQLiteDatabase(self.path, reactor, schema="CREATE TABLE t (n INTEGER);")
        await db.open()
        self.addCleanup(db.close)
        gate = threading.Event()
        # The database thread waits inside this job while the next three are queued,
        # so those three are taken as one batch.
        held = db.run(lambda c: gate.wait(10))

        def insert(n: int, then_fail: bool = False) -> Callable[[sqlite3.Connection], int]:
            def job(conn: sqlite3.Connection) -> int:
                conn.execute("INSERT INTO t (n) VALUES (?)", (n,))
                if then_fail:
                    raise RuntimeError("job failed after writing")
                return n

            return job

        first = db.run(insert(1))
        broken = db.run(insert(2, then_fail=True))
        third = db.run(insert(3))
        gate.set()
        self.assertTrue(await held)
        self.assertEqual(await first, 1)
        await self.assertFailure(broken, RuntimeError)
        self.assertEqual(await third, 3)
        rows = await db.run(lambda c: c.execute("SELECT n FROM t ORDER BY n").fetchall())
        self.assertEqual(rows, [(1,), (3,)])

    async def test_waits_for_another_writer(self) -> None:
        """While another connection (another worker process) holds the write lock, a
        job waits for it, then commits.  The waiting is the database's own (in short
        steps): SQLite's busy handler is off once the file is open, so no statement
        pays for setting it per transaction."""
        db = SQLiteDatabase(self.path, reactor, schema="CREATE TABLE t (n INTEGER);")
        await db.open()
        self.addCleanup(db.close)
        other = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t (n) VALUES (1)")
        job = db.run(lambda c: c.execute("INSERT INTO t (n) VALUES (2)").rowcount)
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(job.called)  # still waiting for the lock
        other.execute("COMMIT")
        self.assertEqual(await job, 1)
        rows, timeout = await db.run(lambda c: (
            c.execute("SELECT n FROM t ORDER BY n").fetchall(),
            c.execute("PRAGMA busy_timeout").fetchone()[0],
        ))
        self.assertEqual(rows, [(1,), (2,)])
        self.assertEqual(timeout, 0)

    async def test_writers_take_turns_on_the_lock_file(self) -> None:
        """Two databases on one file (two worker processes) take the writer lock
        file around each write transaction: while it is held elsewhere, a job waits;
        it commits as soon as the holder lets go, and lets go itself after a job
        that failed."""
        db = SQLiteDatabase(self.path, reactor, schema="CREATE TABLE t (n INTEGER);")
        await db.open()
        self.addCleanup(db.close)
        other = SQLiteDatabase(self.path, reactor)
        await other.open()
        self.addCleanup(other.close)

        def boom(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO t (n) VALUES (0)")
            raise ValueError("bad job")

        with self.assertRaises(ValueError):
            await other.run(boom)  # rolled back, and the lock file is let go
        held = os.open(self.path + "-writer.lock", os.O_RDWR)
        self.addCleanup(os.close, held)
        fcntl.flock(held, fcntl.LOCK_EX)
        job = db.run(lambda c: c.execute("INSERT INTO t (n) VALUES (1)").rowcount)
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(job.called)
        fcntl.flock(held, fcntl.LOCK_UN)
        self.assertEqual(await job, 1)
        self.assertEqual(await other.run(lambda c: c.execute("SELECT n FROM t").fetchall()),
                         [(1,)])

    async def test_workers_create_the_file_together(self) -> None:
        """Several databases opening one new file at the same moment (worker
        processes starting together) all open: the one SQLite answers "locked" at
        once, without waiting, tries again."""
        schema = ";\n".join(SCHEMA) + ";"
        for attempt in range(40):
            path = os.path.abspath(self.mktemp()) + f"-{attempt}.db"
            dbs = [SQLiteDatabase(path, reactor, schema=schema) for _ in range(4)]
            try:
                await gatherResults([db.open() for db in dbs])
            finally:
                await gatherResults([db.close() for db in dbs])

    async def test_background_job_yields_to_the_mail_path(self) -> None:
        """A background job queued before a foreground one runs after it, in its own
        transaction: its writes never lengthen the foreground commit."""
        db = SQLiteDatabase(self.path, reactor, schema="CREATE TABLE t (n INTEGER);")
        await db.open()
        self.addCleanup(db.close)
        gate = threading.Event()
        held = db.run(lambda c: gate.wait(10))
        order: list[str] = []

        def job(name: str) -> Callable[[sqlite3.Connection], int]:
            def run(conn: sqlite3.Connection) -> int:
                order.append(name)
                conn.execute("INSERT INTO t (n) VALUES (1)")
                return int(conn.total_changes)

            return run

        background = db.run(job("background"), background=True)
        foreground = db.run(job("foreground"))
        gate.set()
        await held
        await gatherResults([background, foreground])
        self.assertEqual(order, ["foreground", "background"])

    async def test_commit_syncs_only_for_durable_jobs(self) -> None:
        """A batch of jobs that do not need their own fsync commits with
        synchronous=NORMAL; one durable job in the batch makes the whole commit FULL."""
        db = SQLiteDatabase(self.path, reactor)
        await db.open()
        self.addCleanup(db.close)

        def level(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        self.assertEqual(await db.run(level, durable=False), 1)
        self.assertEqual(await db.run(level), 2)
        gate = threading.Event()
        held = db.run(lambda c: gate.wait(10), durable=False)
        together = db.run(level, durable=False)
        durable = db.run(lambda c: None)
        gate.set()
        await gatherResults([held, durable])
        self.assertEqual(await together, 2)
        self.assertEqual(await db.run(level, durable=False, background=True), 1)

    async def test_which_spool_writes_wait_for_the_disk(self) -> None:
        """Storing mail (before its 250) commits with an fsync.  Recording a
        delivery's outcome, leasing and renewing do not: they survive a crash of the
        relay, and the next durable commit or checkpoint syncs them."""
        db = SQLiteDatabase(self.path, reactor)
        spool = SQLiteSpool(db, owns_db=True)
        await spool.start()
        self.addCleanup(spool.stop)

        def level(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        async def level_beside(write: Callable[[], Deferred[Any]]) -> int:
            gate = threading.Event()
            held = db.run(lambda c: gate.wait(10), durable=False)
            written = write()
            probe = db.run(level, durable=False)
            gate.set()
            await gatherResults([held, written])
            return int(await probe)

        msg = sample_message("Q1", ("a@one.test",))
        self.assertEqual(
            await level_beside(lambda: spool.enqueue_leased(msg, "node-a", T0 + 300)), 2
        )
        self.assertEqual(
            await level_beside(lambda: spool.renew("Q1", "one.test", "node-a", T0 + 600)), 1
        )
        delivered = RecipientOutcome("a@one.test", RecipientStatus.DELIVERED,
                                     Reply(250, "2.0.0", "ok"))
        self.assertEqual(
            await level_beside(
                lambda: spool.complete("Q1", "one.test", "node-a", [delivered], T0 + 1)
            ),
            1,
        )
        self.assertIsNone(await spool.get("Q1"))
        self.assertEqual(
            await level_beside(lambda: spool.lease_due("node-a", T0 + 1, 10, 300)), 1
        )

    async def test_background_job_not_starved(self) -> None:
        """Under a steady stream of foreground jobs, a background job still runs
        (it joins a batch once it has waited background_delay)."""
        db = SQLiteDatabase(self.path, reactor)
        await db.open()
        self.addCleanup(db.close)
        background = db.run(lambda c: "done", background=True)
        deadline = reactor.seconds() + 5.0
        # Each foreground job queues the next at once: the database is never quiet.
        while not background.called and reactor.seconds() < deadline:
            await db.run(lambda c: None)
        self.assertTrue(background.called)
        self.assertEqual(await background, "done")

    async def test_records_are_versioned_json(self) -> None:
        """Envelope and metadata are stored as JSON carrying "v": 1."""
        db = SQLiteDatabase(self.path, reactor)
        spool = SQLiteSpool(db, owns_db=True)
        await spool.start()
        self.addCleanup(spool.stop)
        message = sample_message("01HZZZZZZZNODE000001", recipients=("a@x.example",))
        await spool.enqueue(message)
        envelope, meta = await db.run(
            lambda c: c.execute("SELECT envelope, meta FROM spool_message").fetchone()
        )
        self.assertEqual(json.loads(envelope)["v"], 1)
        self.assertEqual(json.loads(meta)["v"], 1)
        self.assertEqual(json.loads(envelope)["recipients"], list(message.envelope.recipients))

    async def test_shared_database_left_open(self) -> None:
        """A spool on a shared database does not close it; one that owns it does."""
        shared = SQLiteDatabase(self.path, reactor)
        await shared.open()
        self.addCleanup(shared.close)
        # The database was opened before the spool started: the tables still appear.
        spool = open_spool("sqlite:" + self.path, reactor, db=shared)
        await spool.start()
        await spool.enqueue(sample_message("01HZZZZZZZNODE000002"))
        await spool.stop()
        self.assertEqual(await shared.run(lambda c: 7), 7)

        owned = SQLiteSpool.at_path(self.path, reactor)
        await owned.start()
        self.assertEqual((await owned.stats()).messages, 1)
        await owned.stop()
        await self.assertFailure(owned.stats(), DatabaseClosed)

    async def test_survives_hard_kill(self) -> None:
        """A message reported stored survives SIGKILL of the process that stored it,
        and every message found afterwards is whole."""
        child = _Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        transport = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-c", CHILD, self.path], env=env
        )
        # If the child never reports, kill it rather than leave it behind.
        watchdog = reactor.callLater(20, transport.signalProcess, "KILL")
        ended = await child.ended
        if watchdog.active():
            watchdog.cancel()
        self.assertEqual(child.output.splitlines()[:2], [b"OK", b"MORE"], child.errors)
        self.assertIsInstance(ended, ProcessTerminated)
        assert isinstance(ended, ProcessTerminated)
        self.assertEqual(ended.signal, signal.SIGKILL)

        spool = SQLiteSpool.at_path(self.path, reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        stored = await spool.get("Q000000")
        assert stored is not None
        self.assertEqual(stored.envelope.recipients, ("r0@example.com",))
        self.assertEqual(await spool.body("Q000000"), b"message 0\r\n" * 1024)
        listed = await spool.list_messages(limit=10_000)
        self.assertGreaterEqual(len(listed), 101)
        bodies = await gatherResults([spool.body(m.queue_id) for m in listed])
        for message, body in zip(listed, bodies):
            n = int(message.queue_id[1:])
            self.assertEqual(body, (b"message %d\r\n" % n) * 1024)
            self.assertEqual([r.address for r in message.recipients], [f"r{n}@example.com"])
        self.assertEqual((await spool.stats()).messages, len(listed))


class SQLiteSpoolQueryPlanTests(TestCase):
    """Queries on one message's recipients use the primary key: with many messages to
    one domain, the (domain, status) index would walk all of them each time."""

    async def test_per_message_queries_use_the_primary_key(self) -> None:
        """Every recipient query that enqueue, lease_due and complete run is planned
        on the primary key, never on spool_recipient_domain."""
        spool = SQLiteSpool.at_path(os.path.join(self.mktemp(), "spool.db"), reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        db = spool._db
        statements: list[str] = []
        await db.run(lambda conn: conn.set_trace_callback(statements.append))
        for i in range(3):
            await spool.enqueue(sample_message(f"Q{i}", ("a@one.example", "b@one.example")))
        leased = await spool.lease_due("node", T0 + 1, 10, 60.0)
        self.assertEqual(len(leased), 3)
        for d in leased:
            await spool.complete(
                d.queue_id, d.domain, "node",
                [RecipientOutcome(r.address, RecipientStatus.DELIVERED,
                                  Reply(250, "2.0.0", "ok")) for r in d.recipients],
                T0 + 2,
            )
        await db.run(lambda conn: conn.set_trace_callback(None))
        selects = sorted({s for s in statements
                          if s.lstrip().upper().startswith("SELECT") and "spool_recipient" in s})
        self.assertTrue(selects)

        def plans(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return [(sql, " / ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)))
                    for sql in selects]

        for sql, plan in await db.run(plans):
            self.assertNotIn("spool_recipient_domain", plan, sql)


class OpenSpoolTests(SynchronousTestCase):
    """open_spool picks a backend from the spool URL."""

    def test_sqlite_paths(self) -> None:
        """sqlite:/p, sqlite:///p and sqlite:p name the file p."""
        self.assertEqual(sqlite_path("sqlite:/var/spool.db"), "/var/spool.db")
        self.assertEqual(sqlite_path("sqlite:///var/spool.db"), "/var/spool.db")
        self.assertEqual(sqlite_path("sqlite:var/spool.db"), "var/spool.db")
        self.assertRaises(ValueError, sqlite_path, "sqlite:")
        self.assertRaises(ValueError, sqlite_path, "sqlite://host/spool.db")

    def test_sqlite_spool(self) -> None:
        """A sqlite URL gives a SQLite spool; a shared database must be the same file."""
        path = os.path.abspath(self.mktemp())
        self.assertIsInstance(open_spool("sqlite:" + path, reactor), SQLiteSpool)
        db = SQLiteDatabase(path, reactor)
        self.assertIsInstance(open_spool("sqlite://" + path, reactor, db=db), SQLiteSpool)
        self.assertRaises(ValueError, open_spool, "sqlite:" + path + ".other", reactor, db=db)

    def test_redis_not_yet(self) -> None:
        """Redis URLs are recognised but not implemented yet; others are refused."""
        self.assertRaises(NotImplementedError, open_spool, "redis://127.0.0.1:6379/0", reactor)
        self.assertRaises(NotImplementedError, open_spool, "rediss://cache:6380/0", reactor)
        self.assertRaises(ValueError, open_spool, "ftp://example.org/spool", reactor)

    def test_lease_needs_positive_length(self) -> None:
        """lease_due refuses a lease of no length (it would never hold)."""
        spool = SQLiteSpool.at_path(os.path.abspath(self.mktemp()), reactor)
        self.failureResultOf(spool.lease_due("n1", T0, 10, 0), ValueError)
        self.assertEqual(self.successResultOf(spool.lease_due("n1", T0, 0, 60)), [])
