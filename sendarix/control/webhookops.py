"""Webhook endpoints as an operator manages them, one implementation for
``sendarix webhooks`` and ``/v1/webhooks``: listing every endpoint (configured and
added at run time) with its state and the outbox's counts, adding and removing
endpoints, sending a test POST, and replaying an endpoint's dead-lettered batches.

An endpoint added here gets a generated name and a new ``whsec_`` secret, returned
once; the secret is kept sealed under a key derived from the node secret (signing
needs it in the clear).  Running nodes pick the change up within seconds.  An
endpoint of ``[[webhook]]`` is the configuration's: it cannot be removed here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from sendarix.config.errors import ConfigError
from sendarix.config.secret import NodeSecret
from sendarix.config.units import parse_duration
from sendarix.control.tenantops import OPERATOR_TENANT, tenant_names
from sendarix.events.webhooks.dispatcher import describe_error, guarded_agent, post_signed
from sendarix.events.webhooks.endpoints import (
    KEY_PURPOSE,
    SealError,
    WebhookEndpoint,
    endpoint_from_config,
    endpoint_from_stored,
    endpoints_from_config,
    seal,
)
from sendarix.events.webhooks.signature import generate_secret
from sendarix.model.event import EVENT_TYPES, format_timestamp
from sendarix.model.webhook import (
    STANDARD_RETRY_SCHEDULE,
    StoredWebhook,
    new_batch_id,
    new_endpoint_name,
)
from sendarix.stores.backends import Stores

#: The longest URL an endpoint may have.
MAX_URL = 2048
#: Seconds a test POST may take.
TEST_TIMEOUT = 10.0


class WebhookOpError(Exception):
    """An operation that cannot be done: ``kind`` is ``invalid`` (``field`` names what
    is wrong), ``not_found``, ``conflict`` or ``no_secret``."""

    def __init__(self, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


# -- listing -------------------------------------------------------------------------


def _configured(stores: Stores) -> list[WebhookEndpoint]:
    return list(endpoints_from_config(stores.config, None))


async def _stored(stores: Stores, tenant: str | None) -> list[StoredWebhook]:
    return list(await stores.webhook_endpoints.list(tenant))


async def webhook_rows(stores: Stores, tenant: str | None) -> list[dict[str, Any]]:
    """Every endpoint (of ``tenant``, or all), configured ones first: name, tenant,
    URL, events, ``source`` (``config`` or ``stored``), when it was added, whether
    disabled and why, and the outbox's counts (never the secrets)."""
    disabled = {d.endpoint: d for d in await stores.outbox.disabled()}
    found: list[tuple[str, float | None, WebhookEndpoint]] = [
        ("config", None, e) for e in _configured(stores)
    ]
    names = {e.name for _, _, e in found}
    found += [
        ("stored", s.created, endpoint_from_stored(s, None))
        for s in await _stored(stores, tenant) if s.name not in names
    ]
    rows: list[dict[str, Any]] = []
    for source, created, e in found:
        if tenant is not None and e.tenant != tenant:
            continue
        counts = await stores.outbox.counts(e.name)
        off = disabled.get(e.name)
        rows.append({
            "name": e.name, "tenant": e.tenant, "url": e.url, "events": sorted(e.events),
            "source": source, "created": created,
            "disabled_at": off.disabled_at if off else None,
            "disabled_reason": off.reason if off else None,
            **counts,
        })  # fmt: skip
    return rows


async def find_endpoint(
    stores: Stores, name: str, tenant: str | None = None
) -> tuple[str, WebhookEndpoint]:
    """``(source, endpoint)`` of ``name`` (without its keys), when it belongs to
    ``tenant`` (None: to anyone); WebhookOpError ``not_found`` otherwise."""
    for e in _configured(stores):
        if e.name == name and tenant in (None, e.tenant):
            return "config", e
    stored = await stores.webhook_endpoints.get(name)
    if stored is not None and tenant in (None, stored.tenant):
        return "stored", endpoint_from_stored(stored, None)
    raise WebhookOpError("not_found", f"webhook {name} not found")


# -- adding and removing ---------------------------------------------------------------


