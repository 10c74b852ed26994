"""HTTP API idempotency keys in SQLite (table ``idem_key``), beside the spool."""

from __future__ import annotations

import sqlite3

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IIdempotencyStore
from sendarix.model.idempotency import KEY_LIFETIME, IdempotencyRecord
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idem_key (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  REAL NOT NULL,
    status      INTEGER,           -- NULL while the first request runs
    body        TEXT,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idem_key_created ON idem_key (created_at);
"""


@implementer(IIdempotencyStore)
@define
class SQLiteIdempotencyStore:
    """Idempotency records in the node's SQLite database."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def claim(
        self, scope: str, key: str, fingerprint: str, now: float
    ) -> Deferred[IdempotencyRecord | None]:
        def work(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            # Read and insert in one job: no other claim runs in between.
            row = conn.execute(
                "SELECT fingerprint, created_at, status, body FROM idem_key"
                " WHERE scope = ? AND key = ?", (scope, key),
            ).fetchone()
            if row is not None and row[1] > now - KEY_LIFETIME:
                return IdempotencyRecord(row[0], row[1], row[2], row[3])
            conn.execute(
                "INSERT OR REPLACE INTO idem_key (scope, key, fingerprint, created_at)"
                " VALUES (?, ?, ?, ?)", (scope, key, fingerprint, now),
            )
            return None

        return self._db.run(work)

    def finish(self, scope: str, key: str, status: int, body: str) -> Deferred[None]:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE idem_key SET status = ?, body = ? WHERE scope = ? AND key = ?",
                (status, body, scope, key),
            )

        return self._db.run(work)

    def release(self, scope: str, key: str) -> Deferred[None]:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM idem_key WHERE scope = ? AND key = ? AND status IS NULL",
                (scope, key),
            )

        return self._db.run(work)

    def trim(self, before: float) -> Deferred[int]:
        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM idem_key WHERE created_at < ?", (before,)).rowcount

        return self._db.run(work)
