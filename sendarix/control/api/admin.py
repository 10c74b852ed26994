"""The administration routes: credentials (and so API keys), sending domains, tenants
and webhook endpoints.

They call the same operations as ``sendarix credentials``, ``sendarix domains``,
``sendarix tenants`` and ``sendarix webhooks``.
An ``admin`` key manages its own tenant only; an operator key (tenant ``*``) manages
every tenant and names the tenant in the request.
"""

from __future__ import annotations

import os
from typing import Any

from sendarix.config.secret import NodeSecret
from sendarix.control.api.auth import OPERATOR_TENANT, Principal
from sendarix.control.api.body import json_body
from sendarix.control.api.errors import ApiError, invalid, not_found
from sendarix.control.domainops import (
    DomainOpError,
    add_domain,
    check_dns,
    record_lines,
    verify_domain,
)
from sendarix.control.tenantops import resume_tenant, tenant_names, tenant_summary
from sendarix.control.webhookops import (
    WebhookOpError,
    add_endpoint,
    find_endpoint,
    remove_endpoint,
    replay_dead,
    send_test,
    webhook_rows,
)
from sendarix.model.credential import SCOPES
from sendarix.model.domain import SendingDomain
from sendarix.stores.credentials import CredentialExistsError, CredentialNotFoundError

_DOMAIN_ERRORS = {"conflict": 409, "not_found": 404, "invalid": 422}


def _webhook_error(e: WebhookOpError) -> ApiError:
    if e.kind == "invalid":
        return invalid(e.field or "webhook", e.message)
    if e.kind == "no_secret":
        return ApiError(503, "no_node_secret", e.message)
    return ApiError({"not_found": 404, "conflict": 409}.get(e.kind, 400), e.kind, e.message)


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(key, "must be a string or a list of strings")
    return value


def _tenant_for(principal: Principal, asked: Any) -> str:
    """The tenant a new object belongs to: the key's own, or for an operator the one
    named (required)."""
    if asked is not None and not isinstance(asked, str):
        raise invalid("tenant", "must be a string")
    if principal.operator:
        if not asked:
            raise invalid("tenant", "is required with an operator key")
        return str(asked)
    if asked is not None and asked != principal.tenant:
        raise ApiError(403, "forbidden_tenant", "an API key manages only its own tenant")
    return principal.tenant


def _domain_json(sd: SendingDomain, records: bool = False) -> dict[str, Any]:
    out = sd.to_dict()
    if records:
        out["records"] = record_lines(sd)
    return out


