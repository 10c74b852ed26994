"""What every credential store shares: secret hashing (scrypt) and the add and rotate flow.

A credential is a name (the SMTP AUTH user name) plus a random secret (the password,
also used as the API key).  Only a salted scrypt hash of the secret is stored; the
secret is shown once, when the credential is created or rotated.  Hashing and
verification are deliberately slow (~50 ms), so they always run in a worker thread,
never on the reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from attrs import evolve
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger

from sendarix.model.credential import (
    DEFAULT_SCOPES,
    Credential,
    IPNetwork,
    api_key,
    draft_credential,
)

log = Logger()
T = TypeVar("T")


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


def new_secret(name: str) -> str:
    """A fresh secret for credential ``name``: 32 random bytes (URL-safe base64, 43
    characters) behind the name, so the same string is the credential's API key."""
    return api_key(name, secrets.token_urlsafe(32))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # maxmem must exceed scrypt's 128*r*n bytes of working memory, else OpenSSL refuses.
    maxmem = 128 * r * n * (p + 1) + (1 << 20)
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def hash_secret(secret: str | bytes) -> str:
    """A salted scrypt hash of ``secret``: ``scrypt$N$r$p$<b64 salt>$<b64 hash>``.

    Slow on purpose: call it in a thread.
    """
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = _scrypt(secret_bytes(secret), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
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
    actual = _scrypt(secret_bytes(secret), salt, n, r, p, len(expected))
    return hmac.compare_digest(actual, expected)


# A syntactically valid hash that matches nothing: verifying against it costs as much
# as a real verification, so an unknown user name cannot be told apart by timing.
DUMMY_HASH = (
    f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
    f"{_b64(bytes(SCRYPT_SALT_BYTES))}${_b64(bytes(SCRYPT_KEY_BYTES))}"
)


# -- the value -------------------------------------------------------------------


# -- what every store does ------------------------------------------------------


async def new_hashed_secret(threads: IReactorThreads | None, name: str) -> tuple[str, str]:
    """A fresh secret for ``name`` and its hash, ``(secret, hash)``; hashed in
    ``threads``'s pool (None: the global reactor's), never on the reactor thread."""
    secret = new_secret(name)
    return secret, await in_thread(threads, hash_secret, secret)


async def with_new_secret(
    threads: IReactorThreads | None, draft: Credential
) -> tuple[Credential, str]:
    """``draft`` with the hash of a fresh secret, and that secret."""
    secret, hashed = await new_hashed_secret(threads, draft.name)
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
        :obj:`CredentialExistsError` when the name is taken.
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
        """Store the new ``cred``; :obj:`CredentialExistsError` when the name is taken."""
        raise NotImplementedError

    def rotate(self, name: str) -> Deferred[str]:
        """Replace the secret; Deferred new secret.  The old secret stops working at once.

        Fails with :obj:`CredentialNotFoundError` for an unknown or revoked credential.
        """
        return Deferred.fromCoroutine(self._rotate(name))

    async def _rotate(self, name: str) -> str:
        secret, hashed = await new_hashed_secret(self._threads, name)
        await self._replace_hash(name, hashed)
        log.info("credential {name} rotated", name=name)
        return secret

    async def _replace_hash(self, name: str, hashed: str) -> None:
        """Store ``hashed`` as the secret hash of active credential ``name``;
        :obj:`CredentialNotFoundError` when there is none."""
        raise NotImplementedError


# -- the SQLite store ------------------------------------------------------------


def in_thread(threads: IReactorThreads | None, fn: Callable[..., T], *args: Any) -> Deferred[T]:
    if threads is None:
        return deferToThread(fn, *args)
    return deferToThreadPool(threads, threads.getThreadPool(), fn, *args)  # type: ignore[arg-type]


# -- the twisted.cred checker ----------------------------------------------------


