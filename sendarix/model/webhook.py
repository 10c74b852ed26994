"""Webhook deliveries as values: batches of events in the outbox, dead letters, the
JSON a batch is POSTed as, and the endpoints added at run time (API or CLI).

A batch's body is built once, when the batch is formed, and sent unchanged on every
attempt, so a retry carries the same ``webhook-id`` and the same bytes.  Each event in
it is the public event JSON plus ``sequence``: the event's position among its
message's events in the delivery log (1 for the first), null for an event of no
message.
"""

from __future__ import annotations

import json
import re
from typing import Any

from attrs import frozen

from sendarix.model.event import new_event_id

#: When attempts are made, in seconds after a batch's first attempt: immediately, then
#: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h (the Standard Webhooks
#: schedule).  A batch whose last attempt fails is dead-lettered.
STANDARD_RETRY_SCHEDULE: tuple[float, ...] = (
    0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0,
)  # fmt: skip

#: The most events one POST carries.
MAX_BATCH_EVENTS = 100
#: How long the first event of a batch waits for others to join it (seconds).
BATCH_FILL_TIME = 1.0


def new_batch_id(now: float | None = None) -> str:
    """A fresh ``webhook-id``: ``msg_`` and a time-ordered unique id."""
    return "msg_" + new_event_id(now)


def with_sequence(event_json: str, sequence: int | None) -> str:
    """The compact JSON object ``event_json`` with a ``sequence`` key added at its end.

    Done on the text (not by parsing it again) so the Redis store's script builds the
    same bytes as this function.
    """
    text = event_json.rstrip()
    if not text.endswith("}"):
        raise ValueError("not a JSON object")
    value = "null" if sequence is None else str(int(sequence))
    return f'{text[:-1]},"sequence":{value}}}'


def batch_body(items: list[str], timestamp: str) -> str:
    """The POST body of a batch of event JSON texts, formed at ``timestamp`` (RFC 3339)."""
    if not 1 <= len(items) <= MAX_BATCH_EVENTS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_EVENTS} events, not {len(items)}")
    stamp = json.dumps(timestamp)
    return '{"type":"events","timestamp":' + stamp + ',"data":{"events":[' + ",".join(items) + "]}}"


@frozen
class WebhookBatch:
    """A batch leased for sending: ``attempts`` made so far (0 before the first),
    ``created`` when the batch was formed (its first attempt is due then)."""

    id: str
    endpoint: str
    body: str
    created: float
    attempts: int
    count: int


@frozen
class DeadBatch:
    """A batch that was given up on: visible until it is replayed."""

    id: str
    endpoint: str
    created: float
    attempts: int
    failed_at: float
    error: str
    count: int

    def to_json(self) -> dict[str, object]:
        """The JSON form the command line prints."""
        return {
            "id": self.id, "endpoint": self.endpoint, "created": self.created,
            "attempts": self.attempts, "failed_at": self.failed_at, "error": self.error,
            "events": self.count,
        }  # fmt: skip


@frozen
class DisabledEndpoint:
    """An endpoint the receiver switched off (HTTP 410): nothing is queued or sent to it
    until it is enabled again."""

    endpoint: str
    disabled_at: float
    reason: str


#: The names of endpoints added at run time: ``wh_`` and a time-ordered unique id in
#: lower case (adding one checks that no ``[[webhook]]`` has the name).
STORED_NAME = re.compile(r"wh_[0-9a-z]{26}")


def new_endpoint_name(now: float | None = None) -> str:
    """A fresh name for an endpoint added at run time."""
    return "wh_" + new_event_id(now).lower()


@frozen
class StoredWebhook:
    """An endpoint added at run time (``POST /v1/webhooks``, ``sendarix webhooks add``).

    ``sealed`` holds its ``whsec_`` secrets encrypted with a key derived from the node
    secret (signing needs them in the clear, so they cannot be kept as a hash); only a
    node or command with the node secret can open it.
    """

    name: str
    tenant: str
    url: str
    events: tuple[str, ...]
    retry_schedule: tuple[float, ...]
    created: float
    sealed: str

    def to_json(self) -> str:
        return json.dumps({
            "v": 1, "name": self.name, "tenant": self.tenant, "url": self.url,
            "events": list(self.events), "retry_schedule": list(self.retry_schedule),
            "created": self.created, "sealed": self.sealed,
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> StoredWebhook:
        d: dict[str, Any] = json.loads(text)
        return cls(
            d["name"], d["tenant"], d["url"], tuple(d["events"]),
            tuple(float(x) for x in d["retry_schedule"]), float(d["created"]), d["sealed"],
        )
