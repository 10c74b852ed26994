"""SASL XOAUTH2 bearer tokens: the built-in HMAC-signed token checker.

XOAUTH2 (Google's format of the RFC 7628 idea) carries a user name and a bearer
token.  Which tokens are good is decided by whichever twisted.cred checker for
:obj:`sendarix.interfaces.IBearerToken` is registered on the submission portal, so an
operator can plug in, for example, a checker that asks an OAuth introspection
endpoint.  The built-in :obj:`HMACTokenChecker` accepts tokens minted by
``sendarix credentials token NAME``::

    v1.<credential name, base64url>.<expiry, POSIX seconds>.<fingerprint>.<HMAC>

The HMAC-SHA256 key is derived from the node secret; the fingerprint is a hash of
the credential's stored secret hash, so rotating or revoking the credential voids
its tokens at once.  Tokens expire; the clock is injected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from sendarix.config.secret import NodeSecret
from sendarix.interfaces import IBearerToken, ICredentialStore
from sendarix.model.credential import NAME_PATTERN, Credential

__all__ = ["HMACTokenChecker", "mint_token", "parse_xoauth2"]

_PURPOSE = "xoauth2"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _fingerprint(cred: Credential) -> str:
    return hashlib.sha256(cred.secret_hash.encode("utf-8")).hexdigest()[:16]


def _mac(secret: NodeSecret, payload: str) -> str:
    return _b64(hmac.new(secret.derive(_PURPOSE), payload.encode("ascii"), "sha256").digest())


def mint_token(secret: NodeSecret, cred: Credential, expires: float) -> str:
    """A bearer token for ``cred`` valid until ``expires`` (POSIX seconds)."""
    payload = f"v1.{_b64(cred.name.encode('utf-8'))}.{int(expires)}.{_fingerprint(cred)}"
    return f"{payload}.{_mac(secret, payload)}"


def parse_xoauth2(data: bytes) -> tuple[bytes, bytes]:
    """(user, token) from an XOAUTH2 client response
    ``user=<name>\\x01auth=Bearer <token>\\x01\\x01``; ValueError when malformed."""
    if not data.endswith(b"\x01\x01"):
        raise ValueError("XOAUTH2 response must end with two ^A")
    fields: dict[bytes, bytes] = {}
    for part in data[:-2].split(b"\x01"):
        key, eq, value = part.partition(b"=")
        if not eq or key in fields:
            raise ValueError("malformed XOAUTH2 field")
        fields[key] = value
    user = fields.get(b"user", b"")
    scheme, _, token = fields.get(b"auth", b"").partition(b" ")
    if not user or scheme.lower() != b"bearer" or not token.strip():
        raise ValueError("XOAUTH2 needs user= and auth=Bearer <token>")
    return user, token.strip()


@implementer(ICredentialsChecker)
class HMACTokenChecker:
    """Accepts tokens made by :obj:`mint_token` with this node secret, for an active
    credential with the ``smtp`` scope whose secret has not changed since."""

    credentialInterfaces = (IBearerToken,)

    def __init__(self, store: ICredentialStore, secret: NodeSecret, clock: IReactorTime) -> None:
        self._store = store
        self._secret = secret
        self._clock = clock

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        """Deferred credential name (bytes), or a Failure of UnauthorizedLogin."""
        return Deferred.fromCoroutine(self._check(credentials.username, credentials.token))

    async def _check(self, username: bytes, token: bytes) -> bytes | tuple[()]:
        try:
            text = token.decode("ascii")
            version, b64name, expiry, fingerprint, mac = text.split(".")
            name = _unb64(b64name).decode("utf-8")
            expires = int(expiry)
        except (UnicodeDecodeError, ValueError, binascii.Error):
            raise UnauthorizedLogin("malformed token") from None
        payload = f"{version}.{b64name}.{expiry}.{fingerprint}"
        if version != "v1" or not hmac.compare_digest(mac, _mac(self._secret, payload)):
            raise UnauthorizedLogin("bad token signature")
        if username.decode("utf-8", "replace") != name or not NAME_PATTERN.fullmatch(name):
            raise UnauthorizedLogin("token is for another user")
        if expires <= self._clock.seconds():
            raise UnauthorizedLogin("token expired")
        cred = await self._store.get(name)
        if (
            cred is None
            or not cred.active
            or not cred.has_scope("smtp")
            or not hmac.compare_digest(fingerprint, _fingerprint(cred))
        ):
            raise UnauthorizedLogin("credential revoked, rotated or without smtp scope")
        return name.encode("utf-8")
