"""SMTP credentials and API keys: hashed secrets, scopes, and a twisted.cred checker.

A credential is a name (the SMTP AUTH user name) plus a random secret (the password,
also used as the API key).  Only a salted scrypt hash of the secret is stored; the
secret is shown once, when the credential is created or rotated.  Hashing and
verification are deliberately slow (~50 ms), so they always run in a worker thread,
never on the reactor thread.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar

from attrs import evolve, field, frozen
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import ICredentialStore
from sendarix.stores.sqlite.database import SQLiteDatabase

log = Logger()
T = TypeVar("T")

IPNetwork = IPv4Network | IPv6Network

#: Every scope a credential can hold: SMTP submission, HTTP send, read access to the
#: log/queue/stats, and administration (credentials, domains, webhooks).
SCOPES = frozenset({"smtp", "send", "read", "admin"})
DEFAULT_SCOPES = frozenset({"smtp", "send"})

NAME_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")

# scrypt parameters for new hashes, kept here and nowhere else.  N=2**14, r=8 costs
# 16 MiB and ~50 ms per hash; verification reads the parameters from the stored string,
# so they can be raised later without invalidating existing hashes.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32
# Upper bounds accepted when verifying, so a tampered row cannot make us allocate
# gigabytes or spin for minutes.
_SCRYPT_MAX_N = 2**20
_SCRYPT_MAX_R = 32
_SCRYPT_MAX_P = 16


class CredentialExistsError(ValueError):
    """A credential with this name already exists (revoked names stay taken)."""


class CredentialNotFoundError(LookupError):
    """No credential with this name, or it is revoked."""


# -- secrets ---------------------------------------------------------------------


def new_secret() -> str:
    """A fresh random secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # maxmem must exceed scrypt's 128*r*n bytes of working memory, else OpenSSL refuses.
    maxmem = 128 * r * n * (p + 1) + (1 << 20)
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def hash_secret(secret: str | bytes) -> str:
    """A salted scrypt hash of ``secret``: ``scrypt$N$r$p$<b64 salt>$<b64 hash>``.

    Slow on purpose: call it in a thread.
    """
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = _scrypt(_as_bytes(secret), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_secret(secret: str | bytes, stored: str) -> bool:
    """True when ``secret`` matches the ``stored`` hash (constant-time comparison).

    A malformed or out-of-bounds stored string never matches.  Slow: call it in a thread.
    """
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except ValueError:
        return False
    if not (
        1 < n <= _SCRYPT_MAX_N
        and n & (n - 1) == 0
        and 0 < r <= _SCRYPT_MAX_R
        and 0 < p <= _SCRYPT_MAX_P
        and salt
        and 16 <= len(expected) <= 64
    ):
        return False
    actual = _scrypt(_as_bytes(secret), salt, n, r, p, len(expected))
    return hmac.compare_digest(actual, expected)


# A syntactically valid hash that matches nothing: verifying against it costs as much
# as a real verification, so an unknown user name cannot be told apart by timing.
_DUMMY_HASH = (
    f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
    f"{_b64(bytes(SCRYPT_SALT_BYTES))}${_b64(bytes(SCRYPT_KEY_BYTES))}"
)


# unit -> (multiply, divide) to turn a count per unit into a count per minute.
_RATE_UNITS = {
    "s": (60, 1), "sec": (60, 1), "second": (60, 1),
    "m": (1, 1), "min": (1, 1), "minute": (1, 1),
    "h": (1, 60), "hr": (1, 60), "hour": (1, 60),
}  # fmt: skip


def parse_rate(text: str) -> int:
    """Messages per minute from ``"N/s"``, ``"N/min"`` or ``"N/h"`` (also ``"N"``, per minute).

    Per-hour rates that are not a whole number per minute are rounded up (``"90/h"`` is
    2/min): a credential is never limited below what was asked for.
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*([A-Za-z]+))?\s*", text)
    if m is None:
        raise ValueError(f"bad rate {text!r}: expected N/s, N/min or N/h")
    count = int(m.group(1))
    unit = (m.group(2) or "min").lower()
    if len(unit) > 2 and unit.endswith("s"):  # plurals ("mins", "hours"), but not "ms"
        unit = unit[:-1]
    if unit not in _RATE_UNITS:
        raise ValueError(f"bad rate unit in {text!r}: expected s, min or h")
    if count <= 0:
        raise ValueError(f"bad rate {text!r}: must be positive")
    mul, div = _RATE_UNITS[unit]
    return -(-count * mul // div)


# -- the value -------------------------------------------------------------------


def _domains(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({d.strip().lower().rstrip(".") for d in value if d.strip()}))


def _networks(value: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    # strict=False: "10.1.2.3/8" means 10.0.0.0/8; a bare address means just that host.
    nets = {ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v for v in value}
    return tuple(sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def _scopes(value: Iterable[str]) -> frozenset[str]:
    scopes = frozenset(s.strip().lower() for s in value if s.strip())
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(sorted(unknown))}")
    return scopes


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid credential name, else raise ValueError."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"bad credential name {name!r}: 1-128 characters of A-Z a-z 0-9 . _ @ + -")
    return name


@frozen
class Credential:
    """An SMTP credential / API key and what it may do.

    ``domains`` restricts the sender domains (exact, case-insensitive match: a listed
    ``example.com`` does not cover ``mail.example.com``; list each one); ``networks``
    restricts client addresses.  Empty means unrestricted.  ``rate_per_minute`` is a
    message rate limit (None: none).  A ``sandbox`` credential's mail goes to the
    simulator.
    """

    name: str
    tenant: str
    domains: tuple[str, ...] = field(default=(), converter=_domains)
    networks: tuple[IPNetwork, ...] = field(default=(), converter=_networks)
    scopes: frozenset[str] = field(default=DEFAULT_SCOPES, converter=_scopes)
    rate_per_minute: int | None = None
    sandbox: bool = False
    created_at: float = 0.0
    revoked_at: float | None = None
    secret_hash: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        """False once revoked."""
        return self.revoked_at is None

    def allows_ip(self, ip: str) -> bool:
        """True when a client at ``ip`` may use this credential."""
        if not self.networks:
            return True
        addr = _parse_ip(ip)
        return addr is not None and any(addr in net for net in self.networks)

    def allows_sender_domain(self, domain: str) -> bool:
        """True when mail from ``domain`` is allowed (exact match, no subdomains)."""
        if not self.domains:
            return True
        return domain.strip().lower().rstrip(".") in self.domains

    def has_scope(self, scope: str) -> bool:
        """True when the credential holds ``scope``."""
        return scope in self.scopes

    def to_dict(self, include_secret_hash: bool = False) -> dict[str, Any]:
        """A JSON-able dict; the secret hash only when asked for (for stores)."""
        d: dict[str, Any] = {
            "name": self.name,
            "tenant": self.tenant,
            "domains": list(self.domains),
            "networks": [str(n) for n in self.networks],
            "scopes": sorted(self.scopes),
            "rate_per_minute": self.rate_per_minute,
            "sandbox": self.sandbox,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "active": self.active,
        }
        if include_secret_hash:
            d["secret_hash"] = self.secret_hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Credential:
        """The inverse of L{to_dict}."""
        return cls(
            name=d["name"],
            tenant=d["tenant"],
            domains=d.get("domains", ()),
            networks=d.get("networks", ()),
            scopes=d.get("scopes", DEFAULT_SCOPES),
            rate_per_minute=d.get("rate_per_minute"),
            sandbox=bool(d.get("sandbox", False)),
            created_at=float(d.get("created_at", 0.0)),
            revoked_at=d.get("revoked_at"),
            secret_hash=d.get("secret_hash", ""),
        )


# -- what every store does ------------------------------------------------------


def draft_credential(
    name: str,
    tenant: str,
    domains: Iterable[str],
    networks: Iterable[str | IPNetwork],
    scopes: Iterable[str],
    rate: int | str | None,
    sandbox: bool,
    created_at: float,
) -> Credential:
    """A new credential, validated but without a secret hash yet.

    Raises ValueError for a bad name, tenant, scope, network or rate, so a store
    checks everything before paying for a hash.
    """
    check_name(name)
    if not tenant:
        raise ValueError("a credential needs a tenant")
    if isinstance(rate, str):
        rate = parse_rate(rate)
    elif rate is not None and rate <= 0:
        raise ValueError(f"bad rate {rate!r}: must be positive")
    return Credential(
        name=name,
        tenant=tenant,
        domains=domains,
        networks=networks,
        scopes=scopes,
        rate_per_minute=rate,
        sandbox=sandbox,
        created_at=created_at,
    )


async def new_hashed_secret(threads: IReactorThreads | None) -> tuple[str, str]:
    """A fresh secret and its hash, ``(secret, hash)``; hashed in ``threads``'s pool
    (None: the global reactor's), never on the reactor thread."""
    secret = new_secret()
    return secret, await _in_thread(threads, hash_secret, secret)


async def with_new_secret(
    threads: IReactorThreads | None, draft: Credential
) -> tuple[Credential, str]:
    """``draft`` with the hash of a fresh secret, and that secret."""
    secret, hashed = await new_hashed_secret(threads)
    return evolve(draft, secret_hash=hashed), secret


class CredentialStoreBase:
    """``add`` and ``rotate`` for every credential store: validation, the draft and
    the hashing (in a thread) are the same; a store supplies only the writes,
    ``_insert`` and ``_replace_hash``, and sets ``_clock`` and ``_threads``."""

    _clock: IReactorTime
    _threads: IReactorThreads | None

    def add(
        self,
        name: str,
        tenant: str,
        domains: Iterable[str] = (),
        networks: Iterable[str | IPNetwork] = (),
        scopes: Iterable[str] = DEFAULT_SCOPES,
        rate: int | str | None = None,
        sandbox: bool = False,
    ) -> Deferred[tuple[Credential, str]]:
        """Create a credential; Deferred ``(Credential, secret)``.

        Fails with ValueError for a bad name, scope, network or rate, and with
        L{CredentialExistsError} when the name is taken.
        """
        try:
            draft = draft_credential(
                name, tenant, domains, networks, scopes, rate, sandbox, self._clock.seconds()
            )
        except Exception:  # bad values fail the Deferred, as the hashing does
            return fail()
        return Deferred.fromCoroutine(self._add(draft))

    async def _add(self, draft: Credential) -> tuple[Credential, str]:
        cred, secret = await with_new_secret(self._threads, draft)
        await self._insert(cred)
        log.info("credential {name} added for tenant {tenant}", name=cred.name, tenant=cred.tenant)
        return cred, secret

    async def _insert(self, cred: Credential) -> None:
        """Store the new ``cred``; L{CredentialExistsError} when the name is taken."""
        raise NotImplementedError

    def rotate(self, name: str) -> Deferred[str]:
        """Replace the secret; Deferred new secret.  The old secret stops working at once.

        Fails with L{CredentialNotFoundError} for an unknown or revoked credential.
        """
        return Deferred.fromCoroutine(self._rotate(name))

    async def _rotate(self, name: str) -> str:
        secret, hashed = await new_hashed_secret(self._threads)
        await self._replace_hash(name, hashed)
        log.info("credential {name} rotated", name=name)
        return secret

    async def _replace_hash(self, name: str, hashed: str) -> None:
        """Store ``hashed`` as the secret hash of active credential ``name``;
        L{CredentialNotFoundError} when there is none."""
        raise NotImplementedError


# -- the SQLite store ------------------------------------------------------------

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
    """Credentials in table ``cred_credential`` of a shared L{SQLiteDatabase}.

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


def _in_thread(threads: IReactorThreads | None, fn: Callable[..., T], *args: Any) -> Deferred[T]:
    if threads is None:
        return deferToThread(fn, *args)
    return deferToThreadPool(threads, threads.getThreadPool(), fn, *args)  # type: ignore[arg-type]


# -- the twisted.cred checker ----------------------------------------------------


@implementer(ICredentialsChecker)
class CredentialChecker:
    """Checks SMTP AUTH user name + password against an L{ICredentialStore}.

    The avatar id is the credential name, UTF-8 encoded.  The credential is re-read on
    every attempt, so revoke and rotate apply at once; a successful check is cached for
    ``cache_ttl`` seconds, keyed on the stored hash too, so a rotated secret misses the
    cache.  Credentials without ``required_scope`` are refused (None: any scope).
    Client-address and sender-domain restrictions are the caller's to apply: the
    checker does not know them.
    """

    credentialInterfaces = (IUsernamePassword,)

    cache_ttl = 60.0
    max_cache = 10_000

    def __init__(
        self,
        store: ICredentialStore,
        reactor: Any = None,
        required_scope: str | None = "smtp",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._store = store
        self._reactor = reactor
        self._threads: IReactorThreads | None = (
            reactor if IReactorThreads.providedBy(reactor) else None
        )
        self._required_scope = required_scope
        # Cache values are keyed HMACs of the secret, never the secret itself.
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[tuple[str, str], tuple[bytes, float]] = {}

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        """Deferred credential name (UTF-8 bytes, as twisted.cred types avatar ids), or
        a Failure of UnauthorizedLogin."""
        d = Deferred.fromCoroutine(self._request(credentials.username, credentials.password))
        return d.addCallback(_avatar_id)

    def authenticate(self, name: str | bytes, secret: str | bytes) -> Deferred[Credential]:
        """Deferred active L{Credential} for ``name`` and ``secret`` (also for API keys),
        or a Failure of UnauthorizedLogin."""
        return Deferred.fromCoroutine(self._request(name, secret))

    async def _request(self, raw_name: str | bytes, raw_secret: str | bytes) -> Credential:
        try:
            name = raw_name.decode("utf-8") if isinstance(raw_name, bytes) else raw_name
        except UnicodeDecodeError:
            name = ""
        secret = _as_bytes(raw_secret)
        cred: Credential | None = None
        if NAME_PATTERN.fullmatch(name):
            cred = await self._store.get(name)
        usable = (
            cred is not None
            and cred.active
            and (self._required_scope is None or cred.has_scope(self._required_scope))
        )
        if cred is not None and usable and self._cached(cred, secret):
            return cred
        # Verify even when the answer is already "no", so an unknown or revoked name
        # takes as long as a wrong secret.
        stored = cred.secret_hash if cred is not None else _DUMMY_HASH
        ok = await _in_thread(self._threads, verify_secret, secret, stored)
        if cred is None or not usable or not ok:
            raise UnauthorizedLogin("authentication failed")
        self._remember(cred, secret)
        return cred

    def _digest(self, secret: bytes) -> bytes:
        return hmac.new(self._cache_key, secret, hashlib.sha256).digest()

    def _cached(self, cred: Credential, secret: bytes) -> bool:
        entry = self._cache.get((cred.name, cred.secret_hash))
        if entry is None:
            return False
        digest, expires = entry
        if expires <= self._reactor.seconds():
            del self._cache[(cred.name, cred.secret_hash)]
            return False
        return hmac.compare_digest(digest, self._digest(secret))

    def _remember(self, cred: Credential, secret: bytes) -> None:
        now = self._reactor.seconds()
        if len(self._cache) >= self.max_cache:
            for key in [k for k, (_, exp) in self._cache.items() if exp <= now]:
                del self._cache[key]
            while len(self._cache) >= self.max_cache:
                # dicts keep insertion order: drop the oldest entry.
                del self._cache[next(iter(self._cache))]
        key = (cred.name, cred.secret_hash)
        self._cache.pop(key, None)
        self._cache[key] = (self._digest(secret), now + self.cache_ttl)


def _avatar_id(cred: Credential) -> bytes | tuple[()]:
    return cred.name.encode("utf-8")
