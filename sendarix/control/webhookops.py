"""Webhook endpoints as an operator sees them, one implementation for
``sendarix webhooks`` and ``/v1/webhooks``: each endpoint with its state and the
outbox's counts, and replaying an endpoint's dead-lettered batches."""

from __future__ import annotations

from typing import Any

from sendarix.events.webhooks.endpoints import endpoints_from_config
from sendarix.stores.backends import Stores


async def webhook_rows(stores: Stores, tenant: str | None) -> list[dict[str, Any]]:
    """Every configured endpoint (of ``tenant``, or all): name, tenant, URL, events,
    whether disabled and why, and the outbox's counts (never the secrets)."""
    disabled = {d.endpoint: d for d in await stores.outbox.disabled()}
    rows: list[dict[str, Any]] = []
    for e in endpoints_from_config(stores.config, None):
        if tenant is not None and e.tenant != tenant:
            continue
        counts = await stores.outbox.counts(e.name)
        off = disabled.get(e.name)
        rows.append({
            "name": e.name, "tenant": e.tenant, "url": e.url, "events": sorted(e.events),
            "disabled_at": off.disabled_at if off else None,
            "disabled_reason": off.reason if off else None,
            **counts,
        })  # fmt: skip
    return rows


async def replay_dead(stores: Stores, endpoint: str, now: float) -> list[str]:
    """Put every dead-lettered batch of ``endpoint`` back in line; their ids."""
    replayed = []
    for dead in await stores.outbox.list_dead(endpoint, 1_000_000):
        if await stores.outbox.replay(dead.id, now):
            replayed.append(dead.id)
    return replayed
