"""The webhook outbox in SQLite (``hook_*`` tables), in the node's shared database.

An event is queued in the same job (one savepoint of one transaction) as its
``event_log`` row, so after a crash either both are there or neither is: no event is
sent that is not logged, and none that is logged misses its webhooks.

- ``hook_pending``: events queued for an endpoint and not yet in a batch, in order;
- ``hook_batch``: formed batches (``ready``, ``leased`` or ``dead``) with their body,
  attempt count, due time, lease and last error;
- ``hook_endpoint``: endpoints their receiver disabled (HTTP 410).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IWebhookOutbox
from sendarix.model.event import Event, format_timestamp
from sendarix.model.webhook import (
    DeadBatch,
    DisabledEndpoint,
    WebhookBatch,
    batch_body,
    new_batch_id,
    with_sequence,
)
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.eventlog import event_row, insert_event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hook_pending (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint TEXT NOT NULL,
    created  REAL NOT NULL,
    item     TEXT NOT NULL   -- the event's JSON with its sequence
);
CREATE INDEX IF NOT EXISTS hook_pending_endpoint ON hook_pending (endpoint, seq);
CREATE TABLE IF NOT EXISTS hook_batch (
    id          TEXT PRIMARY KEY,
    endpoint    TEXT NOT NULL,
    body        TEXT NOT NULL,
    count       INTEGER NOT NULL,
    created     REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    due         REAL NOT NULL,
    state       TEXT NOT NULL,   -- ready | leased | dead
    node        TEXT,
    lease_until REAL,
    error       TEXT,
    failed_at   REAL
);
CREATE INDEX IF NOT EXISTS hook_batch_due ON hook_batch (endpoint, state, due);
CREATE INDEX IF NOT EXISTS hook_batch_dead ON hook_batch (state, failed_at);
CREATE TABLE IF NOT EXISTS hook_endpoint (
    endpoint    TEXT PRIMARY KEY,
    disabled_at REAL NOT NULL,
    reason      TEXT NOT NULL
);
"""


def _sequence(conn: sqlite3.Connection, queue_id: str | None) -> int | None:
    if queue_id is None:
        return None
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM event_log WHERE queue_id = ?", (queue_id,)
    ).fetchone()
    return int(count)


def _batch(row: tuple[Any, ...]) -> WebhookBatch:
    id_, endpoint, body, created, attempts, count = row
    return WebhookBatch(id_, endpoint, body, created, attempts, count)


