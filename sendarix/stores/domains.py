"""Sending domains and their DKIM keys (DESIGN section 8).

A L{SendingDomain} holds one or more L{DKIMKey}s (one per selector).  Private keys
are stored encrypted with the node secret (``sendarix.config.secret``): the store only
ever sees Fernet tokens.  Each key is *verified* once ``sendarix domains verify``
found it published in DNS; a domain is verified when all its keys are.  Mail is
signed with the verified keys of a domain, so a key added for rotation signs only
once it is published, and the old key keeps signing meanwhile.  With ``[domains]
require_verified_domains`` only domains with a verified key may send.

``SQLiteDomainStore`` keeps them in tables ``dom_domain`` and ``dom_key`` of the
shared database.  ``DomainKeyring`` is what the relay uses at run time: it answers
"is this domain verified, and with which keys do I sign?" from a short-lived cache,
so a ``domains verify`` run by the command line takes effect within ``refresh``
seconds on every node.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.cleanup.dkim import SigningKey, load_signing_key
from sendarix.config.secret import NodeSecret, SecretError
from sendarix.interfaces import IDomainStore
from sendarix.stores.sqlite.database import SQLiteDatabase

log = Logger()

__all__ = [
    "DKIMKey",
    "DomainExistsError",
    "DomainKeyring",
    "DomainNotFoundError",
    "SQLiteDomainStore",
    "SendingDomain",
    "check_keys_open",
    "count_stored_keys",
]


class DomainExistsError(ValueError):
    """The domain (or one of the selectors) is already there."""


class DomainNotFoundError(LookupError):
    """No such sending domain."""


@frozen
class DKIMKey:
    """One DKIM key of a domain: selector, key type (``rsa``/``ed25519``), the
    public key as published (``p=``), the private key as a Fernet token, and when
    its DNS record was last found matching (None: not verified)."""

    selector: str
    key_type: str
    public_b64: str
    private_encrypted: str = field(repr=False)
    created_at: float
    verified_at: float | None = None

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    def to_dict(self) -> dict[str, Any]:
        """Public facts only (never the private key)."""
        return {
            "selector": self.selector,
            "key_type": self.key_type,
            "public_key": self.public_b64,
            "created_at": self.created_at,
            "verified": self.verified,
            "verified_at": self.verified_at,
        }


@frozen
class SendingDomain:
    """A sending domain: its tenant (None = any) and its keys."""

    domain: str
    tenant: str | None
    created_at: float
    keys: tuple[DKIMKey, ...]

    @property
    def verified(self) -> bool:
        """Every key is published and verified."""
        return bool(self.keys) and all(k.verified for k in self.keys)

    @property
    def usable(self) -> bool:
        """At least one key is verified: mail from the domain is signed (and allowed
        when verified domains are required)."""
        return any(k.verified for k in self.keys)

    @property
    def verified_at(self) -> float | None:
        """When the domain became verified (its keys' latest verification), or None."""
        return max(k.verified_at for k in self.keys if k.verified_at) if self.verified else None

    @property
    def state(self) -> str:
        """``verified``, ``unverified``, or ``partly verified`` (some keys pending)."""
        if self.verified:
            return "verified"
        return "partly verified" if self.usable else "unverified"

    def key(self, selector: str) -> DKIMKey | None:
        return next((k for k in self.keys if k.selector == selector), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "tenant": self.tenant,
            "created_at": self.created_at,
            "verified": self.verified,
            "state": self.state,
            "verified_at": self.verified_at,
            "keys": [k.to_dict() for k in self.keys],
        }


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
class SQLiteDomainStore:
    """Sending domains in tables ``dom_domain``/``dom_key`` of a shared
    L{SQLiteDatabase} (construct it before ``db.open()``: it registers its schema)."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        db.add_schema(_SCHEMA)

    def add(
        self, domain: str, tenant: str | None, keys: Sequence[DKIMKey], now: float
    ) -> Deferred[SendingDomain]:
        """Add ``domain`` with ``keys``; fails with L{DomainExistsError} when the
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
        keys.  L{DomainNotFoundError} or L{DomainExistsError} (a selector is taken):
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


async def check_keys_open(
    store: IDomainStore, secret: NodeSecret | None, env_name: str
) -> None:
    """Fail with SecretError when ``store`` holds DKIM keys that ``secret`` cannot
    open (unset, or another secret): the start-up check for stores the relay cannot
    read before the reactor runs (Redis)."""
    keys = [k for sd in await store.list() for k in sd.keys]
    if not keys:
        return
    if secret is None:
        raise SecretError(
            f"${env_name} is not set, but {len(keys)} DKIM private key(s) are stored "
            "encrypted with it: set it to the node secret used by 'sendarix domains add'"
        )
    secret.decrypt(keys[0].private_encrypted)


@frozen
class _Entry:
    domain: SendingDomain | None
    expires: float


class DomainKeyring:
    """The relay's view of sending domains: which keys are verified, and the signing
    keys (decrypted on first use, then kept).  Domains are re-read from the store after
    ``refresh`` seconds, so a ``domains verify`` elsewhere takes effect that soon."""

    def __init__(
        self,
        store: IDomainStore,
        secret: NodeSecret | None,
        clock: IReactorTime,
        refresh: float = 10.0,
    ) -> None:
        self._store = store
        self._secret = secret
        self._clock = clock
        self._refresh = refresh
        self._cache: dict[str, _Entry] = {}
        self._loaded: dict[tuple[str, str, str], SigningKey] = {}

    def lookup(self, domain: str) -> Deferred[SendingDomain | None]:
        """The sending domain (cached), or None."""
        return self._entry(domain.lower()).addCallback(lambda e: e.domain)

    def signing_keys(self, domain: str) -> Deferred[tuple[SigningKey, ...]]:
        """The keys that sign mail from ``domain``: its verified keys."""
        def load(entry: _Entry) -> tuple[SigningKey, ...]:
            sd = entry.domain
            if sd is None:
                return ()
            return tuple(self._load(sd.domain, k) for k in sd.keys if k.verified)

        return self._entry(domain.lower()).addCallback(load)

    def _entry(self, domain: str) -> Deferred[_Entry]:
        now = self._clock.seconds()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires > now:
            return succeed(cached)

        def found(sd: SendingDomain | None) -> _Entry:
            entry = _Entry(sd, self._clock.seconds() + self._refresh)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[domain] = entry
            return entry

        return self._store.get(domain).addCallback(found)

    def _load(self, domain: str, key: DKIMKey) -> SigningKey:
        ident = (domain, key.selector, key.private_encrypted)
        loaded = self._loaded.get(ident)
        if loaded is None:
            if self._secret is None:
                raise SecretError("the node secret is not set: cannot open DKIM keys")
            pem = self._secret.decrypt(key.private_encrypted)
            loaded = load_signing_key(domain, key.selector, key.key_type, pem)
            self._loaded[ident] = loaded
        return loaded
