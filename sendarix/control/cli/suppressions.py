"""``sendarix suppressions``: each tenant's suppressed recipients."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from sendarix.control.cli.common import (
    CommandError,
    Output,
    address_arg,
    format_when,
    positive_arg,
    render_table,
    tenant_arg,
    text_lines,
    to_json,
)
from sendarix.stores.backends import Stores

# -- suppressions ----------------------------------------------------------------------


async def _suppressions_add(args: argparse.Namespace, stores: Stores) -> Output:
    now = time.time()
    added = await stores.suppressions.add(args.tenant, args.address, args.reason, "manual", now)
    if added:
        return text_lines(f"suppressed {args.address} for tenant {args.tenant}")
    return text_lines(f"{args.address} was already suppressed for tenant {args.tenant}")


async def _suppressions_list(args: argparse.Namespace, stores: Stores) -> Output:
    if args.after is not None and args.tenant is None:
        raise CommandError("--after needs --tenant")
    entries = await stores.suppressions.list(tenant=args.tenant, limit=args.limit, after=args.after)
    if args.json:
        return text_lines(to_json([e.to_dict() for e in entries]))
    if not entries:
        return text_lines("no suppressions")
    rows = [
        (e.tenant, e.address, e.source, format_when(e.created_at), e.reason or "-")
        for e in entries
    ]
    text = [render_table(("TENANT", "ADDRESS", "SOURCE", "CREATED", "REASON"), rows)]
    if len(entries) == args.limit and args.tenant is not None:
        text.append(f"more may follow: --after {entries[-1].address}")
    return text_lines(*text)


async def _suppressions_remove(args: argparse.Namespace, stores: Stores) -> Output:
    if not await stores.suppressions.remove(args.tenant, args.address):
        raise CommandError(f"{args.address} is not suppressed for tenant {args.tenant}")
    return text_lines(f"removed {args.address} from tenant {args.tenant}'s suppressions")


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``suppressions`` commands."""
    supp = group("suppressions", "each tenant's suppressed recipients")
    p = supp.add_parser("add", parents=common, help="suppress a recipient for a tenant")
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p.add_argument("--tenant", type=tenant_arg, required=True)
    p.add_argument("--reason", default="", help="a note kept with the entry")
    p.set_defaults(store=_suppressions_add)
    p = supp.add_parser("list", parents=listing, help="list suppressed recipients")
    p.add_argument("--tenant", type=tenant_arg, help="only this tenant's")
    p.add_argument("--limit", type=positive_arg, default=100, help="at most N entries (100)")
    p.add_argument("--after", metavar="ADDRESS", help="start after this address (with --tenant)")
    p.set_defaults(store=_suppressions_list)
    p = supp.add_parser("remove", parents=common, help="lift a suppression")
    p.add_argument("address", metavar="ADDRESS", type=address_arg)
    p.add_argument("--tenant", type=tenant_arg, required=True)
    p.set_defaults(store=_suppressions_remove)