def check_url(url: object) -> str:
    """``url`` when it is an http:// or https:// URL with a host; WebhookOpError
    naming ``url`` otherwise."""
    if not isinstance(url, str) or not url:
        raise WebhookOpError("invalid", "is required (an http:// or https:// URL)", "url")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise WebhookOpError("invalid", f"is not a URL: {url!r}", "url") from None
    if len(url) > MAX_URL or any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookOpError("invalid", f"must be a URL of at most {MAX_URL} characters "
                             "without spaces", "url")
    if parts.scheme.lower() not in ("http", "https") or not hostname:
        raise WebhookOpError("invalid", f"must be an http:// or https:// URL with a host, "
                             f"not {url!r}", "url")
    return url


def check_events(events: Iterable[object]) -> tuple[str, ...]:
    """The event types asked for (``*`` for all), in order; WebhookOpError naming
    ``events`` when one is unknown or there is none."""
    names = list(events)
    if not names:
        raise WebhookOpError("invalid", "name at least one event type", "events")
    for name in names:
        if name != "*" and name not in EVENT_TYPES:
            raise WebhookOpError(
                "invalid", f"unknown event type {name!r} (one of {', '.join(EVENT_TYPES)}, "
                "or *)", "events",
            )
    if "*" in names:
        return EVENT_TYPES
    return tuple(dict.fromkeys(str(n) for n in names))


def check_schedule(values: Sequence[object] | None) -> tuple[float, ...]:
    """A retry schedule of durations (seconds after the first attempt, each at least
    the one before); the standard one for None."""
    if values is None:
        return STANDARD_RETRY_SCHEDULE
    if not values or len(values) > 50:
        raise WebhookOpError("invalid", "list 1 to 50 durations", "retry_schedule")
    out: list[float] = []
    for i, value in enumerate(values):
        try:
            seconds = parse_duration(value, f"retry_schedule[{i}]")
        except ConfigError as e:
            raise WebhookOpError("invalid", e.message, e.key) from None
        if seconds < 0 or seconds > 30 * 86400 or (out and seconds < out[-1]):
            raise WebhookOpError(
                "invalid", "each entry is 0 to 30 days and at least the one before",
                f"retry_schedule[{i}]",
            )
        out.append(seconds)
    return tuple(out)


def sealing_key(secret: NodeSecret | None) -> bytes:
    """The key that seals and opens stored webhook secrets."""
    if secret is None:
        raise WebhookOpError(
            "no_secret", "the node secret is not set: it encrypts the secrets of webhook "
            "endpoints ([node] secret_key_env)",
        )
    return secret.derive(KEY_PURPOSE)


async def check_tenant(stores: Stores, tenant: str) -> str:
    """``tenant`` when the node knows it (configured, named by a listener, or holding
    a credential); never the operator tenant ``*``, which sends no mail."""
    if tenant == OPERATOR_TENANT:
        raise WebhookOpError("invalid", "the operator tenant * has no events of its own; "
                             "name a tenant", "tenant")
    if tenant not in await tenant_names(stores, stores.config):
        raise WebhookOpError("invalid", f"no tenant {tenant!r}", "tenant")
    return tenant


async def add_endpoint(
    stores: Stores, secret: NodeSecret | None, tenant: str, url: object,
    events: Iterable[object], now: float, retry_schedule: Sequence[object] | None = None,
) -> tuple[dict[str, Any], str]:
    """Add an endpoint of ``tenant``: ``(its row, its new whsec_ secret)``."""
    key = sealing_key(secret)
    checked_url = check_url(url)
    types = check_events(events)
    schedule = check_schedule(retry_schedule)
    await check_tenant(stores, tenant)
    taken = {e.name for e in _configured(stores)}
    name = new_endpoint_name(now)
    while name in taken:  # a [[webhook]] may have any name, even one like these
        name = new_endpoint_name(now)
    whsec = generate_secret()
    stored = StoredWebhook(
        name=name, tenant=tenant, url=checked_url, events=types, retry_schedule=schedule,
        created=now, sealed=seal(key, name, [whsec]),
    )
    if not await stores.webhook_endpoints.add(stored):
        raise WebhookOpError("conflict", f"webhook {name} exists")
    row = {
        "name": name, "tenant": tenant, "url": checked_url, "events": sorted(types),
        "retry_schedule": list(schedule), "source": "stored", "created": now,
    }  # fmt: skip
    return row, whsec


