"""twisted.cred wiring for SMTP AUTH: the checker that verifies a name and secret
against the credential store, the realm that turns a checked name into its
:class:`Credential`, and the portal built from them."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from attrs import define
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from sendarix.interfaces import ICredentialStore, ISubmitter
from sendarix.model.credential import NAME_PATTERN, Credential
from sendarix.stores.credentials import DUMMY_HASH, in_thread, secret_bytes, verify_secret


@implementer(IRealm)
@define
class CredentialRealm:
    """Hands out the authenticated client's Credential as its ISubmitter avatar."""

    _store: ICredentialStore

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter avatars are offered")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)

        def found(cred: Credential | None) -> tuple[Any, Credential, Any]:
            if cred is None or not cred.active:
                raise UnauthorizedLogin("no such active credential")
            return (ISubmitter, cred, lambda: None)

        d: Deferred[Any] = self._store.get(name)
        return d.addCallback(found)


def submission_portal(
    store: ICredentialStore, reactor: Any = None, token_checker: ICredentialsChecker | None = None
) -> Portal:
    """A portal checking SMTP AUTH usernames/secrets against ``store``, and XOAUTH2
    bearer tokens with ``token_checker`` when one is given."""
    checkers: list[ICredentialsChecker] = [CredentialChecker(store, reactor)]
    if token_checker is not None:
        checkers.append(token_checker)
    return Portal(CredentialRealm(store), checkers)


@implementer(ICredentialsChecker)
class CredentialChecker:
    """Checks SMTP AUTH user name + password against an :obj:`ICredentialStore`.

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
        """Deferred active :obj:`Credential` for ``name`` and ``secret`` (also for API keys),
        or a Failure of UnauthorizedLogin."""
        return Deferred.fromCoroutine(self._request(name, secret))

    async def _request(self, raw_name: str | bytes, raw_secret: str | bytes) -> Credential:
        try:
            name = raw_name.decode("utf-8") if isinstance(raw_name, bytes) else raw_name
        except UnicodeDecodeError:
            name = ""
        secret = secret_bytes(raw_secret)
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
        stored = cred.secret_hash if cred is not None else DUMMY_HASH
        ok = await in_thread(self._threads, verify_secret, secret, stored)
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
