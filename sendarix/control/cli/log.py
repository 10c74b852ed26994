"""``sendarix log``: searching the delivery log."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sendarix.control.cli.common import (
    CommandError,
    Output,
    positive_arg,
    render_table,
    reply_text,
    text_lines,
    time_arg,
    to_json,
)
from sendarix.model.event import EVENT_TYPES, MAX_LIMIT, Event, EventQuery, format_timestamp
from sendarix.stores.backends import Stores

# -- log -------------------------------------------------------------------------------


def _event_row(event: Event) -> tuple[str, ...]:
    return (
        format_timestamp(event.timestamp),
        event.type,
        event.queue_id or "-",
        ",".join(event.all_recipients()) or "-",
        reply_text(event.response),
    )


async def _log_search(args: argparse.Namespace, stores: Stores) -> Output:
    query = EventQuery(
        recipient=args.recipient,
        sender=args.sender,
        queue_id=args.queue_id,
        message_id=args.message_id,
        type=args.type,
        tenant=args.tenant,
        tag=args.tag,
        since=args.since,
        until=args.until,
        limit=args.limit,
        cursor=args.cursor,
    )
    try:
        page = await stores.eventlog.search(query)
    except ValueError as e:  # a cursor that is not one of ours
        raise CommandError(str(e)) from None
    cursor = f"next cursor: {page.next_cursor}" if page.next_cursor else None
    if args.json:
        return Output(to_json([e.to_json() for e in page.events]) + "\n", note=cursor)
    if not page.events:
        return text_lines("no events")
    text = [render_table(None, [_event_row(e) for e in page.events])]
    if cursor:
        text.append(cursor)
    return text_lines(*text)


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``log`` commands."""
    log = group("log", "the delivery log")
    p = log.add_parser(
        "search",
        parents=listing,
        help="search events, newest first",
        epilog="TIME: RFC 3339 (2026-01-31T12:00:00Z), POSIX seconds, or a "
        "duration such as 1h or 2d meaning that long ago.",
    )
    p.add_argument("--recipient", metavar="ADDRESS")
    p.add_argument("--sender", metavar="ADDRESS")
    p.add_argument("--queue-id", metavar="QUEUE_ID")
    p.add_argument("--message-id", metavar="MESSAGE_ID")
    p.add_argument("--type", choices=sorted(EVENT_TYPES))
    p.add_argument("--tenant")
    p.add_argument("--tag")
    p.add_argument("--since", type=time_arg, metavar="TIME", help="events at or after TIME")
    p.add_argument("--until", type=time_arg, metavar="TIME", help="events before TIME")
    p.add_argument(
        "--limit", type=positive_arg, default=50, help=f"at most N events (50, up to {MAX_LIMIT})"
    )
    p.add_argument("--cursor", help="the 'next cursor' of a previous search")
    p.set_defaults(store=_log_search)
