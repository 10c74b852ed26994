"""The SQLite domain store: sending domains in ``dom_domain``, their DKIM keys in
``dom_key``, in the node's shared database.

Private keys arrive already encrypted with the node secret: this store only ever sees
Fernet tokens.  A domain counts as verified when all its keys are; mail signs with the
verified keys only, so a key added for rotation signs once it is published while the
old key keeps signing meanwhile.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Sequence
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IDomainStore
from sendarix.model.domain import DKIMKey, DomainExistsError, DomainNotFoundError, SendingDomain
from sendarix.stores.sqlite.database import SQLiteDatabase

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dom_domain (
    domain      TEXT PRIMARY KEY,   -- lowercase, no trailing dot
    tenant      TEXT,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dom_key (
    domain            TEXT NOT NULL REFERENCES dom_domain (domain),
    selector          TEXT NOT NULL,
    key_type          TEXT NOT NULL,
    public_b64        TEXT NOT NULL,
    private_encrypted TEXT NOT NULL,  -- Fernet token (node secret)
    created_at        REAL NOT NULL,
    verified_at       REAL,
    PRIMARY KEY (domain, selector)
);
"""

_KEY_COLUMNS = "selector, key_type, public_b64, private_encrypted, created_at, verified_at"


def _keys(conn: sqlite3.Connection, domain: str) -> tuple[DKIMKey, ...]:
    rows = conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM dom_key WHERE domain = ? ORDER BY rowid", (domain,)
    )
    return tuple(DKIMKey(*row) for row in rows)


def _domain(conn: sqlite3.Connection, row: tuple[Any, ...]) -> SendingDomain:
    return SendingDomain(row[0], row[1], row[2], _keys(conn, row[0]))


def _insert_keys(conn: sqlite3.Connection, domain: str, keys: Sequence[DKIMKey]) -> None:
    for k in keys:
        try:
            conn.execute(
                f"INSERT INTO dom_key (domain, {_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (domain, k.selector, k.key_type, k.public_b64, k.private_encrypted,
                 k.created_at, k.verified_at),
            )
        except sqlite3.IntegrityError:
            raise DomainExistsError(
                f"selector {k.selector} of {domain} already exists"
            ) from None


@implementer(IDomainStore)
@define
class SQLiteDomainStore:
    """Sending domains in tables ``dom_domain``/``dom_key`` of a shared
    :obj:`SQLiteDatabase` (construct it before ``db.open()``: it registers its schema)."""

    _db: SQLiteDatabase

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)

    def add(
        self, domain: str, tenant: str | None, keys: Sequence[DKIMKey], now: float
    ) -> Deferred[SendingDomain]:
        """Add ``domain`` with ``keys``; fails with :obj:`DomainExistsError` when the
        domain is already there."""

        def insert(conn: sqlite3.Connection) -> SendingDomain:
            try:
                conn.execute(
                    "INSERT INTO dom_domain (domain, tenant, created_at) VALUES (?, ?, ?)",
                    (domain, tenant, now),
                )
            except sqlite3.IntegrityError:
                raise DomainExistsError(f"domain {domain} was already added") from None
            _insert_keys(conn, domain, keys)
            return SendingDomain(domain, tenant, now, tuple(keys))

        return self._db.run(insert)

    def add_keys(self, domain: str, keys: Sequence[DKIMKey]) -> Deferred[SendingDomain]:
        """Add ``keys`` to an existing domain (key rotation); the domain with all its
        keys.  :obj:`DomainNotFoundError` or :obj:`DomainExistsError` (a selector is taken):
        then nothing is added."""

        def insert(conn: sqlite3.Connection) -> SendingDomain:
            row = conn.execute(
                "SELECT domain, tenant, created_at FROM dom_domain WHERE domain = ?", (domain,)
            ).fetchone()
            if row is None:
                raise DomainNotFoundError(f"no domain {domain}")
            _insert_keys(conn, domain, keys)
            return _domain(conn, row)

        return self._db.run(insert)

    def get(self, domain: str) -> Deferred[SendingDomain | None]:
        """The domain with its keys, or None."""

        def select(conn: sqlite3.Connection) -> SendingDomain | None:
            row = conn.execute(
                "SELECT domain, tenant, created_at FROM dom_domain WHERE domain = ?", (domain,),
            ).fetchone()
            return _domain(conn, row) if row is not None else None

        return self._db.run(select)

    def list(self) -> Deferred[builtins.list[SendingDomain]]:
        """Every domain, by name."""

        def select(conn: sqlite3.Connection) -> builtins.list[SendingDomain]:
            rows = conn.execute(
                "SELECT domain, tenant, created_at FROM dom_domain ORDER BY domain"
            ).fetchall()
            return [_domain(conn, r) for r in rows]

        return self._db.run(select)

    def set_verified(
        self, domain: str, verified_at: float | None, selector: str | None = None
    ) -> Deferred[bool]:
        """Mark the key ``selector`` (None: every key) of ``domain`` verified at
        ``verified_at`` (None: not verified); True when such a key exists."""

        def update(conn: sqlite3.Connection) -> bool:
            if selector is None:
                cur = conn.execute(
                    "UPDATE dom_key SET verified_at = ? WHERE domain = ?", (verified_at, domain)
                )
            else:
                cur = conn.execute(
                    "UPDATE dom_key SET verified_at = ? WHERE domain = ? AND selector = ?",
                    (verified_at, domain, selector),
                )
            return cur.rowcount > 0

        return self._db.run(update)

    def remove(self, domain: str, selector: str | None = None) -> Deferred[bool]:
        """Forget the key ``selector`` of ``domain``, or (None) the domain and all its
        keys; True when it existed."""

        def delete(conn: sqlite3.Connection) -> bool:
            if selector is not None:
                return conn.execute(
                    "DELETE FROM dom_key WHERE domain = ? AND selector = ?", (domain, selector)
                ).rowcount > 0
            conn.execute("DELETE FROM dom_key WHERE domain = ?", (domain,))
            return conn.execute("DELETE FROM dom_domain WHERE domain = ?", (domain,)).rowcount > 0

        return self._db.run(delete)


def count_stored_keys(path: str) -> tuple[int, str | None]:
    """(number of stored DKIM keys, one encrypted key) in the SQLite file ``path``,
    read directly and read-only (for the start-up check, before the reactor runs).
    (0, None) when the file or the table does not exist yet."""
    import os

    if not os.path.exists(path):
        return 0, None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return 0, None
    try:
        count = conn.execute("SELECT COUNT(*) FROM dom_key").fetchone()[0]
        row = conn.execute("SELECT private_encrypted FROM dom_key LIMIT 1").fetchone()
        return int(count), (row[0] if row else None)
    except sqlite3.Error:
        return 0, None
    finally:
        conn.close()


