"""``sendarix tenants``: each tenant's settings, credentials and recent figures."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from sendarix.control.cli.common import (
    CommandError,
    Output,
    render_table,
    tenant_arg,
    text_lines,
    to_json,
)
from sendarix.control.tenantops import resume_tenant, tenant_names, tenant_summary
from sendarix.stores.backends import Stores


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


async def _tenants_list(args: argparse.Namespace, stores: Stores) -> Output:
    now = time.time()
    summaries = [await tenant_summary(stores, stores.config, name, now)
                 for name in await tenant_names(stores, stores.config)]
    if args.json:
        return text_lines(to_json(summaries))
    rows = [(s["name"], str(len(s["credentials"])), str(s["quota"] or "-"),
             str(s["last_24h"]["accepted"]), str(s["last_24h"]["delivered"]),
             str(s["last_24h"]["bounced"]), _rate(s["complaint_rate"]),
             "HELD" if s["held"] else
             "HELD at " + ", ".join(sorted(s["held_providers"])) if s["held_providers"] else
             ("OVER LIMIT" if s["over_complaint_limit"] else ""))
            for s in summaries]
    return text_lines(render_table(
        ("tenant", "credentials", "quota/day", "accepted 24h", "delivered", "bounced",
         "complaints", ""), rows, right=(1, 2, 3, 4, 5, 6)))


async def _tenants_show(args: argparse.Namespace, stores: Stores) -> Output:
    known = await tenant_names(stores, stores.config)
    if args.name not in known:
        raise CommandError(f"no tenant {args.name} (known: {', '.join(known)})")
    s = await tenant_summary(stores, stores.config, args.name, time.time())
    if args.json:
        return text_lines(to_json(s))
    figures = ", ".join(f"{k} {v}" for k, v in s["last_24h"].items())
    return text_lines(
        f"tenant {s['name']}" + ("" if s["configured"] else " (not configured: defaults)"),
        f"egress pool: {s['egress_pool'] or '-'}",
        f"rate: {s['rate'] or '-'}   quota: {s['quota'] or '-'} per day",
        f"suppress hard bounces: {'yes' if s['suppress_hard_bounces'] else 'no'}",
        f"credentials: {', '.join(s['credentials']) or '-'}",
        f"last 24 hours: {figures}",
        f"complaint rate: {_rate(s['complaint_rate'])} (limit "
        f"{s['max_complaint_rate'] * 100:.2f}%)"
        + (" OVER THE LIMIT" if s["over_complaint_limit"] else ""),
        f"held: {s['held']}" if s["held"] else "held: no",
        *(f"held at {provider}: {reason}" for provider, reason in
          sorted(s["held_providers"].items())),
    )


async def _tenants_resume(args: argparse.Namespace, stores: Stores) -> Output:
    if not await resume_tenant(stores, args.name, time.time()):
        raise CommandError(f"tenant {args.name}'s mail is not held")
    return text_lines(f"tenant {args.name} resumed: its held mail goes out on the next retry "
                      "(sendarix queue retry to send it now)")


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``tenants`` commands."""
    tenants = group("tenants", "tenants: settings, credentials, recent figures")
    p = tenants.add_parser("list", parents=listing, help="every tenant, one line each")
    p.set_defaults(store=_tenants_list)
    p = tenants.add_parser("show", parents=listing, help="one tenant")
    p.add_argument("name", metavar="TENANT", type=tenant_arg)
    p.set_defaults(store=_tenants_show)
    p = tenants.add_parser("resume", parents=common, help="release a held tenant's mail")
    p.add_argument("name", metavar="TENANT", type=tenant_arg)
    p.set_defaults(store=_tenants_resume)
