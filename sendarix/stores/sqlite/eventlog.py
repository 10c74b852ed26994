"""The delivery log in SQLite: every :obj:`Event`, searchable, newest first.

Events live in ``event_log`` (searchable columns plus the JSON body); every recipient
an event names (``recipient`` and each of ``recipients``) goes to ``event_recipient``
and every tag to ``event_tag``, so a search by recipient finds a message's
``accepted`` event whichever of its recipients is asked for.  ``seq`` orders the log;
AUTOINCREMENT keeps it from being reused after ``trim``, so cursors stay valid.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from sendarix.interfaces import IEventLog
from sendarix.model.event import MAX_LIMIT, Event, EventPage, EventQuery
from sendarix.stores.paging import decode_cursor, encode_cursor
from sendarix.stores.sqlite.database import SQLiteDatabase

# Every searchable column has its own index.  In SQLite an index entry ends with the
# rowid (here ``seq``), so "WHERE col = ? ORDER BY seq DESC" walks the index
# backwards without sorting; (col, seq) indexes would store seq twice.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS event_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    ts         REAL NOT NULL,
    queue_id   TEXT,
    message_id TEXT,   -- without angle brackets
    tenant     TEXT,
    sender     TEXT,   -- lower-cased
    recipient  TEXT,   -- lower-cased
    body       TEXT NOT NULL   -- Event.to_json()
);
CREATE INDEX IF NOT EXISTS event_log_ts ON event_log (ts);
CREATE INDEX IF NOT EXISTS event_log_type ON event_log (type);
CREATE INDEX IF NOT EXISTS event_log_queue_id ON event_log (queue_id);
CREATE INDEX IF NOT EXISTS event_log_message_id ON event_log (message_id);
CREATE INDEX IF NOT EXISTS event_log_tenant ON event_log (tenant);
CREATE INDEX IF NOT EXISTS event_log_sender ON event_log (sender);
CREATE TABLE IF NOT EXISTS event_recipient (
    recipient TEXT NOT NULL,   -- lower-cased
    seq       INTEGER NOT NULL,
    PRIMARY KEY (recipient, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_recipient_seq ON event_recipient (seq);
CREATE TABLE IF NOT EXISTS event_tag (
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_tag_seq ON event_tag (seq);
"""


def _address(value: str) -> str:
    return value.strip().lower()


def _message_id(value: str) -> str:
    return value.strip().removeprefix("<").removesuffix(">")


#: An event waiting to be written: its event_log row, recipients, tags, and the
#: Deferred its emitter holds.
_Pending = tuple[tuple[Any, ...], list[str], list[str], "Deferred[None]"]


def event_row(event: Event) -> tuple[tuple[Any, ...], list[str], list[str]]:
    """What :func:`insert_event` writes for ``event``: its ``event_log`` row (the JSON
    body last), its recipients and its tags."""
    row = (
        event.id,
        event.type,
        event.timestamp,
        event.queue_id,
        _message_id(event.message_id) if event.message_id is not None else None,
        event.tenant,
        _address(event.sender) if event.sender is not None else None,
        _address(event.recipient) if event.recipient is not None else None,
        event.stored_json(),
    )
    recipients = sorted({_address(r) for r in event.all_recipients()})
    return row, recipients, sorted(set(event.tags))


