"""Held tenants in SQLite (table ``tenant_hold``)."""

from __future__ import annotations

import sqlite3

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ITenantHolds
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenant_hold (
    tenant      TEXT PRIMARY KEY,
    reason      TEXT,            -- NULL once released
    since       REAL,
    released_at REAL
) WITHOUT ROWID;
"""


@implementer(ITenantHolds)
@define
class SQLiteTenantHolds:
    """Held tenants in the node's SQLite database."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def hold(self, tenant: str, reason: str, now: float) -> Deferred[bool]:
        def work(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT reason FROM tenant_hold WHERE tenant = ?",
                               (tenant,)).fetchone()
            if row is not None and row[0] is not None:
                return False
            conn.execute(
                "INSERT INTO tenant_hold (tenant, reason, since) VALUES (?, ?, ?)"
                " ON CONFLICT (tenant) DO UPDATE SET reason = excluded.reason,"
                " since = excluded.since", (tenant, reason, now),
            )
            return True

        return self._db.run(work)

    def release(self, tenant: str, now: float) -> Deferred[bool]:
        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE tenant_hold SET reason = NULL, since = NULL, released_at = ?"
                " WHERE tenant = ? AND reason IS NOT NULL", (now, tenant),
            ).rowcount > 0

        return self._db.run(work)

    def all(self) -> Deferred[dict[str, tuple[str, float]]]:
        def work(conn: sqlite3.Connection) -> dict[str, tuple[str, float]]:
            rows = conn.execute(
                "SELECT tenant, reason, since FROM tenant_hold WHERE reason IS NOT NULL"
            ).fetchall()
            return {r[0]: (r[1], r[2]) for r in rows}

        return self._db.run(work)

    def released_at(self, tenant: str) -> Deferred[float | None]:
        def work(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT released_at FROM tenant_hold WHERE tenant = ?",
                               (tenant,)).fetchone()
            return row[0] if row else None

        return self._db.run(work)