class AdminRoutes:
    """Route handlers mixed into the API application (which supplies ``stores``,
    ``secret`` and ``clock``)."""

    stores: Any
    secret: NodeSecret | None
    clock: Any

    # -- credentials -----------------------------------------------------------------

    async def list_credentials(self, request: Any, principal: Principal) -> tuple[int, Any]:
        tenant = None if principal.operator else principal.tenant
        found = await self.stores.credentials.list(tenant)
        return 200, {"credentials": [c.to_dict() for c in found]}

    async def add_credential(self, request: Any, principal: Principal) -> tuple[int, Any]:
        body = json_body(request)
        unknown = set(body) - {"name", "tenant", "scopes", "domains", "allow_ip", "rate",
                               "sandbox"}
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        name = body.get("name")
        if not isinstance(name, str):
            raise invalid("name", "is required")
        tenant = _tenant_for(principal, body.get("tenant"))
        scopes = _strings(body, "scopes") if "scopes" in body else ["smtp", "send"]
        if set(scopes) - SCOPES:
            raise invalid("scopes", f"must be among {', '.join(sorted(SCOPES))}")
        if tenant == OPERATOR_TENANT and not principal.operator:
            raise ApiError(403, "forbidden_tenant", "only an operator key makes operator keys")
        rate = body.get("rate")
        if rate is not None and not isinstance(rate, str | int):
            raise invalid("rate", "must be like \"100/min\"")
        sandbox = body.get("sandbox", False)
        if not isinstance(sandbox, bool):
            raise invalid("sandbox", "must be true or false")
        try:
            cred, secret = await self.stores.credentials.add(
                name, tenant=tenant, domains=_strings(body, "domains"),
                networks=_strings(body, "allow_ip"), scopes=scopes, rate=rate,
                sandbox=sandbox,
            )
        except CredentialExistsError:
            raise ApiError(409, "conflict", f"credential {name} exists") from None
        except ValueError as e:
            raise invalid("credential", str(e)) from None
        return 201, {**cred.to_dict(), "secret": secret}

    async def _own_credential(self, principal: Principal, name: str) -> Any:
        cred = await self.stores.credentials.get(name)
        if cred is None or not cred.active or not principal.sees(cred.tenant):
            raise not_found(f"credential {name}")
        return cred

    async def revoke_credential(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        await self._own_credential(principal, name)
        await self.stores.credentials.revoke(name)
        return 200, {"name": name, "revoked": True}

    async def rotate_credential(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        await self._own_credential(principal, name)
        try:
            secret = await self.stores.credentials.rotate(name)
        except CredentialNotFoundError:
            raise not_found(f"credential {name}") from None
        return 200, {"name": name, "secret": secret}

    # -- tenants -------------------------------------------------------------------------

    async def list_tenants(self, request: Any, principal: Principal) -> tuple[int, Any]:
        """Every tenant for an operator; a tenant's own otherwise."""
        now = self.clock.seconds()
        names = await tenant_names(self.stores, self.stores.config)
        if not principal.operator:
            names = [principal.tenant]
        return 200, {"tenants": [await tenant_summary(self.stores, self.stores.config, n, now)
                                 for n in names]}

    async def get_tenant(self, request: Any, principal: Principal, name: str) -> tuple[int, Any]:
        if not principal.sees(name) or name not in await tenant_names(
            self.stores, self.stores.config
        ):
            raise not_found(f"tenant {name}")
        return 200, await tenant_summary(self.stores, self.stores.config, name,
                                         self.clock.seconds())

    async def release_tenant(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        if not principal.operator:
            raise ApiError(403, "forbidden_scope", "releasing a tenant needs an operator key")
        if not await resume_tenant(self.stores, name, self.clock.seconds()):
            raise not_found(f"hold of tenant {name}")
        return 200, {"name": name, "resumed": True}

    # -- webhooks ------------------------------------------------------------------------

    async def list_webhooks(self, request: Any, principal: Principal) -> tuple[int, Any]:
        tenant = None if principal.operator else principal.tenant
        return 200, {"webhooks": await webhook_rows(self.stores, tenant)}

    async def _own_webhook(self, principal: Principal, name: str) -> None:
        try:
            await find_endpoint(self.stores, name, None if principal.operator else principal.tenant)
        except WebhookOpError as e:
            raise _webhook_error(e) from None

    async def add_webhook(self, request: Any, principal: Principal) -> tuple[int, Any]:
        """A new endpoint of the key's tenant (an operator names it); its ``whsec_``
        secret is in this answer only."""
        body = json_body(request)
        unknown = set(body) - {"tenant", "url", "events", "retry_schedule"}
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        tenant = _tenant_for(principal, body.get("tenant"))
        if "events" not in body:
            raise invalid("events", "is required (event types, or [\"*\"] for all)")
        events = _strings(body, "events")
        schedule = body.get("retry_schedule")
        if schedule is not None and (
            not isinstance(schedule, list)
            or not all(isinstance(x, str | int | float) and not isinstance(x, bool)
                       for x in schedule)
        ):
            raise invalid("retry_schedule", "must be a list of durations like \"5m\"")
        try:
            row, secret = await add_endpoint(
                self.stores, self.secret, tenant, body.get("url"), events,
                self.clock.seconds(), schedule,
            )
        except WebhookOpError as e:
            raise _webhook_error(e) from None
        return 201, {**row, "secret": secret}

    async def remove_webhook(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        try:
            done = await remove_endpoint(
                self.stores, name, self.clock.seconds(),
                None if principal.operator else principal.tenant,
            )
        except WebhookOpError as e:
            raise _webhook_error(e) from None
        return 200, done

    async def test_webhook(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        """A signed test POST to the endpoint now; what its receiver answered."""
        from twisted.internet import reactor

        try:
            result = await send_test(
                self.stores, self.secret, name, reactor, os.environ,
                None if principal.operator else principal.tenant,
            )
        except WebhookOpError as e:
            raise _webhook_error(e) from None
        return 200, result

    async def replay_webhook(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        await self._own_webhook(principal, name)
        replayed = await replay_dead(self.stores, name, self.clock.seconds())
        return 200, {"name": name, "replayed": replayed}

    async def enable_webhook(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        await self._own_webhook(principal, name)
        if not await self.stores.outbox.enable(name):
            raise ApiError(409, "conflict", f"webhook {name} is not disabled")
        return 200, {"name": name, "enabled": True}

    # -- sending domains ---------------------------------------------------------------

    async def list_domains(self, request: Any, principal: Principal) -> tuple[int, Any]:
        found = await self.stores.domains.list()
        visible = [d for d in found if principal.operator or d.tenant in (None, principal.tenant)]
        return 200, {"domains": [_domain_json(d) for d in visible]}

    async def add_domain(self, request: Any, principal: Principal) -> tuple[int, Any]:
        body = json_body(request)
        unknown = set(body) - {"domain", "tenant", "selector", "algorithm"}
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        domain = body.get("domain")
        if not isinstance(domain, str) or "." not in domain or len(domain) > 253:
            raise invalid("domain", "must be a domain name")
        if principal.operator:
            tenant = body.get("tenant")  # an operator may add a domain for any tenant
            if tenant is not None and not isinstance(tenant, str):
                raise invalid("tenant", "must be a string")
        else:
            tenant = _tenant_for(principal, body.get("tenant"))
        selector = body.get("selector")
        algorithm = body.get("algorithm", "dual")
        if selector is not None and not isinstance(selector, str):
            raise invalid("selector", "must be a string")
        if not isinstance(algorithm, str):
            raise invalid("algorithm", "must be a string")
        if self.secret is None:
            raise ApiError(503, "no_node_secret", "the node has no secret to encrypt DKIM keys "
                           "with ([node] secret_key_env)")
        existing = await self.stores.domains.get(domain.lower().rstrip("."))
        if existing is not None and not principal.sees(existing.tenant):
            raise ApiError(409, "conflict", f"domain {domain} belongs to another tenant")
        try:
            sd = await add_domain(self.stores, self.secret, domain.lower().rstrip("."), tenant,
                                  selector, algorithm, self.clock.seconds())
        except DomainOpError as e:
            raise ApiError(_DOMAIN_ERRORS[e.kind], e.kind, str(e)) from None
        return 201, _domain_json(sd, records=True)

    async def check_domain(
        self, request: Any, principal: Principal, domain: str
    ) -> tuple[int, Any]:
        """SPF, DKIM and DMARC as DNS has them, with advice (``sendarix domains check``)."""
        existing = await self.stores.domains.get(domain)
        if existing is None or not principal.sees(existing.tenant):
            raise not_found(f"domain {domain}")
        try:
            findings = await check_dns(self.stores, domain)
        except DomainOpError as e:
            raise ApiError(_DOMAIN_ERRORS[e.kind], e.kind, str(e)) from None
        problems = sum(1 for f in findings if f.status in ("missing", "wrong"))
        return 200, {"domain": domain, "problems": problems,
                     "findings": [f.to_dict() for f in findings]}

    async def verify_domain(
        self, request: Any, principal: Principal, domain: str
    ) -> tuple[int, Any]:
        existing = await self.stores.domains.get(domain)
        if existing is None or not (principal.operator or existing.tenant == principal.tenant):
            raise not_found(f"domain {domain}")
        try:
            sd, results = await verify_domain(self.stores, domain, self.clock.seconds())
        except DomainOpError as e:
            raise ApiError(_DOMAIN_ERRORS[e.kind], e.kind, str(e)) from None
        keys = [{"record": name, "matches": reason is None, "problem": reason}
                for name, reason in results]
        return 200, {"domain": sd.domain, "verified": all(k["matches"] for k in keys),
                     "keys": keys}
