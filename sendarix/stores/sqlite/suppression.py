"""Per-tenant suppression lists in SQLite (docs/operator-guide.md, "Suppression lists").

A suppressed recipient is refused at RCPT for its tenant (``550 5.1.1 recipient
suppressed``).  Entries come from hard bounces, expiry, complaints, the operator
(``sendarix suppressions add``) and the HTTP API.  Addresses are stored lowercased:
the whole address, because senders and receivers treat local parts case-insensitively
in practice, and an entry that missed "Bob@" for "bob@" would be worse than useless.
"""

from __future__ import annotations

import builtins
import sqlite3
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from sendarix.interfaces import ISuppressionStore
from sendarix.model.suppression import Suppression
from sendarix.stores.paging import page_start
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS supp_entry (
    tenant     TEXT NOT NULL,
    address    TEXT NOT NULL,      -- lowercased
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, address)
) WITHOUT ROWID;
"""

_COLUMNS = "tenant, address, reason, source, created_at"


def _from_row(row: tuple[Any, ...]) -> Suppression:
    return Suppression(row[0], row[1], row[2], row[3], row[4])


@implementer(ISuppressionStore)
@define
class SQLiteSuppressionStore:
    """Suppression lists in the node's SQLite database (table ``supp_entry``)."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def add(
        self, tenant: str, address: str, reason: str, source: str, now: float
    ) -> Deferred[bool]:
        """Suppress ``address`` for ``tenant``; True when new, False when it was there
        already (a non-empty reason replaces the old one; source and time stay the
        first ones, so re-adding without a reason loses nothing)."""
        try:
            entry = Suppression(tenant, address, reason, source, now)  # validates
        except ValueError:
            return fail()

        def work(conn: sqlite3.Connection) -> bool:
            # Both statements run in one job, so nothing slips in between them.
            existed = conn.execute(
                "UPDATE supp_entry SET reason = CASE WHEN ? = '' THEN reason ELSE ? END"
                " WHERE tenant = ? AND address = ?",
                (entry.reason, entry.reason, entry.tenant, entry.address),
            ).rowcount
            if existed:
                return False
            conn.execute(
                f"INSERT INTO supp_entry ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (entry.tenant, entry.address, entry.reason, entry.source, entry.created_at),
            )
            return True

        return self._db.run(work)

    def is_suppressed(self, tenant: str, address: str) -> Deferred[Suppression | None]:
        """The entry for ``address`` in ``tenant``'s list, or None."""
        key = (tenant, address.strip().lower())

        def work(conn: sqlite3.Connection) -> Suppression | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM supp_entry WHERE tenant = ? AND address = ?", key
            ).fetchone()
            return _from_row(row) if row else None

        # Asked at RCPT while the client waits: the reader, not behind the commits.
        return self._db.read(work)

    def remove(self, tenant: str, address: str) -> Deferred[bool]:
        """Lift the suppression; True when there was one."""
        key = (tenant, address.strip().lower())

        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM supp_entry WHERE tenant = ? AND address = ?", key)
            return cursor.rowcount > 0

        return self._db.run(work)

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        after: str | tuple[str, str] | None = None,
    ) -> Deferred[builtins.list[Suppression]]:
        """Up to ``limit`` entries in (tenant, address) order, all tenants' when
        ``tenant`` is None.  ``after`` pages on: the last address seen (with
        ``tenant``) or the last ``(tenant, address)`` pair."""
        try:
            start = page_start(tenant, after)
        except ValueError:
            return fail()
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if start is not None:
            where.append("(tenant, address) > (?, ?)")
            params += list(start)
        sql = f"SELECT {_COLUMNS} FROM supp_entry"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY tenant, address LIMIT ?"
        params.append(max(0, int(limit)))

        def work(conn: sqlite3.Connection) -> builtins.list[Suppression]:
            return [_from_row(row) for row in conn.execute(sql, params)]

        return self._db.run(work)
