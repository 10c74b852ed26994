"""Tenants as an operator sees them, one implementation for ``sendarix tenants`` and
``GET /v1/tenants``: each tenant's settings, credentials and the last day's figures
(from the hourly statistics), with its complaint rate against its limit.
"""

from __future__ import annotations

from typing import Any

from sendarix.config.settings import Config
from sendarix.events.guard import split_hold_key
from sendarix.events.stats import hour_of
from sendarix.stores.backends import Stores

#: The tenant whose admin keys are operator keys; it sends no mail of its own.
OPERATOR_TENANT = "*"

#: The figures of the last day a summary shows.
FIGURES = ("accepted", "delivered", "deferred", "bounced", "complained", "rejected")


async def tenant_names(stores: Stores, config: Config) -> list[str]:
    """Every tenant the node knows: configured, named by a listener, or holding a
    credential (and ``default``)."""
    names = {"default", *config.tenants, *(lc.tenant for lc in config.listeners)}
    names.update(c.tenant for c in await stores.credentials.list() if c.active)
    names.discard(OPERATOR_TENANT)
    return sorted(names)


async def tenant_summary(stores: Stores, config: Config, name: str, now: float) -> dict[str, Any]:
    """One tenant: settings, active credentials, the last 24 hours' figures and the
    complaint rate (complaints over deliveries; None without deliveries)."""
    settings = config.tenant(name)
    credentials = [c.name for c in await stores.credentials.list(name) if c.active]
    rows = await stores.stats.query(hour_of(now - 86400.0), now + 1, name)
    figures = dict.fromkeys(FIGURES, 0)
    for _, _, kind, _, n in rows:
        if kind in figures:
            figures[kind] += n
    delivered = figures["delivered"]
    rate = figures["complained"] / delivered if delivered else None
    holds = await stores.holds.all()
    held = holds.get(name)
    providers_held = {
        provider: reason for (tenant, provider), (reason, _) in
        ((split_hold_key(key), value) for key, value in holds.items())
        if tenant == name and provider is not None
    }
    return {
        "name": name,
        "configured": name in config.tenants,
        "egress_pool": settings.egress_pool,
        "rate": settings.rate,
        "quota": settings.quota,
        "suppress_hard_bounces": settings.suppress_hard_bounces,
        "max_complaint_rate": settings.max_complaint_rate,
        "credentials": credentials,
        "last_24h": figures,
        "complaint_rate": rate,
        "over_complaint_limit": rate is not None and rate > settings.max_complaint_rate,
        "held": held[0] if held else None,
        "held_since": held[1] if held else None,
        "held_providers": providers_held,
    }


async def resume_tenant(stores: Stores, name: str, now: float) -> bool:
    """Release a held tenant's mail, to every provider (the guard leaves it alone for
    a day); False when none of it was held.  Nodes pick the release up within
    seconds."""
    keys = [name] + [key for key in await stores.holds.all()
                     if split_hold_key(key)[0] == name and key != name]
    released = [bool(await stores.holds.release(key, now)) for key in keys]
    return any(released)
