"""``sendarix webhooks``: endpoints (configured, and added at run time with ``add``),
their outbox, test POSTs, dead-lettered batches, replays, and endpoints disabled by
their receiver."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from sendarix.config.secret import NodeSecret, SecretError, node_secret_from_env
from sendarix.control.cli.common import (
    CommandError,
    Output,
    format_when,
    positive_arg,
    render_table,
    tenant_arg,
    text_lines,
    to_json,
)
from sendarix.control.webhookops import (
    WebhookOpError,
    add_endpoint,
    remove_endpoint,
    send_test,
    webhook_rows,
)
from sendarix.stores.backends import Stores


def _secret(stores: Stores) -> NodeSecret | None:
    try:
        return node_secret_from_env(stores.config.node.secret_key_env)
    except SecretError as e:
        raise CommandError(str(e)) from None


async def _webhooks_list(args: argparse.Namespace, stores: Stores) -> Output:
    rows = await webhook_rows(stores, args.tenant)
    if args.json:
        return text_lines(to_json(rows))
    if not rows:
        return text_lines("no webhooks")
    table = [
        (r["name"], r["tenant"], r["url"], r["source"],
         "disabled " + format_when(r["disabled_at"]) if r["disabled_at"] else "enabled",
         str(r["queued"]), str(r["batches"]), str(r["dead"]))
        for r in rows
    ]  # fmt: skip
    header = ("NAME", "TENANT", "URL", "SOURCE", "STATE", "QUEUED", "BATCHES", "DEAD")
    return text_lines(render_table(header, table))


async def _webhooks_add(args: argparse.Namespace, stores: Stores) -> Output:
    schedule = args.retry_schedule.split(",") if args.retry_schedule else None
    try:
        row, secret = await add_endpoint(
            stores, _secret(stores), args.tenant, args.url, args.event, time.time(), schedule
        )
    except WebhookOpError as e:
        raise CommandError(str(e)) from None
    if args.json:
        return text_lines(to_json({**row, "secret": secret}))
    return text_lines(
        f"name: {row['name']}",
        f"secret: {secret}",
        "(the secret is shown only this once: give it to the receiver now)",
    )


async def _webhooks_remove(args: argparse.Namespace, stores: Stores) -> Output:
    try:
        done = await remove_endpoint(stores, args.name, time.time())
    except WebhookOpError as e:
        raise CommandError(str(e)) from None
    if args.json:
        return text_lines(to_json(done))
    dropped = done["dropped"]
    return text_lines(
        f"removed webhook {args.name}; dropped {dropped['queued']} queued events, "
        f"{dropped['batches']} batches and {dropped['dead']} dead batches"
    )


async def _webhooks_test(args: argparse.Namespace, stores: Stores) -> Output:
    from twisted.internet import reactor

    try:
        result = await send_test(stores, _secret(stores), args.name, reactor, os.environ,
                                 timeout=args.timeout)
    except WebhookOpError as e:
        raise CommandError(str(e)) from None
    if not result["ok"]:
        raise CommandError(f"webhook {args.name} test to {result['url']} failed: "
                           f"{result['error']}")
    if args.json:
        return text_lines(to_json(result))
    return text_lines(
        f"webhook {args.name} answered HTTP {result['status']} (webhook-id "
        f"{result['webhook_id']})"
    )


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
    p = hooks.add_parser(
        "list", parents=listing, help="endpoints (configured and added) and their outbox"
    )
    p.add_argument("--tenant", type=tenant_arg, help="only this tenant's")
    p.set_defaults(store=_webhooks_list)
    p = hooks.add_parser(
        "add", parents=listing,
        help="add an endpoint; prints its name and new whsec_ secret once",
    )
    p.add_argument("--tenant", type=tenant_arg, required=True, help="whose events it gets")
    p.add_argument("--url", required=True, help="where events are POSTed (http:// or https://)")
    p.add_argument("--event", action="append", required=True, metavar="TYPE",
                   help="an event type to send (repeat for several; * for all)")
    p.add_argument("--retry-schedule", metavar="D,D,...",
                   help="when attempts are due after the first, e.g. 0s,5s,5m,30m "
                   "(default: the Standard Webhooks schedule, up to 24h)")
    p.set_defaults(store=_webhooks_add)
    p = hooks.add_parser(
        "remove", parents=listing,
        help="remove an added endpoint and drop what is queued for it",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(store=_webhooks_remove)
    p = hooks.add_parser(
        "test", parents=listing,
        help="POST a signed test body to an endpoint now (exit 1 unless it answers 2xx)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=positive_arg, default=10, help="seconds to wait (10)")
    p.set_defaults(store=_webhooks_test)
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
