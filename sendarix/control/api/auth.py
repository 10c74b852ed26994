"""Who is calling: an API key (``Authorization: Bearer <key>``) made into a principal.

The key is the secret ``sendarix credentials add`` printed.  It names its credential,
so one stored hash is checked (in a thread, cached briefly like SMTP AUTH); the
credential is read again on every request, so revoking or rotating it takes effect at
once.  A principal sees only its tenant's data, except an ``admin`` key of the tenant
``*`` (an operator key), which sees every tenant.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.cred.error import UnauthorizedLogin

from sendarix.control.api.errors import UNAUTHORIZED, ApiError
from sendarix.ingress.auth import CredentialChecker
from sendarix.model.credential import Credential, api_key_name

#: The tenant whose admin keys are operator keys.
OPERATOR_TENANT = "*"


@frozen
class Principal:
    """An authenticated API caller."""

    credential: Credential

    @property
    def tenant(self) -> str:
        return self.credential.tenant

    @property
    def operator(self) -> bool:
        return self.credential.tenant == OPERATOR_TENANT and self.credential.has_scope("admin")

    def require(self, scope: str) -> None:
        """403 ``forbidden_scope`` unless the key holds ``scope`` (admin holds all)."""
        if not (self.credential.has_scope(scope) or self.credential.has_scope("admin")):
            raise ApiError(403, "forbidden_scope", f"this API key lacks the {scope!r} scope")

    def sees(self, tenant: str | None) -> bool:
        """May this caller see data of ``tenant``?"""
        return self.operator or tenant == self.tenant

    def tenant_filter(self, asked: str | None) -> str | None:
        """The tenant a listing is restricted to: the caller's own, or for an operator
        what was asked (None: every tenant)."""
        if self.operator:
            return asked
        if asked is not None and asked != self.tenant:
            raise ApiError(403, "forbidden_tenant", "an API key sees only its own tenant")
        return self.tenant


class ApiKeys:
    """Checks bearer keys against the credential store."""

    def __init__(self, checker: CredentialChecker) -> None:
        self._checker = checker

    async def principal(self, request: Any) -> Principal:
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.decode("latin-1").partition(" ")
        key = value.strip()
        if scheme.lower() != "bearer" or not key:
            raise UNAUTHORIZED
        return await self.from_key(key)

    async def from_key(self, key: str) -> Principal:
        """The principal of an API key given some other way (the dashboard's login
        form); 401 ``unauthorized`` (:class:`ApiError`) when it is not a valid key."""
        name = api_key_name(key)
        if name is None:
            raise UNAUTHORIZED
        try:
            credential = await self._checker.authenticate(name, key)
        except UnauthorizedLogin:
            raise UNAUTHORIZED from None
        return Principal(credential)