def insert_event(conn: sqlite3.Connection, row: tuple[Any, ...], recipients: list[str],
                 tags: list[str]) -> int | None:
    """(database thread) Store one event row; its ``seq``, or None when an event with
    its id is already stored."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO event_log"
        " (id, type, ts, queue_id, message_id, tenant, sender, recipient, body)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        row,
    )
    if cur.rowcount == 0:
        return None  # already stored
    seq = cur.lastrowid
    if recipients:
        conn.executemany(
            "INSERT INTO event_recipient (recipient, seq) VALUES (?, ?)",
            [(r, seq) for r in recipients],
        )
    if tags:
        conn.executemany("INSERT INTO event_tag (tag, seq) VALUES (?, ?)", [(t, seq) for t in tags])
    return seq


def _insert_all(
    conn: sqlite3.Connection, batch: list[_Pending]
) -> list[tuple[Deferred[None], Failure | None]]:
    """(database thread) Insert a batch of events in one savepoint; when that fails,
    one by one, so a bad event cannot take the others down with it."""
    conn.execute("SAVEPOINT events")
    try:
        for row, recipients, tags, _ in batch:
            insert_event(conn, row, recipients, tags)
    except Exception:
        conn.execute("ROLLBACK TO events")
        conn.execute("RELEASE events")
    else:
        conn.execute("RELEASE events")
        return [(d, None) for *_, d in batch]
    outcomes: list[tuple[Deferred[None], Failure | None]] = []
    for row, recipients, tags, d in batch:
        conn.execute("SAVEPOINT event")
        try:
            insert_event(conn, row, recipients, tags)
        except Exception as e:
            conn.execute("ROLLBACK TO event")
            outcomes.append((d, Failure(e)))
        else:
            outcomes.append((d, None))
        conn.execute("RELEASE event")
    return outcomes


def _fire(outcomes: list[tuple[Deferred[None], Failure | None]]) -> None:
    for d, failure in outcomes:
        if failure is None:
            d.callback(None)
        else:
            d.errback(failure)


@implementer(IEventLog)
class SQLiteEventLog:
    """The delivery log in the ``event_*`` tables of a shared :obj:`SQLiteDatabase`.

    Construct it before ``db.open()`` (it registers its schema).  ``emit`` is
    idempotent: an event whose ``id`` is already stored is ignored, so at-least-once
    producers do not duplicate entries.
    """

    #: Rows deleted per transaction by ``trim``, so other writers are not held up.
    trim_batch = 5000

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        db.add_schema(_SCHEMA)
        self._lock = threading.Lock()  # _pending is taken on the database thread
        self._pending: list[_Pending] = []
        self._queued = False

    def emit(self, event: Event) -> Deferred[None]:
        """Store one event; the Deferred fires once it is committed.

        Events emitted while an earlier write of ours waits in the database's queue
        join it: one job (one statement set, one savepoint) carries them all, so the
        log costs the hot path little more than building its row.
        """
        row, recipients, tags = event_row(event)
        d: Deferred[None] = Deferred()
        with self._lock:
            self._pending.append((row, recipients, tags, d))
            if self._queued:
                return d
            self._queued = True
        taken: list[_Pending] = []

        def write(conn: sqlite3.Connection) -> list[tuple[Deferred[None], Failure | None]]:
            # Taken once: run a second time (its batch started over), the job writes
            # the same events again, and leaves later ones to the job queued for them.
            if not taken:
                taken.extend(self._take_pending())
            return _insert_all(conn, taken)

        def failed(failure: Failure) -> None:
            # The job failed as a whole (commit error, database closed).  A job that
            # never ran leaves its events waiting: they fail with it too.
            for *_, waiting in taken or self._take_pending():
                waiting.errback(failure)

        self._db.run(write, background=True, durable=False).addCallbacks(_fire, failed)
        return d

    def _take_pending(self) -> list[_Pending]:
        with self._lock:
            taken, self._pending = self._pending, []
            self._queued = False
        return taken

    def search(self, query: EventQuery) -> Deferred[EventPage]:
        """A Deferred :obj:`EventPage`: matching events newest first, at most
        ``min(query.limit, MAX_LIMIT)`` of them.  Fails with ValueError for a bad
        cursor."""
        try:
            sql, params = _build_search(query)
        except ValueError as e:
            d: Deferred[EventPage] = Deferred()
            d.errback(e)
            return d
        limit = min(query.limit, MAX_LIMIT)

        def select(conn: sqlite3.Connection) -> EventPage:
            # One row more than asked shows whether another page exists.
            rows = conn.execute(sql, (*params, limit + 1)).fetchall()
            events = tuple(Event.from_json(json.loads(body)) for _, body in rows[:limit])
            more = len(rows) > limit
            return EventPage(events, encode_cursor(rows[limit - 1][0]) if more else None)

        # In the background queue too: a search sees every event emitted before it.
        return self._db.run(select, background=True)

    def trim(self, before: float) -> Deferred[int]:
        """Delete events with a timestamp before ``before``; Deferred count deleted."""
        return Deferred.fromCoroutine(self._trim(before))

    async def _trim(self, before: float) -> int:
        batch = self.trim_batch

        def delete_some(conn: sqlite3.Connection) -> int:
            seqs = [
                (seq,)
                for (seq,) in conn.execute(
                    "SELECT seq FROM event_log WHERE ts < ? LIMIT ?", (before, batch)
                )
            ]
            conn.executemany("DELETE FROM event_recipient WHERE seq = ?", seqs)
            conn.executemany("DELETE FROM event_tag WHERE seq = ?", seqs)
            conn.executemany("DELETE FROM event_log WHERE seq = ?", seqs)
            return len(seqs)

        total = 0
        while True:
            deleted = await self._db.run(delete_some, background=True)
            total += deleted
            if deleted < batch:
                return total


def _build_search(q: EventQuery) -> tuple[str, list[Any]]:
    """SQL selecting (seq, body) for ``q``, newest first, with a trailing LIMIT ?."""
    where: list[str] = []
    params: list[Any] = []
    # Drive the query from the most selective table: a recipient's or a tag's entries
    # come in seq order from their primary key.
    if q.recipient is not None:
        source = "event_recipient AS r JOIN event_log AS e ON e.seq = r.seq"
        seq = "r.seq"
        where.append("r.recipient = ?")
        params.append(_address(q.recipient))
        if q.tag is not None:
            where.append("EXISTS (SELECT 1 FROM event_tag AS t WHERE t.tag = ? AND t.seq = e.seq)")
            params.append(q.tag)
    elif q.tag is not None:
        source = "event_tag AS t JOIN event_log AS e ON e.seq = t.seq"
        seq = "t.seq"
        where.append("t.tag = ?")
        params.append(q.tag)
    else:
        source = "event_log AS e"
        seq = "e.seq"
    for column, value in (
        ("e.sender", _address(q.sender) if q.sender is not None else None),
        ("e.queue_id", q.queue_id),
        ("e.message_id", _message_id(q.message_id) if q.message_id is not None else None),
        ("e.type", q.type),
        ("e.tenant", q.tenant),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if q.since is not None:
        where.append("e.ts >= ?")
        params.append(q.since)
    if q.until is not None:
        where.append("e.ts < ?")
        params.append(q.until)
    if q.cursor is not None:
        where.append(f"{seq} < ?")
        params.append(decode_cursor(q.cursor))
    condition = " AND ".join(where) if where else "1"
    sql = f"SELECT {seq}, e.body FROM {source} WHERE {condition} ORDER BY {seq} DESC LIMIT ?"
    return sql, params
