"""The SQLite credential store (``cred_*`` tables), sharing the node's database file."""

from __future__ import annotations

import builtins
import json
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import ICredentialStore
from sendarix.model.credential import (
    Credential,
)
from sendarix.stores.credentials import (
    CredentialExistsError,
    CredentialNotFoundError,
    CredentialStoreBase,
)
from sendarix.stores.sqlite.database import SQLiteDatabase

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cred_credential (
    name            TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    domains         TEXT NOT NULL,      -- JSON list
    networks        TEXT NOT NULL,      -- JSON list of CIDR strings
    scopes          TEXT NOT NULL,      -- JSON list
    rate_per_minute INTEGER,
    sandbox         INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    revoked_at      REAL,
    secret_hash     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cred_credential_tenant ON cred_credential (tenant);
"""


_COLUMNS = (
    "name, tenant, domains, networks, scopes, rate_per_minute, sandbox, created_at,"
    " revoked_at, secret_hash"
)


def _from_row(row: tuple[Any, ...]) -> Credential:
    return Credential(
        name=row[0],
        tenant=row[1],
        domains=json.loads(row[2]),
        networks=json.loads(row[3]),
        scopes=json.loads(row[4]),
        rate_per_minute=row[5],
        sandbox=bool(row[6]),
        created_at=row[7],
        revoked_at=row[8],
        secret_hash=row[9],
    )


@implementer(ICredentialStore)
class SQLiteCredentialStore(CredentialStoreBase):
    """Credentials in table ``cred_credential`` of a shared :obj:`SQLiteDatabase`.

    Construct it before ``db.open()`` (it registers its schema).  ``clock`` gives
    ``created_at``/``revoked_at``; if it also provides IReactorThreads (a real reactor)
    its thread pool does the hashing, else the global reactor's.
    """

    def __init__(
        self,
        db: SQLiteDatabase,
        clock: IReactorTime,
        threads: IReactorThreads | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        if threads is None and IReactorThreads.providedBy(clock):
            threads = clock  # type: ignore[assignment]
        self._threads = threads
        db.add_schema(_SCHEMA)

    async def _insert(self, cred: Credential) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO cred_credential ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        cred.name,
                        cred.tenant,
                        json.dumps(list(cred.domains)),
                        json.dumps([str(n) for n in cred.networks]),
                        json.dumps(sorted(cred.scopes)),
                        cred.rate_per_minute,
                        int(cred.sandbox),
                        cred.created_at,
                        None,
                        cred.secret_hash,
                    ),
                )
            except sqlite3.IntegrityError:
                raise CredentialExistsError(f"credential {cred.name!r} already exists") from None

        await self._db.run(insert)

    def get(self, name: str) -> Deferred[Credential | None]:
        """The credential (active or revoked), or None."""

        def select(conn: sqlite3.Connection) -> Credential | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM cred_credential WHERE name = ?", (name,)
            ).fetchone()
            return _from_row(row) if row is not None else None

        return self._db.run(select)

    def list(self, tenant: str | None = None) -> Deferred[builtins.list[Credential]]:
        """Every credential (of ``tenant``, if given), by name."""

        def select(conn: sqlite3.Connection) -> builtins.list[Credential]:
            if tenant is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM cred_credential ORDER BY name")
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM cred_credential WHERE tenant = ? ORDER BY name",
                    (tenant,),
                )
            return [_from_row(r) for r in rows]

        return self._db.run(select)

    def revoke(self, name: str) -> Deferred[bool]:
        """Revoke at once; True when the credential exists (revoking twice is harmless)."""
        now = self._clock.seconds()

        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE cred_credential SET revoked_at = COALESCE(revoked_at, ?) WHERE name = ?",
                (now, name),
            )
            return cur.rowcount > 0

        def logged(existed: bool) -> bool:
            if existed:
                log.info("credential {name} revoked", name=name)
            return existed

        return self._db.run(update).addCallback(logged)

    async def _replace_hash(self, name: str, hashed: str) -> None:
        def update(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE cred_credential SET secret_hash = ? WHERE name = ? AND revoked_at IS NULL",
                (hashed, name),
            )
            if cur.rowcount == 0:
                raise CredentialNotFoundError(f"no active credential {name!r}")

        await self._db.run(update)
