"""Webhook endpoints added at run time, in SQLite (table ``hook_stored``): one row per
endpoint, its value as JSON (secrets sealed) beside the columns it is looked up by."""

from __future__ import annotations

import builtins
import sqlite3

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IWebhookEndpointStore
from sendarix.model.webhook import StoredWebhook
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hook_stored (
    name   TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    value  TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hook_stored_tenant ON hook_stored (tenant, name);
"""


@implementer(IWebhookEndpointStore)
@define
class SQLiteWebhookEndpointStore:
    """Run-time webhook endpoints in the node's SQLite database."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def add(self, endpoint: StoredWebhook) -> Deferred[bool]:
        def insert(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO hook_stored (name, tenant, value) VALUES (?, ?, ?)",
                (endpoint.name, endpoint.tenant, endpoint.to_json()),
            )
            return cur.rowcount > 0

        return self._db.run(insert)

    def get(self, name: str) -> Deferred[StoredWebhook | None]:
        def select(conn: sqlite3.Connection) -> StoredWebhook | None:
            row = conn.execute("SELECT value FROM hook_stored WHERE name = ?", (name,)).fetchone()
            return StoredWebhook.from_json(row[0]) if row else None

        return self._db.run(select)

    def list(self, tenant: str | None = None) -> Deferred[builtins.list[StoredWebhook]]:
        def select(conn: sqlite3.Connection) -> builtins.list[StoredWebhook]:
            if tenant is None:
                rows = conn.execute("SELECT value FROM hook_stored ORDER BY name")
            else:
                rows = conn.execute(
                    "SELECT value FROM hook_stored WHERE tenant = ? ORDER BY name", (tenant,)
                )
            return [StoredWebhook.from_json(value) for (value,) in rows]

        return self._db.run(select)

    def remove(self, name: str) -> Deferred[bool]:
        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM hook_stored WHERE name = ?", (name,)).rowcount > 0

        return self._db.run(delete)
