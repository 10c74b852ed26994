"""One SQLite database file, worked on by one dedicated thread, with group commit.

All SQL runs on the database's own thread, never on the reactor thread.  Jobs queued
while a transaction is in progress are committed together: many concurrent SMTP
sessions share one fsync, and each job's Deferred fires only after the COMMIT that
made its writes durable.  A job that fails does not undo the others in its batch:
one that fails before changing a row (the usual case: a duplicate key, a lease that
was lost) leaves nothing behind, since SQLite undoes a failed statement itself; one
that fails after changing rows makes the batch start over with a SAVEPOINT around
each job, which rolls back that job alone.  The savepoints are not taken up front
because they were two statements more per job, each a release and a retaking of the
GIL while the reactor thread waits for it: 1.5–5 % of a worker's CPU per message
under load, as measured.

Only the writes that someone is told are safe (a message before its 250, an
operator's change) need that fsync.  A job queued with ``durable=False`` (the
delivery agent's bookkeeping, the delivery log) is committed without one when its
batch holds no durable job: in WAL mode its pages are in the log file, so a crash
of the process loses nothing, and the next durable commit or checkpoint syncs them
with its own.  Only a crash of the machine can lose the last of them.  Once the
thread has nothing left to do it syncs the log itself, so that the next client's
commit does not wait for those pages as well.

Reads a session waits on (``read(fn)``: the recipient's suppression check) run on a
second thread with its own read-only connection.  In WAL mode a reader never waits
for a writer, so the check no longer queues behind commits and their fsyncs (nor
behind another worker process's write lock).  It sees what was committed when it
runs, as a read from another node would.
"""

from __future__ import annotations

import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from sendarix.stores.errors import StoreUnavailable

T = TypeVar("T")
log = Logger()

_STOP = object()

#: A job taken for a batch: the function, its caller's Deferred, whether its commit
#: must reach the disk before the Deferred fires, and whether it always runs inside
#: a savepoint of its own (see :meth:`SQLiteDatabase.run`).
_Job = tuple[Callable[[sqlite3.Connection], Any], "Deferred[Any]", bool, bool]


class DatabaseClosed(StoreUnavailable):
    """The database was closed before the job ran (the node is stopping): the store
    is unavailable, as a server would be."""


