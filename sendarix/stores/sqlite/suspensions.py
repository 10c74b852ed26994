"""Destinations an operator suspended, in SQLite (table ``site_suspension``), so that
every worker process on the file sees a suspension made through any of them."""

from __future__ import annotations

import sqlite3

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ISiteSuspensions
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS site_suspension (
    site  TEXT PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID;
"""


@implementer(ISiteSuspensions)
@define
class SQLiteSiteSuspensions:
    """Suspended sites in the node's SQLite database."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def suspend(self, site: str, until: float) -> Deferred[None]:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO site_suspension (site, until) VALUES (?, ?)"
                " ON CONFLICT (site) DO UPDATE SET until = excluded.until", (site, until),
            )

        return self._db.run(work)

    def resume(self, site: str) -> Deferred[bool]:
        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "DELETE FROM site_suspension WHERE site = ?", (site,)
            ).rowcount > 0

        return self._db.run(work)

    def active(self, now: float) -> Deferred[dict[str, float]]:
        def work(conn: sqlite3.Connection) -> dict[str, float]:
            conn.execute("DELETE FROM site_suspension WHERE until <= ?", (now,))
            rows = conn.execute("SELECT site, until FROM site_suspension").fetchall()
            return {site: float(until) for site, until in rows}

        return self._db.run(work)
