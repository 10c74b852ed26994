"""Dashboard login sessions in SQLite (table ``dashboard_session``), so that every
worker process on the file knows a login made through any of them.  Rows are keyed
by the SHA-256 of the session id, never the id the cookie holds."""

from __future__ import annotations

import sqlite3

from attrs import define, evolve, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IDashboardSessions
from sendarix.model.dashboard import Session, SessionRules, session_key
from sendarix.stores.sqlite.database import SQLiteDatabase

# ``seen`` is indexed: idle sessions are forgotten by it, and beyond the limit the
# least recently seen go first.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS dashboard_session (
    key         TEXT PRIMARY KEY,   -- SHA-256 (hex) of the session id
    credential  TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    operator    INTEGER NOT NULL,
    created     REAL NOT NULL,
    seen        REAL NOT NULL,
    csrf        TEXT NOT NULL,
    flash       TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dashboard_session_seen ON dashboard_session (seen);
"""

_COLUMNS = "credential, secret_hash, tenant, operator, created, seen, csrf, flash"


@implementer(IDashboardSessions)
@define
class SQLiteDashboardSessions:
    """Dashboard sessions in the node's SQLite database."""

    _db: SQLiteDatabase
    rules: SessionRules = field(factory=SessionRules)

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def create(self, session: Session) -> Deferred[None]:
        def work(conn: sqlite3.Connection) -> None:
            _expire(conn, self.rules, session.seen)
            # Room for the new one: the least recently seen beyond limit - 1 go.
            conn.execute(
                "DELETE FROM dashboard_session WHERE key IN (SELECT key FROM"
                " dashboard_session ORDER BY seen DESC LIMIT -1 OFFSET ?)",
                (max(0, self.rules.limit - 1),),
            )
            conn.execute(
                f"INSERT OR REPLACE INTO dashboard_session (key, {_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_key(session.id), session.credential, session.secret_hash,
                 session.tenant, int(session.operator), session.created, session.seen,
                 session.csrf, session.flash),
            )

        return self._db.run(work)

    def get(self, session_id: str, now: float) -> Deferred[Session | None]:
        key = session_key(session_id)

        def work(conn: sqlite3.Connection) -> Session | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM dashboard_session WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            credential, secret_hash, tenant, operator, created, seen, csrf, flash = row
            session = Session(session_id, credential, secret_hash, tenant, bool(operator),
                              created, seen, csrf, flash)
            if not self.rules.live(session, now):
                conn.execute("DELETE FROM dashboard_session WHERE key = ?", (key,))
                return None
            conn.execute("UPDATE dashboard_session SET seen = ? WHERE key = ?", (now, key))
            return evolve(session, seen=now)

        return self._db.run(work)

    def end(self, session_id: str) -> Deferred[bool]:
        key = session_key(session_id)

        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "DELETE FROM dashboard_session WHERE key = ?", (key,)
            ).rowcount > 0

        return self._db.run(work)

    def set_flash(self, session_id: str, message: str) -> Deferred[None]:
        key = session_key(session_id)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE dashboard_session SET flash = ? WHERE key = ?", (message, key))

        return self._db.run(work)

    def take_flash(self, session_id: str) -> Deferred[str | None]:
        key = session_key(session_id)

        def work(conn: sqlite3.Connection) -> str | None:
            # Read and cleared in one transaction: two pages cannot both show it.
            row = conn.execute(
                "SELECT flash FROM dashboard_session WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[0] is None:
                return None
            conn.execute("UPDATE dashboard_session SET flash = NULL WHERE key = ?", (key,))
            return str(row[0])

        return self._db.run(work)

    def expire(self, now: float) -> Deferred[int]:
        return self._db.run(lambda conn: _expire(conn, self.rules, now))


def _expire(conn: sqlite3.Connection, rules: SessionRules, now: float) -> int:
    """Forget the sessions that ended by ``now`` (idle, or past their lifetime)."""
    return conn.execute(
        "DELETE FROM dashboard_session WHERE seen < ? OR created < ?",
        (now - rules.idle, now - rules.lifetime),
    ).rowcount