class SQLiteDatabase:
    """A SQLite file in WAL mode, owned by one thread, that syncs the commits that
    need it (``synchronous=FULL``, or NORMAL for a batch of non-durable jobs).

    ``run(fn)`` runs ``fn(connection)`` in a write transaction (shared with other
    queued jobs) and fires its Deferred, on the reactor thread, after the commit.
    """

    max_batch = 512
    #: Log pages after which a commit checkpoints the log into the database file.
    wal_checkpoint_pages = 10000
    #: A background job runs once no other job came for this long (seconds)...
    #: Under steady mail (a job every millisecond or two per worker) 5 ms is rarely
    #: quiet, so the delivery log's rows wait for the next batch and share its commit,
    #: instead of a transaction of their own in each short gap between messages: 1–5 %
    #: less CPU per message than with 1 ms, in alternating pairs.
    background_idle = 0.005
    #: ...or with the next batch once it has waited this long.
    background_delay = 0.02
    #: Syncs of the log made while idle (see :meth:`_write_out_log`) that take
    #: longer than this on average (seconds, a moving average) show a disk whose
    #: syncs are slow.  A commit that comes during such a sync waits for it, which
    #: would cost more than the sync saves; so none is made for ``write_out_pause``
    #: seconds.  One slow sync among fast ones (0.15–0.7 ms here) does not count.
    write_out_limit = 0.001
    write_out_pause = 10.0

    def __init__(
        self,
        path: str,
        reactor: IReactorFromThreads,
        schema: str = "",
        busy_timeout_ms: int = 10000,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._schemas: list[str] = [schema] if schema else []
        self._busy_timeout_ms = busy_timeout_ms
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._opened: Deferred[None] | None = None
        # Why the opening failed, for every later open() (None: it did not fail).
        self._open_failure: Failure | None = None
        self._closed = False
        self._reads: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Write transactions committed since the database was made (the database
        #: thread counts them; reading the count from another thread is safe).  What
        #: a batch of jobs shares shows in how slowly it grows.
        self.commits = 0
        self._writer_lock: int | None = None
        self._synchronous_full = True
        # The last commit was made without an fsync (see _write_out_log), and the
        # monotonic time before which no sync is made while idle.
        self._unsynced = False
        self._write_out_after = 0.0
        self._write_out_average = 0.0
        # The log file, opened for those syncs: SQLite keeps the same file while
        # this thread's connection is open (it removes it only when the last
        # connection closes, and cuts it short in place).
        self._log_fd: int | None = None
        self._reader: threading.Thread | None = None

    def add_schema(self, sql: str) -> None:
        """Register DDL (``CREATE ... IF NOT EXISTS``) to run when the database opens
        (at once, on the database thread, when it is already open)."""
        self._schemas.append(sql)
        if self._opened is not None:
            # executescript() would COMMIT the shared batch: run statement by statement.
            def apply(conn: sqlite3.Connection) -> None:
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)

            self.run(apply, savepoint=True)

    def open(self) -> Deferred[None]:
        """Start the thread, open the file and apply schemas."""
        if self._open_failure is not None:
            return fail(self._open_failure)
        if self._opened is not None:
            return self._chain(self._opened)
        self._opened = Deferred()
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._thread = threading.Thread(
            target=self._main, name=f"sqlite:{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()
        return self._chain(self._opened)

    def _open_failed(self, failure: Failure) -> None:
        assert self._opened is not None
        self._open_failure = failure
        self._opened.errback(failure)
        # Each opener got the failure through its own chained Deferred; the shared one
        # keeps nothing, so no "unhandled error" is reported when it is collected.
        self._opened.addErrback(lambda _: None)

    @staticmethod
    def _chain(d: Deferred[None]) -> Deferred[None]:
        out: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(None)
            return result

        d.addBoth(relay)
        return out

    def run(
        self, fn: Callable[[sqlite3.Connection], T], *, background: bool = False,
        durable: bool = True, savepoint: bool = False,
    ) -> Deferred[T]:
        """Run ``fn(connection)`` in a transaction on the database thread.

        The Deferred fires with ``fn``'s result after the transaction commits, or
        fails with ``fn``'s exception (its writes rolled back) or the commit's error.

        A ``background`` job (the delivery log) stays off the mail path: it waits
        for a quiet moment (no other job for ``background_idle`` seconds), or joins
        the next batch once it has waited ``background_delay`` seconds, so its pages
        never lengthen the commit that a 250 or a lease is waiting for.  It may
        therefore run after jobs queued later.

        A job that is not ``durable`` does not need an fsync of its own: when no
        job in its batch does, the commit skips it (``synchronous=NORMAL``).  Its
        writes survive a crash of the process, not of the machine, until the next
        durable commit.  For writes that can be made again: a lease, a delivery's
        outcome (lost, the message is delivered again), a delivery-log row.

        ``fn`` may be called a second time, after its first call's writes were
        rolled back (when another job of its batch failed after changing rows), so
        it must change nothing outside the connection.  Whether a failed job changed
        anything is read from SQLite's count of changed rows, which schema changes
        are not part of: a job that creates or alters tables passes ``savepoint``,
        and always runs inside a savepoint of its own.
        """
        d: Deferred[T] = Deferred()
        if self._closed:
            d.errback(DatabaseClosed(self.path))
            return d
        self._jobs.put((fn, d, background, durable, savepoint))
        return d

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """Run ``fn(connection)``, which only reads, on the reader thread.

        The Deferred fires with ``fn``'s result, or fails with its exception.  ``fn``
        sees the data committed when it starts (one read transaction), so a write
        still queued on the database thread is not seen yet.
        """
        if self._closed or self._opened is None or not self._opened.called:
            # Not open (or failed to): the write thread answers, or refuses, as usual.
            return self.run(fn)
        d: Deferred[T] = Deferred()
        if self._reader is None:
            self._reader = threading.Thread(
                target=self._read_main, name=f"sqlite-read:{os.path.basename(self.path)}",
                daemon=True,
            )
            self._reader.start()
        self._reads.put((fn, d))
        return d

    def close(self) -> Deferred[None]:
        """Finish queued jobs, then close the connection and stop the thread."""
        d: Deferred[None] = Deferred()
        if self._reader is not None:
            self._reads.put((_STOP, None))
        if self._thread is None or self._closed or not self._thread.is_alive():
            self._closed = True
            d.callback(None)
            return d
        self._closed = True
        self._jobs.put((_STOP, d, False, True, False))
        return d

    # -- the reader thread ------------------------------------------------------

    @staticmethod
    def _read_batch(
        conn: sqlite3.Connection, batch: list[tuple[Any, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        """(reader thread) Run ``batch`` in one read transaction: one snapshot."""
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            failure = Failure(StoreUnavailable(f"read transaction: {e}"))
            return [(d, False, failure) for _, d in batch]
        results: list[tuple[Deferred[Any], bool, Any]] = []
        try:
            for fn, d in batch:
                try:
                    results.append((d, True, fn(conn)))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    results.append((d, False, Failure(e)))
        finally:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                log.failure("ending a read transaction failed")
        return results

    def _read_main(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            conn.execute("PRAGMA query_only = ON")
        except BaseException as e:  # noqa: BLE001 - each read gets the failure
            failure = Failure(StoreUnavailable(f"{self.path}: {e}"))
            while True:
                fn, d = self._reads.get()
                if fn is _STOP:
                    return
                self._reactor.callFromThread(d.errback, failure)
        try:
            while True:
                items = [self._reads.get()]
                while len(items) < self.max_batch:
                    try:
                        items.append(self._reads.get_nowait())
                    except queue.Empty:
                        break
                stop = any(fn is _STOP for fn, _ in items)
                results = self._read_batch(conn, [(fn, d) for fn, d in items if fn is not _STOP])
                if results:
                    self._reactor.callFromThread(_fire, results)
                if stop:
                    return
        finally:
            conn.close()

    # -- the database thread ----------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """Open the file and apply the settings and schemas.

        When another process (a worker starting beside us) holds a lock that SQLite
        does not wait for, try again until the busy timeout: two connections that
        create a new file can each hold what the other needs, and SQLite then
        answers one of them "locked" at once rather than let both wait forever."""
        return self._while_locked(self._connect_once, first=0.005, longest=0.1)

    def _while_locked(self, attempt: Callable[[], T], first: float, longest: float) -> T:
        """``attempt()``, again while SQLite answers "locked", for up to the busy
        timeout: sleeping ``first`` seconds, then twice as long each time, up to
        ``longest``."""
        deadline = time.monotonic() + self._busy_timeout_ms / 1000.0
        delay = first
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, longest)

    def _connect_once(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            return self._configure(conn)
        except BaseException:
            conn.close()
            raise

    def _configure(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # A statement that may fail after changing some pages (a delivery-log row and
        # its seven indexes) keeps a journal of those pages until it ends.  SQLite holds
        # that journal in memory up to 64 KiB and then moves it to a new temporary file
        # (created, written, unlinked).  Under the bench's load that was a file for
        # about one message in six, and 45 page writes per relayed message against 18
        # with the journal kept in memory.  In memory it is only ever as large as one
        # statement's pages; the writer runs no large sorts.
        conn.execute("PRAGMA temp_store = MEMORY")
        # Each message dirties some fifty pages across the spool's and the delivery
        # log's B-trees, mostly the same hot pages again and again.  SQLite's default
        # (a checkpoint every 1,000 log pages) copied those back into the database
        # file every twenty messages or so, inside a writer's commit; a longer log
        # copies each hot page once per checkpoint instead.  The log file then grows
        # to about 40 MiB, and is cut back to 64 MiB at most after a checkpoint.
        conn.execute(f"PRAGMA wal_autocheckpoint = {self.wal_checkpoint_pages}")
        conn.execute(f"PRAGMA journal_size_limit = {64 << 20}")
        for sql in self._schemas:
            conn.executescript(sql)
        # From here on only BEGIN IMMEDIATE can wait for another process's lock (in
        # WAL mode reads never do), and :meth:`_begin` does that waiting itself.
        conn.execute("PRAGMA busy_timeout = 0")
        return conn

    def _main(self) -> None:
        assert self._opened is not None
        try:
            conn = self._connect()
        except BaseException as e:  # noqa: BLE001 - reported to the opener
            f = Failure(e)
            self._closed = True
            self._reactor.callFromThread(self._open_failed, f)
            self._drain_refused()
            return
        self._writer_lock = _open_writer_lock(self.path)
        self._reactor.callFromThread(self._opened.callback, None)
        stoppers: list[Deferred[None]] = []
        held: list[_Job] = []  # background jobs waiting for a quiet moment
        held_since = 0.0
        try:
            while not stoppers:
                timeout = None
                if held:
                    due = held_since + self.background_delay - time.monotonic()
                    timeout = max(0.0, min(self.background_idle, due))
                try:
                    if self._unsynced:
                        try:
                            items = [self._jobs.get_nowait()]
                        except queue.Empty:
                            self._write_out_log()
                            items = [self._jobs.get(timeout=timeout)]
                    else:
                        items = [self._jobs.get(timeout=timeout)]
                except queue.Empty:
                    # Quiet, or they have waited long enough: the held jobs go alone.
                    batch, held = held[: self.max_batch], held[self.max_batch :]
                    held_since = time.monotonic()
                    self._run_batch(conn, batch)
                    continue
                while len(items) < self.max_batch:
                    try:
                        items.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                work: list[_Job] = []
                for fn, d, background, durable, savepoint in items:
                    if fn is _STOP:
                        stoppers.append(d)
                    elif background:
                        if not held:
                            held_since = time.monotonic()
                        held.append((fn, d, durable, savepoint))
                    else:
                        work.append((fn, d, durable, savepoint))
                if stoppers or (held and time.monotonic() - held_since >= self.background_delay):
                    work, held = work + held, []
                if work:
                    self._run_batch(conn, work)
            # Jobs queued after close() was called are refused.
            self._drain_refused()
        finally:
            conn.close()
            if self._writer_lock is not None:
                os.close(self._writer_lock)
            if self._log_fd is not None:
                os.close(self._log_fd)
            for d in stoppers:
                self._reactor.callFromThread(d.callback, None)

    def _write_out_log(self) -> None:
        """Sync the write-ahead log while no job waits, after commits that skipped it.

        Those commits (a delivery's outcome, delivery-log rows) leave their log pages
        in the kernel's cache, and the next durable commit's fsync covers the whole
        log file: it would write them out with its own pages while a client waits
        for its 250.  A message sent on its own then paid for the previous one's
        outcome (about 30 µs of the commit here).  Under steady mail this thread is
        never idle, so no sync is added.  Only data already committed is written:
        what is durable does not change.  On a disk whose syncs are slow, none is
        made for a while (``write_out_limit``)."""
        self._unsynced = False
        started = time.monotonic()
        if started < self._write_out_after:
            return
        if self._log_fd is None:
            try:
                self._log_fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return  # no log (yet): nothing to write out
        try:
            os.fdatasync(self._log_fd)
        except OSError as e:
            # The next durable commit syncs the same pages and reports its own error.
            log.warn("syncing the log of {path} failed: {why}", path=self.path, why=e)
        ended = time.monotonic()
        average = self._write_out_average = 0.9 * self._write_out_average + 0.1 * (
            ended - started
        )
        if average > self.write_out_limit:
            self._write_out_after = ended + self.write_out_pause
            self._write_out_average = 0.0  # measured afresh after the pause

    def _drain_refused(self) -> None:
        while True:
            try:
                fn, d, _, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                return
            if fn is _STOP:
                self._reactor.callFromThread(d.callback, None)
            else:
                self._reactor.callFromThread(d.errback, Failure(DatabaseClosed(self.path)))

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, after taking the writer lock file (see
        :func:`_open_writer_lock`).  A writer that does not take it (an older
        release, a tool) is waited for in steps of 0.1–2 ms for up to
        ``busy_timeout_ms``: SQLite's own busy handler sleeps 1, 2, 5, 10... ms, far
        longer than another writer's commit takes."""
        if self._writer_lock is not None:
            fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
        try:
            self._begin_immediate(conn)
        except BaseException:
            self._release_writer_lock()
            raise

    def _release_writer_lock(self) -> None:
        if self._writer_lock is not None:
            fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        self._while_locked(lambda: conn.execute("BEGIN IMMEDIATE"), first=0.0001,
                           longest=0.002)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        # One durable job makes the whole batch wait for the disk; the setting is
        # the connection's, so it is changed only when the kind of batch changes.
        durable = any(job[2] for job in batch)
        if durable != self._synchronous_full:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._synchronous_full = durable
        try:
            self._begin(conn)
        except BaseException as e:  # noqa: BLE001
            self._reactor.callFromThread(_fire, _all_failed(batch, e))
            return
        try:
            results = self._run_jobs(conn, batch, every_job_in_a_savepoint=False)
            if results is None:
                # A job failed after changing rows: start the batch over, each job in
                # a savepoint, so that only that job's writes are rolled back.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._begin_immediate(conn)
                results = self._run_jobs(conn, batch, every_job_in_a_savepoint=True)
            if results is None:
                # SQLite rolled the whole transaction back itself (a full disk, an
                # I/O error): no job's writes are left, so none of them succeeded.
                results = _all_failed(
                    batch, StoreUnavailable(f"{self.path}: transaction rolled back")
                )
            else:
                conn.execute("COMMIT")
                self.commits += 1
                self._unsynced = not durable
        except BaseException as e:  # noqa: BLE001 - the batch's callers get it
            # A failed COMMIT, or a statement of the batch's own (a savepoint, the
            # restart's BEGIN): nothing of the batch is kept.
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = _all_failed(batch, e)
        finally:
            # Whatever happened, the next writer must not wait for us.
            self._release_writer_lock()
        # One call into the reactor thread per batch, not one per job.
        self._reactor.callFromThread(_fire, results)

    @staticmethod
    def _run_jobs(
        conn: sqlite3.Connection, batch: list[_Job], every_job_in_a_savepoint: bool
    ) -> list[tuple[Deferred[Any], bool, Any]] | None:
        """Run ``batch``'s jobs in the open transaction; their results, or None when
        a job that ran without a savepoint failed after changing rows (the caller
        rolls back and runs the batch again, every job in a savepoint), or when
        SQLite ended the transaction itself."""
        results: list[tuple[Deferred[Any], bool, Any]] = []
        for fn, d, _, savepoint in batch:
            if savepoint or every_job_in_a_savepoint:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(conn)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    if not conn.in_transaction:
                        return None
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((d, False, Failure(e)))
                else:
                    conn.execute("RELEASE job")
                    results.append((d, True, value))
                continue
            changed = conn.total_changes
            try:
                value = fn(conn)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                # A failed statement's own changes are undone by SQLite (and are not
                # counted); rows changed by the job's earlier statements are.
                if conn.total_changes != changed or not conn.in_transaction:
                    return None
                results.append((d, False, Failure(e)))
            else:
                results.append((d, True, value))
        return results


def _open_writer_lock(path: str) -> int | None:
    """A descriptor of the lock file next to the database (``PATH-writer.lock``),
    or None when it cannot be opened (a read-only folder: SQLite's lock alone).

    Every writer of this package takes it (``flock``, exclusive) around its write
    transaction.  SQLite's own lock cannot be waited for, only polled; the kernel
    hands the lock file to the next waiting writer the moment the holder lets go,
    so worker processes on one spool pass the write lock on without sleeping in
    between.  SQLite's lock stays the one that guards the data.
    """
    try:
        return os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        log.warn("no writer lock file for {path}: {why}", path=path, why=e)
        return None


def _all_failed(batch: list[_Job], error: BaseException) -> list[tuple[Deferred[Any], bool, Any]]:
    """The results of a batch none of whose jobs was committed."""
    failure = Failure(error)
    return [(job[1], False, failure) for job in batch]


def _fire(results: list[tuple[Deferred[Any], bool, Any]]) -> None:
    """Fire a batch's Deferreds in order (on the reactor thread)."""
    for d, ok, value in results:
        if ok:
            d.callback(value)
        else:
            d.errback(value)
