"""Hourly event counts in SQLite (table ``stat_hour``)."""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Mapping

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IStatsStore
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stat_hour (
    hour     REAL NOT NULL,     -- POSIX seconds at the start of the hour
    tenant   TEXT NOT NULL,
    type     TEXT NOT NULL,
    provider TEXT NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (hour, tenant, type, provider)
) WITHOUT ROWID;
"""

Row = tuple[float, str, str, str, int]


@implementer(IStatsStore)
@define
class SQLiteStatsStore:
    """Hourly counts in the node's SQLite database."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def add(self, counts: Mapping[tuple[float, str, str, str], int]) -> Deferred[None]:
        rows = [(*key, n) for key, n in counts.items() if n]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO stat_hour (hour, tenant, type, provider, n) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (hour, tenant, type, provider) DO UPDATE SET n = n + excluded.n",
                rows,
            )

        return self._db.run(work)

    def query(
        self, since: float, until: float, tenant: str | None = None
    ) -> Deferred[builtins.list[Row]]:
        def work(conn: sqlite3.Connection) -> builtins.list[Row]:
            sql = ("SELECT hour, tenant, type, provider, n FROM stat_hour"
                   " WHERE hour >= ? AND hour < ?")
            params: builtins.list[object] = [since, until]
            if tenant is not None:
                sql += " AND tenant = ?"
                params.append(tenant)
            rows = conn.execute(sql + " ORDER BY hour", params).fetchall()
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return self._db.run(work)

    def trim(self, before: float) -> Deferred[int]:
        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM stat_hour WHERE hour < ?", (before,)).rowcount

        return self._db.run(work)