async def remove_endpoint(
    stores: Stores, name: str, now: float, tenant: str | None = None
) -> dict[str, Any]:
    """Remove an endpoint added at run time (of ``tenant``, when given): from then on
    no event is queued for it on any node, and its queued events and batches (live
    and dead) are dropped; ``{"name", "removed": true, "dropped": counts}``."""
    source, _ = await find_endpoint(stores, name, tenant)
    if source == "config":
        raise WebhookOpError(
            "conflict", f"webhook {name} comes from the configuration ([[webhook]]): "
            "remove it there",
        )
    # Disabled first: a node that has not seen the removal yet queues nothing more
    # for it (the outbox skips disabled endpoints in the same write).
    await stores.outbox.disable(name, "removed", now)
    dropped = await stores.outbox.purge(name)
    await stores.webhook_endpoints.remove(name)
    return {"name": name, "removed": True, "dropped": dropped}


# -- testing ---------------------------------------------------------------------------


async def signing_endpoint(
    stores: Stores, secret: NodeSecret | None, name: str, tenant: str | None,
    environ: Mapping[str, str],
) -> WebhookEndpoint:
    """Endpoint ``name`` with its signing keys: a configured one's from ``environ``,
    a stored one's opened with the node secret."""
    for index, webhook in enumerate(stores.config.webhooks):
        if webhook.endpoint_name == name and tenant in (None, webhook.tenant):
            try:
                return endpoint_from_config(webhook, index, environ)
            except ConfigError as e:
                raise WebhookOpError("no_secret", str(e)) from None
    stored = await stores.webhook_endpoints.get(name)
    if stored is None or tenant not in (None, stored.tenant):
        raise WebhookOpError("not_found", f"webhook {name} not found")
    try:
        return endpoint_from_stored(stored, sealing_key(secret))
    except SealError as e:
        raise WebhookOpError("no_secret", str(e)) from None


def probe_body(endpoint: WebhookEndpoint, now: float) -> bytes:
    """What a test POST carries: ``{"type": "test", "timestamp", "data": {endpoint,
    tenant}}`` (no events: a receiver can tell it from real traffic by its type)."""
    return json.dumps(
        {"type": "test", "timestamp": format_timestamp(now),
         "data": {"endpoint": endpoint.name, "tenant": endpoint.tenant}},
        separators=(",", ":"),
    ).encode()


async def send_test(
    stores: Stores, secret: NodeSecret | None, name: str, reactor: Any,
    environ: Mapping[str, str], tenant: str | None = None, timeout: float = TEST_TIMEOUT,
) -> dict[str, Any]:
    """POST a signed test body to endpoint ``name`` now, through the same address
    guard (``[webhooks] allow_private``) and signing as every delivery:
    ``{"name", "url", "webhook_id", "ok", "status", "error"}`` (``ok`` when the
    receiver answered 2xx)."""
    endpoint = await signing_endpoint(stores, secret, name, tenant, environ)
    agent, pool = guarded_agent(
        reactor, stores.config.webhook_options.allow_private, connect_timeout=timeout
    )
    now = reactor.seconds()
    msg_id = new_batch_id(now)
    status: int | None = None
    error: str | None = None
    try:
        response = await post_signed(agent, reactor, endpoint, msg_id, probe_body(endpoint, now),
                                     timeout)
        status = int(response.code)
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except Exception as e:  # noqa: BLE001 - every failure is the answer to report
        error = describe_error(e)
    finally:
        await pool.closeCachedConnections()
    return {"name": name, "url": endpoint.url, "webhook_id": msg_id, "ok": error is None,
            "status": status, "error": error}


# -- replaying ---------------------------------------------------------------------------


async def replay_dead(stores: Stores, endpoint: str, now: float) -> list[str]:
    """Put every dead-lettered batch of ``endpoint`` back in line; their ids."""
    replayed = []
    for dead in await stores.outbox.list_dead(endpoint, 1_000_000):
        if await stores.outbox.replay(dead.id, now):
            replayed.append(dead.id)
    return replayed