@implementer(IWebhookOutbox)
class SQLiteWebhookOutbox:
    """IWebhookOutbox in the ``hook_*`` tables of a shared :obj:`SQLiteDatabase`
    (construct it before ``db.open()``, after the event log it writes with)."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        db.add_schema(_SCHEMA)

    def add(self, event: Event, endpoints: Sequence[str]) -> Deferred[None]:
        row, recipients, tags = event_row(event)
        wanted = list(dict.fromkeys(endpoints))

        def write(conn: sqlite3.Connection) -> None:
            if insert_event(conn, row, recipients, tags) is None or not wanted:
                return
            item = with_sequence(row[-1], _sequence(conn, event.queue_id))
            conn.executemany(
                "INSERT INTO hook_pending (endpoint, created, item) SELECT ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM hook_endpoint WHERE endpoint = ?)",
                [(e, event.timestamp, item, e) for e in wanted],
            )

        # Beside the delivery log's own writes: off the mail path, in the same order.
        return self._db.run(write, background=True, durable=False)

    def lease_due(
        self, node: str, now: float, limits: Mapping[str, int], lease_for: float,
        fill_time: float, max_events: int,
    ) -> Deferred[list[WebhookBatch]]:
        stamp = format_timestamp(now)

        def lease(conn: sqlite3.Connection) -> list[WebhookBatch]:
            # Leases that ran out make their batches due again.
            conn.execute(
                "UPDATE hook_batch SET state = 'ready', node = NULL, lease_until = NULL"
                " WHERE state = 'leased' AND lease_until <= ?", (now,),
            )
            disabled = {e for (e,) in conn.execute("SELECT endpoint FROM hook_endpoint")}
            out: list[WebhookBatch] = []
            for endpoint, limit in sorted(limits.items()):
                if limit < 1 or endpoint in disabled:
                    continue
                ids = [
                    i for (i,) in conn.execute(
                        "SELECT id FROM hook_batch WHERE endpoint = ? AND state = 'ready'"
                        " AND due <= ? ORDER BY due, created LIMIT ?", (endpoint, now, limit),
                    )
                ]
                while len(ids) < limit:
                    formed = _form(conn, endpoint, now, stamp, fill_time, max_events)
                    if formed is None:
                        break
                    ids.append(formed)
                for id_ in ids:
                    conn.execute(
                        "UPDATE hook_batch SET state = 'leased', node = ?, lease_until = ?"
                        " WHERE id = ?", (node, now + lease_for, id_),
                    )
                    out.append(_batch(conn.execute(
                        "SELECT id, endpoint, body, created, attempts, count FROM hook_batch"
                        " WHERE id = ?", (id_,),
                    ).fetchone()))
            return out

        return self._db.run(lease)

    def ack(self, batch_id: str) -> Deferred[bool]:
        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM hook_batch WHERE id = ? AND state != 'dead'", (batch_id,)
            )
            return cur.rowcount > 0

        return self._db.run(delete)

    def retry(self, batch_id: str, node: str, due: float, error: str) -> Deferred[bool]:
        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE hook_batch SET state = 'ready', attempts = attempts + 1, due = ?,"
                " error = ?, node = NULL, lease_until = NULL"
                " WHERE id = ? AND state = 'leased' AND node = ?", (due, error, batch_id, node),
            )
            return cur.rowcount > 0

        return self._db.run(update)

    def dead_letter(self, batch_id: str, node: str, error: str, now: float) -> Deferred[bool]:
        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE hook_batch SET state = 'dead', attempts = attempts + 1, error = ?,"
                " failed_at = ?, node = NULL, lease_until = NULL"
                " WHERE id = ? AND state = 'leased' AND node = ?", (error, now, batch_id, node),
            )
            return cur.rowcount > 0

        return self._db.run(update)

    def list_dead(self, endpoint: str | None, limit: int) -> Deferred[list[DeadBatch]]:
        def select(conn: sqlite3.Connection) -> list[DeadBatch]:
            sql = (
                "SELECT id, endpoint, created, attempts, failed_at, error, count FROM hook_batch"
                " WHERE state = 'dead'"
            )
            params: list[Any] = []
            if endpoint is not None:
                sql += " AND endpoint = ?"
                params.append(endpoint)
            sql += " ORDER BY failed_at DESC, id DESC LIMIT ?"
            params.append(limit)
            return [DeadBatch(*row) for row in conn.execute(sql, params)]

        return self._db.run(select, background=True)

    def replay(self, batch_id: str, now: float) -> Deferred[bool]:
        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE hook_batch SET state = 'ready', attempts = 0, created = ?, due = ?,"
                " failed_at = NULL WHERE id = ? AND state = 'dead'", (now, now, batch_id),
            )
            return cur.rowcount > 0

        return self._db.run(update)

    def disable(self, endpoint: str, reason: str, now: float) -> Deferred[None]:
        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO hook_endpoint (endpoint, disabled_at, reason)"
                " VALUES (?, ?, ?)", (endpoint, now, reason),
            )

        return self._db.run(insert)

    def enable(self, endpoint: str) -> Deferred[bool]:
        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM hook_endpoint WHERE endpoint = ?", (endpoint,))
            return cur.rowcount > 0

        return self._db.run(delete)

    def disabled(self) -> Deferred[list[DisabledEndpoint]]:
        def select(conn: sqlite3.Connection) -> list[DisabledEndpoint]:
            rows = conn.execute(
                "SELECT endpoint, disabled_at, reason FROM hook_endpoint ORDER BY endpoint"
            )
            return [DisabledEndpoint(*row) for row in rows]

        return self._db.run(select, background=True)

    def counts(self, endpoint: str) -> Deferred[dict[str, int]]:
        def select(conn: sqlite3.Connection) -> dict[str, int]:
            (queued,) = conn.execute(
                "SELECT COUNT(*) FROM hook_pending WHERE endpoint = ?", (endpoint,)
            ).fetchone()
            (live,) = conn.execute(
                "SELECT COUNT(*) FROM hook_batch WHERE endpoint = ? AND state != 'dead'",
                (endpoint,),
            ).fetchone()
            (dead,) = conn.execute(
                "SELECT COUNT(*) FROM hook_batch WHERE endpoint = ? AND state = 'dead'",
                (endpoint,),
            ).fetchone()
            return {"queued": queued, "batches": live, "dead": dead}

        return self._db.run(select, background=True)

    def reclaim(self, node: str) -> Deferred[int]:
        def update(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE hook_batch SET state = 'ready', node = NULL, lease_until = NULL"
                " WHERE state = 'leased' AND node = ?", (node,),
            )
            return cur.rowcount

        return self._db.run(update)

    def trim(self, before: float) -> Deferred[int]:
        def delete(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM hook_batch WHERE state = 'dead' AND failed_at < ?", (before,)
            )
            return cur.rowcount

        return self._db.run(delete, background=True)

    def purge(self, endpoint: str) -> Deferred[dict[str, int]]:
        def delete(conn: sqlite3.Connection) -> dict[str, int]:
            queued = conn.execute(
                "DELETE FROM hook_pending WHERE endpoint = ?", (endpoint,)
            ).rowcount
            dead = conn.execute(
                "DELETE FROM hook_batch WHERE endpoint = ? AND state = 'dead'", (endpoint,)
            ).rowcount
            live = conn.execute(
                "DELETE FROM hook_batch WHERE endpoint = ?", (endpoint,)
            ).rowcount
            return {"queued": queued, "batches": live, "dead": dead}

        return self._db.run(delete)


def _form(
    conn: sqlite3.Connection, endpoint: str, now: float, stamp: str, fill_time: float,
    max_events: int,
) -> str | None:
    """(database thread) Form one batch of ``endpoint``'s oldest queued events when it is
    full or its first event has waited ``fill_time``; the new batch's id, or None."""
    rows = conn.execute(
        "SELECT seq, created, item FROM hook_pending WHERE endpoint = ? ORDER BY seq LIMIT ?",
        (endpoint, max_events),
    ).fetchall()
    if not rows or (len(rows) < max_events and rows[0][1] > now - fill_time):
        return None
    batch_id = new_batch_id(now)
    conn.execute(
        "INSERT INTO hook_batch (id, endpoint, body, count, created, due, state)"
        " VALUES (?, ?, ?, ?, ?, ?, 'ready')",
        (batch_id, endpoint, batch_body([item for *_, item in rows], stamp), len(rows), now, now),
    )
    conn.execute(
        "DELETE FROM hook_pending WHERE endpoint = ? AND seq <= ?", (endpoint, rows[-1][0])
    )
    return batch_id
