"""``sendarix webhooks``: the configured endpoints and their outbox, dead-lettered
batches, replays, and endpoints disabled by their receiver."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from sendarix.control.cli.common import (
    CommandError,
    Output,
    format_when,
    positive_arg,
    render_table,
    text_lines,
    to_json,
)
from sendarix.control.webhookops import webhook_rows
from sendarix.stores.backends import Stores


async def _webhooks_list(args: argparse.Namespace, stores: Stores) -> Output:
    rows = await webhook_rows(stores, None)
    if args.json:
        return text_lines(to_json(rows))
    if not rows:
        return text_lines("no webhooks configured")
    table = [
        (r["name"], r["tenant"], r["url"],
         "disabled " + format_when(r["disabled_at"]) if r["disabled_at"] else "enabled",
         str(r["queued"]), str(r["batches"]), str(r["dead"]))
        for r in rows
    ]  # fmt: skip
    header = ("NAME", "TENANT", "URL", "STATE", "QUEUED", "BATCHES", "DEAD")
    return text_lines(render_table(header, table))


async def _webhooks_dead(args: argparse.Namespace, stores: Stores) -> Output:
    dead = await stores.outbox.list_dead(args.endpoint, args.limit)
    if args.json:
        return text_lines(to_json([d.to_json() for d in dead]))
    if not dead:
        return text_lines("no dead-lettered batches")
    rows = [
        (d.id, d.endpoint, str(d.count), str(d.attempts), format_when(d.failed_at), d.error)
        for d in dead
    ]
    header = ("BATCH", "ENDPOINT", "EVENTS", "ATTEMPTS", "FAILED", "ERROR")
    return text_lines(render_table(header, rows))


async def _webhooks_replay(args: argparse.Namespace, stores: Stores) -> Output:
    now = time.time()
    ids: list[str] = list(args.batch)
    if args.all:
        ids += [d.id for d in await stores.outbox.list_dead(args.endpoint, 1_000_000)]
    if not ids:
        raise CommandError("name the batches to replay, or give --all")
    lines, missing = [], []
    for batch_id in dict.fromkeys(ids):
        if await stores.outbox.replay(batch_id, now):
            lines.append(f"replaying {batch_id}")
        else:
            missing.append(batch_id)
    if missing:
        raise CommandError("not dead-lettered: " + ", ".join(missing))
    return text_lines(*lines)


async def _webhooks_enable(args: argparse.Namespace, stores: Stores) -> Output:
    if not await stores.outbox.enable(args.name):
        raise CommandError(f"webhook {args.name} is not disabled")
    return text_lines(f"enabled webhook {args.name}")


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``webhooks`` commands."""
    hooks = group("webhooks", "webhook endpoints, their dead letters and replays")
    p = hooks.add_parser("list", parents=listing, help="configured endpoints and their outbox")
    p.set_defaults(store=_webhooks_list)
    p = hooks.add_parser("dead", parents=listing, help="batches given up on, newest first")
    p.add_argument("--endpoint", metavar="NAME", help="only this endpoint's")
    p.add_argument("--limit", type=positive_arg, default=100, help="at most N batches (100)")
    p.set_defaults(store=_webhooks_dead)
    p = hooks.add_parser(
        "replay", parents=common, help="send dead-lettered batches again (same id and body)"
    )
    p.add_argument("batch", metavar="BATCH", nargs="*", help="a batch id (webhook-id)")
    p.add_argument("--all", action="store_true", help="every dead batch (of --endpoint)")
    p.add_argument("--endpoint", metavar="NAME", help="with --all: only this endpoint's")
    p.set_defaults(store=_webhooks_replay)
    p = hooks.add_parser(
        "enable", parents=common, help="send to an endpoint its receiver disabled (410) again"
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(store=_webhooks_enable)
