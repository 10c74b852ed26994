"""``sendarix queue``: messages in the spool, and the routing state."""

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
    reply_text,
    text_lines,
    to_json,
)
from sendarix.model.event import format_timestamp
from sendarix.model.message import RecipientStatus, StoredMessage
from sendarix.routing.state import format_state, read_states
from sendarix.stores.backends import Stores

# -- queue ---------------------------------------------------------------------------


def _status_summary(message: StoredMessage) -> str:
    counts: dict[str, int] = {}
    for r in message.recipients:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    return ", ".join(f"{s.value} {counts[s.value]}" for s in RecipientStatus if s.value in counts)


def _next_attempt(message: StoredMessage) -> float | None:
    due = [
        r.next_attempt
        for r in message.recipients
        if not r.status.final and r.next_attempt is not None
    ]
    return min(due) if due else None


async def _queue_list(args: argparse.Namespace, stores: Stores) -> Output:
    messages = await stores.spool.list_messages(
        status=args.status, domain=args.domain, limit=args.limit, after=args.after
    )
    if args.json:
        return text_lines(to_json([m.to_dict() for m in messages]))
    if not messages:
        return text_lines("no messages")
    rows = [
        (
            m.queue_id,
            format_when(m.meta.received_at),
            m.size,
            m.meta.tenant,
            f"<{m.envelope.sender}>",
            len(m.recipients),
            _status_summary(m),
            format_when(_next_attempt(m)),
        )
        for m in messages
    ]
    headers = ("QUEUE ID", "RECEIVED", "SIZE", "TENANT", "SENDER", "RCPTS", "STATUS", "NEXT")
    text = [render_table(headers, rows, right=(2, 5))]
    if len(messages) == args.limit:
        text.append(f"more may follow: --after {messages[-1].queue_id}")
    return text_lines(*text)


async def _queue_show(args: argparse.Namespace, stores: Stores) -> Output:
    message = await stores.spool.get(args.queue_id)
    if message is None:
        raise CommandError(f"no message {args.queue_id!r} in the queue")
    if args.body:
        body = await stores.spool.body(args.queue_id)
        if body is None:
            raise CommandError(f"message {args.queue_id!r} left the queue")
        return Output(body)
    if args.json:
        return text_lines(to_json(message.to_dict()))
    meta, env = message.meta, message.envelope
    client = meta.client_ip or "-"
    if meta.helo:
        client += f" (helo {meta.helo})"
    if meta.listener:
        client += f" on listener {meta.listener}"
    fields = [
        ("queue id", message.queue_id),
        ("received", format_timestamp(meta.received_at)),
        ("tenant", meta.tenant),
        ("credential", meta.credential or "-"),
        ("client", client),
        ("tls", f"{meta.tls.version} {meta.tls.cipher}" if meta.tls else "-"),
        ("sender", f"<{env.sender}>"),
        ("message-id", meta.message_id or "-"),
        ("size", f"{message.size} bytes"),
        ("tags", ", ".join(meta.tags) or "-"),
        ("node", meta.node or "-"),
    ]
    rows = [
        (
            r.address,
            r.status.value,
            r.attempts,
            format_when(r.next_attempt) if not r.status.final else "-",
            reply_text(r.last_reply),
        )
        for r in message.recipients
    ]
    return text_lines(
        render_table(None, [(f"{k}:", v) for k, v in fields]),
        "",
        render_table(("RECIPIENT", "STATUS", "ATTEMPTS", "NEXT", "LAST REPLY"), rows, right=(2,)),
    )


async def _queue_stats(args: argparse.Namespace, stores: Stores) -> Output:
    stats = await stores.spool.stats()
    # What the running node last wrote about sites, endpoints and egress sources.
    # (one per worker process when the node runs several).
    routing = read_states(stores.config)
    if args.json:
        data = stats.to_dict()
        data["routing"] = routing  # a list, empty when no process has written one
        return text_lines(to_json(data))
    statuses = [s.value for s in RecipientStatus if s.value in stats.by_status]
    total = sum(stats.by_status.values())
    summary = ", ".join(f"{s} {stats.by_status[s]}" for s in statuses)
    text = [
        f"messages: {stats.messages}",
        f"recipients: {total}" + (f" ({summary})" if summary else ""),
    ]
    if stats.by_domain:
        rows = [
            (domain, *(counts.get(s, 0) for s in statuses))
            for domain, counts in sorted(stats.by_domain.items())
        ]
        headers = ("DOMAIN", *(s.upper() for s in statuses))
        text += ["", render_table(headers, rows, right=range(1, len(headers)))]
    for state in routing:
        text += ["", *format_state(state, time.time())]
    return text_lines(*text)


async def _queue_retry(args: argparse.Namespace, stores: Stores) -> Output:
    # retry() answers 0 both for an unknown id and for a message whose recipients are
    # all final: look the message up first so the two read differently.
    if await stores.spool.get(args.queue_id) is None:
        raise CommandError(f"no message {args.queue_id!r} in the queue")
    count = await stores.spool.retry(args.queue_id, time.time())
    noun = "recipient" if count == 1 else "recipients"
    return text_lines(f"{count} {noun} of {args.queue_id} due now")


async def _queue_delete(args: argparse.Namespace, stores: Stores) -> Output:
    if not await stores.spool.delete(args.queue_id):
        raise CommandError(f"no message {args.queue_id!r} in the queue")
    return text_lines(f"deleted {args.queue_id}")


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``queue`` commands."""
    queue = group("queue", "messages in the spool")
    p = queue.add_parser("list", parents=listing, help="list spooled messages")
    p.add_argument(
        "--status",
        choices=[s.value for s in RecipientStatus],
        help="only messages with a recipient in this state",
    )
    p.add_argument("--domain", help="only messages with a recipient at this domain")
    p.add_argument("--limit", type=positive_arg, default=100, help="at most N messages (100)")
    p.add_argument("--after", metavar="QUEUE_ID", help="start after this queue id")
    p.set_defaults(store=_queue_list)
    p = queue.add_parser("show", parents=common, help="one message's envelope and recipients")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print JSON")
    shown.add_argument("--body", action="store_true", help="write the raw message to stdout")
    p.set_defaults(store=_queue_show)
    p = queue.add_parser("stats", parents=listing, help="queue depth by status and domain")
    p.set_defaults(store=_queue_stats)
    p = queue.add_parser("retry", parents=common, help="make a message's recipients due now")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.set_defaults(store=_queue_retry)
    p = queue.add_parser(
        "delete", parents=common, help="remove a message and its body from the queue"
    )
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.set_defaults(store=_queue_delete)
