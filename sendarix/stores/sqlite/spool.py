"""The embedded spool: ISpool on one SQLite file.

Durability comes from :class:`sendarix.stores.sqlite.database.SQLiteDatabase` (WAL,
``synchronous=FULL``, group commit): every method is one job on the database's own
thread, so each is one transaction and nothing here touches the reactor thread.
Storing a message is durable before its 250.  Leasing, renewing, releasing and
recording an outcome are not durable jobs: they need no fsync of their own, since a
crash of the machine that loses them only makes a message due, or delivered, again.

Tables (all prefixed ``spool_``; other stores may share the file):

- ``spool_message``: envelope and metadata (versioned JSON), size, creation time,
  and the lease of a held message (below);
- ``spool_body``: the message bytes, once per message however many recipients;
- ``spool_recipient``: one row per recipient with its own state;
- ``spool_delivery``: one row per (message, destination domain) with the time it
  is next due and the lease on it.

While a delivery is leased its ``due`` is the lease's expiry, so the due-time index
skips deliveries in flight and finds an abandoned lease as soon as it runs out.

Fresh mail handed straight to the accepting node's delivery agent is *held*: its
commit writes the message and body rows only, with the lease in the message row
(``held_node``, ``held_until``), and the recipient and delivery rows are left
unwritten.  They hold nothing the envelope and that lease do not say, and most such
messages are delivered within milliseconds, when they would go again.  For one
recipient, writing them cost 6 of the 13 pages of the commit at the 250, and
removing them 6 of the completion's 15.  Whenever anything needs those rows (a
deferral, a second destination, an operator's filtered listing or retry, a release,
a lease that ran out because its node died), they are written then, exactly as the
commit would have written them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sendarix.interfaces import ILeasedEnqueue, ISelectiveLease, ISpool
from sendarix.model.message import (
    Envelope,
    Lease,
    LeasedDelivery,
    NewMessage,
    QueueStats,
    RecipientOutcome,
    RecipientRecord,
    RecipientStatus,
    StoredMessage,
)
from sendarix.stores import codec
from sendarix.stores.errors import DuplicateQueueId, LeaseLost, SpoolError
from sendarix.stores.sqlite.database import SQLiteDatabase

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS spool_info (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # The message table lives in its primary key's B-tree (WITHOUT ROWID): a rowid
    # table keeps that key in a second B-tree, one more page to write in every
    # commit that adds or removes a message.  The others keep their rowid.
    # spool_body: without one, a 50 MiB body was read back at half the speed
    # (SQLite recommends WITHOUT ROWID for small rows only).  spool_delivery: the
    # lease poll walks its due index past the due mail of destinations that are
    # resting, and without a rowid that walk cost four times as much (76 against
    # 16 ms for 100,000 deliveries).  spool_recipient: its rowid is the order the
    # recipients were given in.  A spool made by an earlier release keeps its
    # tables as they are (all with a rowid, or the delivery table without one);
    # every statement here works on each.
    """CREATE TABLE IF NOT EXISTS spool_message (
        queue_id TEXT PRIMARY KEY,
        envelope TEXT NOT NULL,
        meta TEXT NOT NULL,
        size INTEGER NOT NULL,
        created REAL NOT NULL,
        held_node TEXT,
        held_until REAL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS spool_body (
        queue_id TEXT PRIMARY KEY REFERENCES spool_message (queue_id),
        body BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS spool_delivery (
        queue_id TEXT NOT NULL REFERENCES spool_message (queue_id),
        domain TEXT NOT NULL,
        due REAL NOT NULL,
        lease_node TEXT,
        lease_expires REAL,
        PRIMARY KEY (queue_id, domain))""",
    """CREATE INDEX IF NOT EXISTS spool_delivery_due
        ON spool_delivery (due, queue_id, domain)""",
    """CREATE INDEX IF NOT EXISTS spool_delivery_lease
        ON spool_delivery (lease_node) WHERE lease_node IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS spool_recipient (
        queue_id TEXT NOT NULL REFERENCES spool_message (queue_id),
        address TEXT NOT NULL,
        domain TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL,
        last_reply TEXT,
        updated_at REAL,
        PRIMARY KEY (queue_id, address))""",
    """CREATE INDEX IF NOT EXISTS spool_recipient_domain
        ON spool_recipient (domain, status)""",
)

#: The held messages (see the module's docstring), by when their lease runs out.  Made
#: after :data:`SCHEMA`, once a spool of an earlier layout has its held columns.
HELD_INDEX = (
    "CREATE INDEX IF NOT EXISTS spool_message_held"
    " ON spool_message (held_until) WHERE held_node IS NOT NULL"
)

#: The spool's layout, in ``spool_info``'s ``format``.  1: every message has its
#: recipient and delivery rows.  2: messages may be held.  A release that knows only
#: 1 refuses a file of layout 2 rather than leave its held messages undelivered.
LAYOUT = 2

_ACTIVE = tuple(s.value for s in codec.ACTIVE_STATUSES)
_ACTIVE_SQL = "status IN ({})".format(", ".join(f"'{s}'" for s in _ACTIVE))
# Queries on one message's recipients write ``+domain``: without it SQLite prefers the
# (domain, status) index and walks every recipient of the domain (quadratic under load).

_RECIPIENT_COLUMNS = "address, domain, status, attempts, next_attempt, last_reply, updated_at"


def _record(row: Sequence[Any]) -> RecipientRecord:
    address, domain, status, attempts, next_attempt, last_reply, updated_at = row
    return RecipientRecord(
        address=address,
        domain=domain,
        status=RecipientStatus(status),
        attempts=attempts,
        next_attempt=next_attempt,
        last_reply=codec.decode_reply(last_reply),
        updated_at=updated_at,
    )


def _status_value(status: RecipientStatus | str) -> str:
    # RecipientStatus(...) refuses unknown values before any SQL runs.
    return RecipientStatus(status).value


#: Most domains one lease poll leaves out (SQLite's bound parameters are limited).
_MAX_SKIP = 500

# The lease poll's walk: due deliveries not leased (or whose lease ran out), oldest due
# first, on the due index.  Its parameters start with ``now`` twice.
_DUE = "due <= ? AND (lease_node IS NULL OR lease_expires <= ?)"
_WALK_ORDER = " ORDER BY due, queue_id, domain"


def due_query(skipped: int) -> str:
    """The statement that leaves domains out: among the first deliveries of the walk
    (as many as its third parameter), those to none of ``skipped`` domains (the next
    parameters), at most the last parameter of them."""
    # Domains are stored lower-cased (the spool splits them so), so the column itself
    # is compared.  The inner LIMIT bounds the walk, whatever lies beyond it.
    not_in = ", ".join("?" * skipped)
    return (
        f"SELECT queue_id, domain FROM (SELECT queue_id, domain FROM spool_delivery"
        f" WHERE {_DUE}{_WALK_ORDER} LIMIT ?) WHERE domain NOT IN ({not_in}) LIMIT ?"
    )


#: The delivery at a place in the walk (the parameter after ``now`` twice: OFFSET).
WALK_AT = (
    f"SELECT due, queue_id, domain FROM spool_delivery WHERE {_DUE}{_WALK_ORDER}"
    " LIMIT 1 OFFSET ?"
)
#: The walk from its start, and from past a ``(due, queue_id, domain)`` place in it.
WALK = f"SELECT queue_id, domain FROM spool_delivery WHERE {_DUE}{_WALK_ORDER} LIMIT ?"
WALK_AFTER = (
    f"SELECT queue_id, domain FROM spool_delivery WHERE {_DUE}"
    f" AND (due, queue_id, domain) > (?, ?, ?){_WALK_ORDER} LIMIT ?"
)


def _write_rows(
    conn: sqlite3.Connection,
    qid: str,
    domains: dict[str, str],
    not_before: float | None,
    received: float,
    lease: Lease | None,
    due: float,
) -> None:
    """A message's recipient rows (``domains``: address to domain, in envelope
    order) and one delivery row per domain, due at ``due`` or leased."""
    conn.executemany(
        "INSERT INTO spool_recipient (queue_id, address, domain, status, attempts,"
        " next_attempt, updated_at) VALUES (?, ?, ?, 'pending', 0, ?, ?)",
        [(qid, a, d, not_before, received) for a, d in domains.items()],
    )
    deliveries: list[tuple[str, str, float, str | None, float | None]]
    if lease is None:
        deliveries = [(qid, d, due, None, None) for d in dict.fromkeys(domains.values())]
    else:
        # A leased delivery is due again when its lease ends (as _lease_one).
        deliveries = [
            (qid, d, lease.expires, lease.node, lease.expires)
            for d in dict.fromkeys(domains.values())
        ]
    conn.executemany(
        "INSERT INTO spool_delivery (queue_id, domain, due, lease_node, lease_expires)"
        " VALUES (?, ?, ?, ?, ?)",
        deliveries,
    )


def _held_recipients(envelope: Envelope, created: float) -> tuple[RecipientRecord, ...]:
    """A held message's recipients, as its unwritten rows would read."""
    return tuple(
        RecipientRecord(
            address=a, domain=codec.recipient_domain(a), status=RecipientStatus.PENDING,
            attempts=0, next_attempt=None, updated_at=created,
        )
        for a in codec.unique_recipients(envelope.recipients)
    )


class _Held(NamedTuple):
    """A held message's row: its lease, and what its unwritten rows come from."""

    node: str
    until: float
    envelope: str
    created: float

    def recipients(self) -> tuple[RecipientRecord, ...]:
        return _held_recipients(codec.decode_envelope(self.envelope), self.created)


#: The columns :class:`_Held` is read from.
_HELD_COLUMNS = "held_node, held_until, envelope, created"


@implementer(ISpool, ISelectiveLease, ILeasedEnqueue)
class SQLiteSpool:
    """ISpool on a :class:`SQLiteDatabase`.

    ``owns_db``: close the database on ``stop()``.  Leave it False when the database
    object is shared with other stores; its owner closes it.

    ``hold_fresh``: hold fresh mail leased at its commit (see the module's
    docstring); False writes every row at once, as layout 1 did.  What the spool
    answers is the same either way (the tests compare the two).
    """

    def __init__(
        self, db: SQLiteDatabase, *, owns_db: bool = False, hold_fresh: bool = True
    ) -> None:
        self._db = db
        self._owns_db = owns_db
        self._hold_fresh = hold_fresh

    @property
    def database(self) -> SQLiteDatabase:
        """The database the spool's rows are in (shared with other stores, or not)."""
        return self._db

    @classmethod
    def at_path(cls, path: str, reactor: Any, *, hold_fresh: bool = True) -> SQLiteSpool:
        """A spool with its own database on ``path`` (closed by ``stop()``)."""
        return cls(SQLiteDatabase(path, reactor), owns_db=True, hold_fresh=hold_fresh)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Open the database and create the spool's tables if they are missing."""
        # The tables are created through run() rather than add_schema(), so that
        # a database another store has already opened gets them too.
        d = self._db.open()
        d.addCallback(lambda _: self._db.run(self._create_schema, savepoint=True))
        return d

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        row = None
        if conn.execute(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'spool_info'"
        ).fetchone():
            row = conn.execute("SELECT value FROM spool_info WHERE key = 'format'").fetchone()
            if row is not None and int(row[0]) > LAYOUT:
                raise SpoolError(f"spool format {row[0]} is newer than this Sendarix knows")
        for statement in SCHEMA:
            conn.execute(statement)
        columns = {c[1] for c in conn.execute("PRAGMA table_info(spool_message)")}
        # A spool of layout 1 gets the held columns; adding a column that may be NULL
        # rewrites no row.
        for column, kind in (("held_node", "TEXT"), ("held_until", "REAL")):
            if column not in columns:
                conn.execute(f"ALTER TABLE spool_message ADD COLUMN {column} {kind}")
        conn.execute(HELD_INDEX)
        conn.execute(
            "INSERT INTO spool_info (key, value) VALUES ('format', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(LAYOUT),),
        )

    def stop(self) -> Deferred[None]:
        """Close the database if this spool owns it (queued jobs finish first)."""
        if self._owns_db:
            return self._db.close()
        return succeed(None)

    # -- accepting mail -----------------------------------------------------------

    def enqueue(self, message: NewMessage) -> Deferred[None]:
        """Store message, body, recipients and one delivery per domain in one commit."""
        done: Deferred[None] = self._enqueue(message, None).addCallback(lambda _: None)
        return done

    def enqueue_leased(
        self, message: NewMessage, node: str, expires: float
    ) -> Deferred[list[LeasedDelivery]]:
        """As :meth:`enqueue`, each delivery leased to ``node`` until ``expires`` in the
        same commit; fires with the deliveries (built from ``message``, not read back)."""
        return self._enqueue(message, Lease(node=node, expires=expires))

    def _enqueue(
        self, message: NewMessage, lease: Lease | None
    ) -> Deferred[list[LeasedDelivery]]:
        recipients = codec.unique_recipients(message.envelope.recipients)
        if not recipients:
            return fail(ValueError("a message needs at least one recipient"))
        qid = message.queue_id
        received = message.meta.received_at
        domains = {a: codec.recipient_domain(a) for a in recipients}
        by_domain: dict[str, list[str]] = {}
        for address, domain in domains.items():
            by_domain.setdefault(domain, []).append(address)
        # Fresh mail leased to its node is held: its rows wait until something needs
        # them (see the module's docstring).  Mail with a start time keeps it in its
        # recipients' rows, which the held form does not carry.
        hold = lease if message.not_before is None and self._hold_fresh else None

        def txn(conn: sqlite3.Connection) -> list[LeasedDelivery]:
            try:
                conn.execute(
                    "INSERT INTO spool_message (queue_id, envelope, meta, size, created,"
                    " held_node, held_until) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        qid,
                        codec.encode_envelope(message.envelope),
                        codec.encode_meta(message.meta),
                        len(message.body),
                        received,
                        hold.node if hold else None,
                        hold.expires if hold else None,
                    ),
                )
            except sqlite3.IntegrityError:
                raise DuplicateQueueId(qid) from None
            conn.execute(
                "INSERT INTO spool_body (queue_id, body) VALUES (?, ?)", (qid, message.body)
            )
            if hold is None:
                _write_rows(conn, qid, domains, message.not_before, received, lease,
                            message.due)
            return []

        d = self._db.run(txn)
        if lease is not None:
            d.addCallback(lambda _: [
                LeasedDelivery(
                    queue_id=qid,
                    domain=domain,
                    envelope=message.envelope,
                    meta=message.meta,
                    recipients=tuple(
                        RecipientRecord(
                            address=a, domain=domain, status=RecipientStatus.PENDING,
                            attempts=0, next_attempt=message.not_before, updated_at=received,
                        )
                        for a in addresses
                    ),
                    lease=lease,
                )
                for domain, addresses in by_domain.items()
            ])
        return d

    # -- leases -------------------------------------------------------------------

    def lease_due(
        self, node: str, now: float, limit: int, lease_for: float
    ) -> Deferred[list[LeasedDelivery]]:
        """Lease up to ``limit`` due deliveries, oldest due first."""
        return self.lease_due_except(node, now, limit, lease_for, ())

    def lease_due_except(
        self, node: str, now: float, limit: int, lease_for: float,
        skip_domains: Sequence[str],
    ) -> Deferred[list[LeasedDelivery]]:
        """Lease up to ``limit`` due deliveries, oldest due first, looking past those
        to ``skip_domains`` (at most :func:`codec.look_past_limit` of them in one
        call; past that, the next ones are leased whatever their domain)."""
        skip = tuple(sorted({d.lower() for d in skip_domains}))
        if len(skip) > _MAX_SKIP:
            skip = skip[:_MAX_SKIP]
        if lease_for <= 0:
            return fail(ValueError("lease_for must be positive"))
        if limit <= 0:
            return succeed([])
        expires = now + lease_for
        window = codec.look_past_limit(limit)
        select_window = due_query(len(skip)) if skip else ""

        def txn(conn: sqlite3.Connection) -> list[LeasedDelivery]:
            # Held messages whose node let the lease run out (it died, or stopped
            # without finishing them) get their rows, due since the lease ended.
            self._unhold_where(conn, " AND held_until <= ?", (now,))
            leased: list[LeasedDelivery] = []

            def take(rows: list[tuple[str, str]]) -> None:
                # A row that yields no delivery is rescheduled past ``now`` or
                # removed, and a leased one is due at its expiry: none of them is in
                # the walk any more, so every loop below ends.
                for qid, domain in rows:
                    delivery = self._lease_one(conn, qid, domain, node, now, expires)
                    if delivery is not None:
                        leased.append(delivery)

            after: tuple[Any, ...] = ()
            if skip:
                # Deliveries to other domains among the first ``window`` of the walk.
                while len(leased) < limit:
                    rows = conn.execute(
                        select_window, (now, now, window, *skip, limit - len(leased))
                    ).fetchall()
                    if not rows:
                        break
                    take(rows)
                if len(leased) >= limit:
                    return leased
                # The window holds left-out deliveries only: go on past it, leasing
                # whatever comes (the delivery agent parks what a full site cannot
                # take, which moves it out of the way of later polls).
                last = conn.execute(WALK_AT, (now, now, window - 1)).fetchone()
                if last is None:
                    return leased  # nothing else is due
                after = tuple(last)
            select = WALK_AFTER if after else WALK
            while len(leased) < limit:
                rows = conn.execute(select, (now, now, *after, limit - len(leased))).fetchall()
                if not rows:
                    break
                take(rows)
            return leased

        return self._db.run(txn, durable=False)

    def _lease_one(
        self,
        conn: sqlite3.Connection,
        qid: str,
        domain: str,
        node: str,
        now: float,
        expires: float,
    ) -> LeasedDelivery | None:
        message = conn.execute(
            "SELECT envelope, meta FROM spool_message WHERE queue_id = ?", (qid,)
        ).fetchone()
        if message is None:
            # Rows left without their message: nothing to deliver.
            self._remove_message(conn, qid)
            return None
        records = [
            _record(row)
            for row in conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM spool_recipient"
                f" WHERE queue_id = ? AND +domain = ? AND {_ACTIVE_SQL} ORDER BY rowid",
                (qid, domain),
            )
        ]
        ready = tuple(r for r in records if r.next_attempt is None or r.next_attempt <= now)
        if not ready:
            if not self._reschedule(conn, qid, domain):
                self._remove_if_finished(conn, qid)
            return None
        conn.execute(
            "UPDATE spool_delivery SET lease_node = ?, lease_expires = ?, due = ?"
            " WHERE queue_id = ? AND domain = ?",
            (node, expires, expires, qid, domain),
        )
        return LeasedDelivery(
            queue_id=qid,
            domain=domain,
            envelope=codec.decode_envelope(message[0]),
            meta=codec.decode_meta(message[1]),
            recipients=ready,
            lease=Lease(node=node, expires=expires),
        )

    def renew(self, queue_id: str, domain: str, node: str, expires: float) -> Deferred[bool]:
        """Move ``node``'s lease expiry to ``expires``; False when it is not ours."""

        def txn(conn: sqlite3.Connection) -> bool:
            held = self._held(conn, queue_id)
            if held is not None:
                if held.node != node or domain not in {r.domain for r in held.recipients()}:
                    return False
                # One lease covers all of a held message's domains.
                conn.execute(
                    "UPDATE spool_message SET held_until = ? WHERE queue_id = ?",
                    (expires, queue_id),
                )
                return True
            cursor = conn.execute(
                "UPDATE spool_delivery SET lease_expires = ?, due = ?"
                " WHERE queue_id = ? AND domain = ? AND lease_node = ?",
                (expires, expires, queue_id, domain, node),
            )
            return cursor.rowcount == 1

        return self._db.run(txn, durable=False)

    def release(self, queue_id: str, domain: str, node: str) -> Deferred[bool]:
        """Drop ``node``'s lease; the delivery is due again as it was before the lease."""

        def txn(conn: sqlite3.Connection) -> bool:
            self._unhold_if(conn, queue_id, node)
            if not self._holds(conn, queue_id, domain, node):
                return False
            if not self._reschedule(conn, queue_id, domain):
                self._remove_if_finished(conn, queue_id)
            return True

        return self._db.run(txn, durable=False)

    def reclaim(self, node: str) -> Deferred[int]:
        """Release every lease ``node`` holds; the number released."""

        def txn(conn: sqlite3.Connection) -> int:
            self._unhold_where(conn, " AND held_node = ?", (node,))
            rows = conn.execute(
                "SELECT queue_id, domain FROM spool_delivery WHERE lease_node = ?", (node,)
            ).fetchall()
            for qid, domain in rows:
                if not self._reschedule(conn, qid, domain):
                    self._remove_if_finished(conn, qid)
            return len(rows)

        return self._db.run(txn)

    def complete(
        self,
        queue_id: str,
        domain: str,
        node: str,
        outcomes: Sequence[RecipientOutcome],
        now: float,
    ) -> Deferred[None]:
        """Record outcomes, release the lease; fails with LeaseLost if it is not ours.

        Outcomes for recipients that are not active at this domain (unknown, or
        already final) are ignored: a final state is never overwritten.
        """
        outcomes = tuple(outcomes)
        try:
            codec.check_outcomes(outcomes)
        except ValueError:
            return fail()

        def txn(conn: sqlite3.Connection) -> None:
            held = self._held(conn, queue_id)
            active: dict[str, RecipientRecord]
            if held is not None:
                # Every recipient of a held message is active, as its rows would say;
                # its lease covers the domains they are at, and no other.
                active = {r.address: r for r in held.recipients()}
                if held.node != node or domain not in {r.domain for r in active.values()}:
                    raise LeaseLost(queue_id, domain, node)
            else:
                if not self._holds(conn, queue_id, domain, node):
                    raise LeaseLost(queue_id, domain, node)
                # Every active recipient of the message, at any domain, in one read.
                active = {
                    r.address: r
                    for r in map(_record, conn.execute(
                        f"SELECT {_RECIPIENT_COLUMNS} FROM spool_recipient"
                        f" WHERE queue_id = ? AND {_ACTIVE_SQL}",
                        (queue_id,),
                    ))
                }
            settled: dict[str, RecipientRecord] = {}
            for outcome in outcomes:
                current = settled.get(outcome.address) or active.get(outcome.address)
                if current is None or current.domain != domain:
                    continue
                if current.status in codec.ACTIVE_STATUSES:  # a final state stays
                    settled[outcome.address] = codec.apply_outcome(current, outcome, now)
            if len(settled) == len(active) and all(
                new.status not in codec.ACTIVE_STATUSES for new in settled.values()
            ):
                # The usual end: this delivery settled every recipient the message had
                # left, so it goes at once (the delivery log keeps its history) rather
                # than being updated, rescheduled and looked at again.  A held
                # message's rows were never written.
                self._remove_message(conn, queue_id, held=held is not None)
                return
            if held is not None:
                # Something is left to do: the rows it needs, then the outcomes.
                self._unhold(conn, queue_id, held)
            for address, new in settled.items():
                conn.execute(
                    "UPDATE spool_recipient SET status = ?, attempts = ?, next_attempt = ?,"
                    " last_reply = ?, updated_at = ? WHERE queue_id = ? AND address = ?",
                    (
                        new.status.value,
                        new.attempts,
                        new.next_attempt,
                        codec.encode_reply(new.last_reply),
                        new.updated_at,
                        queue_id,
                        address,
                    ),
                )
            if not self._reschedule(conn, queue_id, domain):
                self._remove_if_finished(conn, queue_id)

        return self._db.run(txn, durable=False)

    # -- held messages (database thread) ---------------------------------------------

    @staticmethod
    def _held(conn: sqlite3.Connection, qid: str) -> _Held | None:
        """The held message ``qid``; None if it is not held (or not spooled)."""
        row = conn.execute(
            f"SELECT {_HELD_COLUMNS} FROM spool_message"
            " WHERE queue_id = ? AND held_node IS NOT NULL",
            (qid,),
        ).fetchone()
        return None if row is None else _Held(*row)

    @staticmethod
    def _unhold(conn: sqlite3.Connection, qid: str, held: _Held) -> None:
        """Write a held message's rows as its commit would have, leased as it is held."""
        _write_rows(
            conn, qid, {r.address: r.domain for r in held.recipients()}, None, held.created,
            Lease(node=held.node, expires=held.until), held.until,
        )
        conn.execute(
            "UPDATE spool_message SET held_node = NULL, held_until = NULL WHERE queue_id = ?",
            (qid,),
        )

    def _unhold_if(self, conn: sqlite3.Connection, qid: str, node: str | None = None) -> None:
        """Write the rows of ``qid`` if it is held (by ``node``, if given)."""
        held = self._held(conn, qid)
        if held is not None and (node is None or held.node == node):
            self._unhold(conn, qid, held)

    def _unhold_where(self, conn: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> None:
        """Write the rows of every held message that ``where`` (appended to the held
        messages' condition) selects."""
        rows = conn.execute(
            f"SELECT queue_id, {_HELD_COLUMNS} FROM spool_message"
            f" WHERE held_node IS NOT NULL{where}",
            params,
        ).fetchall()
        for qid, *held in rows:
            self._unhold(conn, qid, _Held(*held))

    # -- helpers (database thread) -------------------------------------------------

    @staticmethod
    def _holds(conn: sqlite3.Connection, qid: str, domain: str, node: str) -> bool:
        row = conn.execute(
            "SELECT lease_node FROM spool_delivery WHERE queue_id = ? AND domain = ?",
            (qid, domain),
        ).fetchone()
        return row is not None and row[0] == node

    @staticmethod
    def _reschedule(conn: sqlite3.Connection, qid: str, domain: str) -> bool:
        """Clear the lease and make the delivery due when its earliest active recipient
        is (a pending one at once); remove it and return False when none is active."""
        earliest, active = conn.execute(
            "SELECT MIN(COALESCE(r.next_attempt, m.created)), COUNT(*)"
            " FROM spool_recipient AS r JOIN spool_message AS m USING (queue_id)"
            f" WHERE r.queue_id = ? AND +r.domain = ? AND r.{_ACTIVE_SQL}",
            (qid, domain),
        ).fetchone()
        if not active:
            conn.execute(
                "DELETE FROM spool_delivery WHERE queue_id = ? AND domain = ?", (qid, domain)
            )
            return False
        conn.execute(
            "INSERT INTO spool_delivery (queue_id, domain, due) VALUES (?, ?, ?)"
            " ON CONFLICT (queue_id, domain) DO UPDATE"
            " SET due = excluded.due, lease_node = NULL, lease_expires = NULL",
            (qid, domain, earliest),
        )
        return True

    def _remove_if_finished(self, conn: sqlite3.Connection, qid: str) -> bool:
        """Remove a message whose recipients are all final (the delivery log keeps
        its history)."""
        row = conn.execute(
            f"SELECT 1 FROM spool_recipient WHERE queue_id = ? AND {_ACTIVE_SQL} LIMIT 1",
            (qid,),
        ).fetchone()
        if row is not None:
            return False
        self._remove_message(conn, qid)
        return True

    @staticmethod
    def _remove_message(conn: sqlite3.Connection, qid: str, held: bool = False) -> bool:
        """Remove ``qid``'s rows; a ``held`` message has no recipient or delivery
        rows (they are written together with the end of its hold)."""
        # Children first: the foreign keys point at spool_message.
        if not held:
            conn.execute("DELETE FROM spool_delivery WHERE queue_id = ?", (qid,))
            conn.execute("DELETE FROM spool_recipient WHERE queue_id = ?", (qid,))
        conn.execute("DELETE FROM spool_body WHERE queue_id = ?", (qid,))
        cursor = conn.execute("DELETE FROM spool_message WHERE queue_id = ?", (qid,))
        return cursor.rowcount == 1

    @staticmethod
    def _recipients(conn: sqlite3.Connection, qid: str) -> tuple[RecipientRecord, ...]:
        return tuple(
            _record(row)
            for row in conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM spool_recipient"
                " WHERE queue_id = ? ORDER BY rowid",
                (qid,),
            )
        )

    def _stored(self, conn: sqlite3.Connection, row: Sequence[Any]) -> StoredMessage:
        qid, envelope, meta, size, created, held_node = row
        decoded = codec.decode_envelope(envelope)
        return StoredMessage(
            queue_id=qid,
            envelope=decoded,
            meta=codec.decode_meta(meta),
            size=size,
            recipients=(
                self._recipients(conn, qid) if held_node is None
                else _held_recipients(decoded, created)
            ),
        )

    # -- inspection and operator actions ---------------------------------------------

    def get(self, queue_id: str) -> Deferred[StoredMessage | None]:
        """The stored message without its body, or None."""

        def txn(conn: sqlite3.Connection) -> StoredMessage | None:
            row = conn.execute(
                "SELECT queue_id, envelope, meta, size, created, held_node FROM spool_message"
                " WHERE queue_id = ?",
                (queue_id,),
            ).fetchone()
            return None if row is None else self._stored(conn, row)

        return self._db.run(txn)

    def body(self, queue_id: str) -> Deferred[bytes | None]:
        """The message bytes exactly as enqueued, or None."""

        def txn(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT body FROM spool_body WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self._db.run(txn)

    def list_messages(
        self,
        status: RecipientStatus | str | None = None,
        domain: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Deferred[list[StoredMessage]]:
        """Messages in queue-id order after ``after`` that have a recipient with
        ``status`` (and/or) at ``domain``."""
        conditions: list[str] = []
        params: list[Any] = []
        if after is not None:
            conditions.append("m.queue_id > ?")
            params.append(after)
        if status is not None or domain is not None:
            inner = ["r.queue_id = m.queue_id"]
            if status is not None:
                try:
                    params.append(_status_value(status))
                except ValueError:
                    return fail()
                inner.append("r.status = ?")
            if domain is not None:
                inner.append("r.domain = ?")
                params.append(domain.lower())
            conditions.append(
                "EXISTS (SELECT 1 FROM spool_recipient AS r WHERE {})".format(" AND ".join(inner))
            )
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        params.append(max(0, int(limit)))
        sql = (
            "SELECT m.queue_id, m.envelope, m.meta, m.size, m.created, m.held_node"
            f" FROM spool_message AS m{where} ORDER BY m.queue_id LIMIT ?"
        )

        def txn(conn: sqlite3.Connection) -> list[StoredMessage]:
            if status is not None or domain is not None:
                # The filters read recipient rows: held messages get theirs first.
                self._unhold_where(conn, "", ())
            return [self._stored(conn, row) for row in conn.execute(sql, params).fetchall()]

        return self._db.run(txn)

    def stats(self) -> Deferred[QueueStats]:
        """Messages spooled, recipients by status and by domain (non-zero counts only)."""

        def txn(conn: sqlite3.Connection) -> QueueStats:
            (messages,) = conn.execute("SELECT COUNT(*) FROM spool_message").fetchone()
            by_status: dict[str, int] = {}
            by_domain: dict[str, dict[str, int]] = {}
            for domain, status, count in conn.execute(
                "SELECT domain, status, COUNT(*) FROM spool_recipient GROUP BY domain, status"
            ):
                by_status[status] = by_status.get(status, 0) + count
                by_domain.setdefault(domain, {})[status] = count
            # Held messages' recipients are pending, as their rows would say.  Counted
            # from the envelope: the figures are read often and change nothing.
            pending = RecipientStatus.PENDING.value
            for envelope, created in conn.execute(
                "SELECT envelope, created FROM spool_message WHERE held_node IS NOT NULL"
            ):
                for r in _held_recipients(codec.decode_envelope(envelope), created):
                    by_status[pending] = by_status.get(pending, 0) + 1
                    counts = by_domain.setdefault(r.domain, {})
                    counts[pending] = counts.get(pending, 0) + 1
            return QueueStats(messages=messages, by_status=by_status, by_domain=by_domain)

        return self._db.run(txn)

    def retry(self, queue_id: str, now: float) -> Deferred[int]:
        """Make every active recipient due at ``now``; how many there were.

        A delivery in flight keeps its lease; its recipients are due once it completes.
        """

        def txn(conn: sqlite3.Connection) -> int:
            self._unhold_if(conn, queue_id)
            cursor = conn.execute(
                f"UPDATE spool_recipient SET next_attempt = ? WHERE queue_id = ? AND {_ACTIVE_SQL}",
                (now, queue_id),
            )
            count = cursor.rowcount
            domains = conn.execute(
                f"SELECT DISTINCT domain FROM spool_recipient WHERE queue_id = ? AND {_ACTIVE_SQL}",
                (queue_id,),
            ).fetchall()
            for (domain,) in domains:
                conn.execute(
                    "INSERT INTO spool_delivery (queue_id, domain, due) VALUES (?, ?, ?)"
                    " ON CONFLICT (queue_id, domain) DO UPDATE SET due = excluded.due"
                    " WHERE spool_delivery.lease_node IS NULL",
                    (queue_id, domain, now),
                )
            return count

        return self._db.run(txn)

    def delete(self, queue_id: str) -> Deferred[bool]:
        """Remove a message, its body and all its rows; True when it existed.

        A node delivering it at the time gets LeaseLost when it completes.
        """
        return self._db.run(lambda conn: self._remove_message(conn, queue_id))
