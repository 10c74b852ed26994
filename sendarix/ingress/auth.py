"""twisted.cred wiring for SMTP AUTH: the realm that turns a checked credential name
into its L{Credential}, and the portal built from the credential store."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ICredentialStore, ISubmitter
from sendarix.stores.credentials import Credential, CredentialChecker


@implementer(IRealm)
class CredentialRealm:
    """Hands out the authenticated client's Credential as its ISubmitter avatar."""

    def __init__(self, store: ICredentialStore) -> None:
        self._store = store

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
