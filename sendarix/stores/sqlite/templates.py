"""Message templates in SQLite (table ``tmpl_version``): every version of each
tenant's templates."""

from __future__ import annotations

import builtins
import sqlite3
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ITemplateStore
from sendarix.model.template import Template
from sendarix.stores.sqlite.database import SQLiteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tmpl_version (
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    subject    TEXT,
    text       TEXT,
    html       TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, name, version)
) WITHOUT ROWID;
"""

_COLUMNS = "tenant, name, version, subject, text, html, created_at"


def _row(row: tuple[Any, ...]) -> Template:
    return Template(row[0], row[1], row[2], row[3], row[4], row[5], row[6])


@implementer(ITemplateStore)
@define
class SQLiteTemplateStore:
    """Templates in the node's SQLite database."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def save(
        self, tenant: str, name: str, subject: str | None, text: str | None,
        html: str | None, now: float,
    ) -> Deferred[Template]:
        def work(conn: sqlite3.Connection) -> Template:
            # One job: the version read and the insert cannot interleave with another save.
            (latest,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM tmpl_version WHERE tenant = ? AND name = ?",
                (tenant, name),
            ).fetchone()
            template = Template(tenant, name, latest + 1, subject, text, html, now)
            conn.execute(
                f"INSERT INTO tmpl_version ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tenant, name, template.version, subject, text, html, now),
            )
            return template

        return self._db.run(work)

    def get(self, tenant: str, name: str, version: int | None = None) -> Deferred[Template | None]:
        def work(conn: sqlite3.Connection) -> Template | None:
            if version is None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM tmpl_version WHERE tenant = ? AND name = ?"
                    " ORDER BY version DESC LIMIT 1", (tenant, name),
                ).fetchone()
            else:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM tmpl_version"
                    " WHERE tenant = ? AND name = ? AND version = ?", (tenant, name, version),
                ).fetchone()
            return _row(row) if row else None

        return self._db.run(work)

    def list(self, tenant: str) -> Deferred[builtins.list[Template]]:
        def work(conn: sqlite3.Connection) -> builtins.list[Template]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM tmpl_version AS t WHERE tenant = ? AND version ="
                " (SELECT MAX(version) FROM tmpl_version WHERE tenant = t.tenant"
                " AND name = t.name) ORDER BY name", (tenant,),
            ).fetchall()
            return [_row(r) for r in rows]

        return self._db.run(work)

    def delete(self, tenant: str, name: str) -> Deferred[bool]:
        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "DELETE FROM tmpl_version WHERE tenant = ? AND name = ?", (tenant, name)
            )
            return cursor.rowcount > 0

        return self._db.run(work)
