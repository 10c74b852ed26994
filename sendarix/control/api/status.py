"""A message as ``GET /v1/messages/{id}`` shows it: envelope, each recipient's status
and the message's events in order.

Pure: it reads what the spool holds (while the message is there) and the delivery
log (also after the message has left the spool).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sendarix.model.event import Event, format_timestamp
from sendarix.model.message import RecipientRecord, RecipientStatus, StoredMessage

#: The event types that say where a recipient stands, and the status each means.
_EVENT_STATUS = {
    "accepted": "queued",
    "deferred": "deferred",
    "delivered": "delivered",
    "bounced": "bounced",
    "expired": "expired",
    "suppressed": "suppressed",
    "complained": "delivered",
    "cancelled": "cancelled",
}


def _from_record(record: RecipientRecord) -> str:
    if record.status is RecipientStatus.PENDING:
        return "deferred" if record.attempts else "queued"
    return record.status.value


def message_status(
    queue_id: str, stored: StoredMessage | None, events: Sequence[Event]
) -> dict[str, Any]:
    """The JSON body for one message; ``events`` oldest first."""
    recipients: dict[str, dict[str, Any]] = {}
    accepted = next((e for e in events if e.type == "accepted"), None)
    order = list(accepted.all_recipients()) if accepted else []
    if stored is not None:
        order = list(dict.fromkeys([*stored.envelope.recipients, *order]))
    for address in order:
        recipients[address] = {"address": address, "status": "queued", "attempts": 0,
                               "next_attempt": None, "last_response": None,
                               "bounce_category": None}
    for event in events:
        status = _EVENT_STATUS.get(event.type)
        if status is None or event.type == "accepted":
            continue
        for address in event.all_recipients():
            entry = recipients.setdefault(address, {
                "address": address, "status": "queued", "attempts": 0, "next_attempt": None,
                "last_response": None, "bounce_category": None,
            })
            if event.type == "complained":
                entry["complained"] = True
                continue
            entry["status"] = status
            if event.response is not None:
                entry["last_response"] = event.response.to_dict()
            if event.attempt is not None:
                entry["attempts"] = max(entry["attempts"], event.attempt)
            if event.bounce_category is not None:
                entry["bounce_category"] = event.bounce_category
    if stored is not None:
        for record in stored.recipients:
            entry = recipients.setdefault(record.address, {"address": record.address})
            entry["status"] = _from_record(record)
            entry["attempts"] = record.attempts
            entry["next_attempt"] = (
                format_timestamp(record.next_attempt)
                if record.next_attempt is not None and not record.status.final else None
            )
            if record.last_reply is not None:
                entry["last_response"] = record.last_reply.to_dict()
    first = stored.meta if stored is not None else None
    sender = stored.envelope.sender if stored is not None else (
        accepted.sender if accepted else None
    )
    return {
        "id": queue_id,
        "message_id": (first.message_id if first else None) or (
            accepted.message_id if accepted else None
        ),
        "tenant": first.tenant if first else (accepted.tenant if accepted else None),
        "sender": sender,
        "tags": list(first.tags if first else (accepted.tags if accepted else ())),
        "received_at": format_timestamp(first.received_at) if first else (
            format_timestamp(accepted.timestamp) if accepted else None
        ),
        "in_queue": stored is not None,
        "recipients": list(recipients.values()),
        "events": [e.to_json() for e in events],
    }
