"""Outcome events (accepted, delivered, bounced, ...) and delivery-log queries.

An :class:`Event` is what the delivery log stores, webhooks POST and the JSON log prints.
Its JSON form is the public event schema (docs/operator-guide.md, "The event log"):
every key is always present (null when unknown) and ``timestamp`` is RFC 3339 UTC with milliseconds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from attrs import field, frozen

from sendarix.model.base32 import encode
from sendarix.model.message import Reply, TLSInfo
from sendarix.model.randomness import unique_bits

#: Every event type (also what a webhook may subscribe to).
EVENT_TYPES: tuple[str, ...] = (
    "accepted", "delivered", "deferred", "bounced",
    "expired", "suppressed", "rejected", "complained", "cancelled",
)  # fmt: skip

#: The most events one search returns.
MAX_LIMIT = 1000


# -- ids and timestamps ----------------------------------------------------------

_id_lock = threading.Lock()
_last_id: tuple[int, int] = (0, 0)


def _forget_last_id() -> None:
    # A child made by fork() draws afresh rather than counting on from its parent's
    # last id, which the parent counts on from too.
    global _last_id
    _last_id = (0, 0)


os.register_at_fork(after_in_child=_forget_last_id)


def new_event_id(now: float | None = None) -> str:
    """A unique id that sorts by creation time: 26 characters, ULID-like.

    48 bits of milliseconds then 80 random bits (Crockford base32).  Within one
    process, ids made in the same millisecond still sort in creation order; ``now``
    (POSIX seconds) defaults to the wall clock.
    """
    global _last_id
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        last_ms, last_rand = _last_id
        if ms == last_ms and last_rand + 1 < 1 << 80:
            # Same millisecond: count up, so ids keep their creation order.
            rand = last_rand + 1
        else:
            rand = unique_bits(80)
        _last_id = (ms, rand)
    return encode(ms & ((1 << 48) - 1), 10) + encode(rand, 16)


#: The last whole second formatted, and its text (events come many to a second).
_last_second: tuple[int, str] = (-1, "")


def format_timestamp(ts: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-23T14:00:00.123Z``."""
    global _last_second
    seconds, ms = divmod(round(ts * 1000), 1000)
    last, text = _last_second
    if seconds != last:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        # One tuple assignment: another thread sees the old pair or the new one.
        _last_second = (seconds, text)
    return f"{text}.{ms:03d}Z"


def parse_timestamp(value: str | float | int) -> float:
    """POSIX seconds from an RFC 3339 string (any offset, any fraction) or a number."""
    if isinstance(value, int | float):
        return float(value)
    dt = datetime.fromisoformat(value.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # Whole seconds plus microseconds keeps exactly the precision that was written.
    whole = int(dt.replace(microsecond=0).timestamp())
    return whole + dt.microsecond / 1_000_000


#: One encoder for every stored event: ``json.dumps`` with options builds one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))

# -- the event -------------------------------------------------------------------


def _check_type(instance: object, attribute: object, value: str) -> None:
    if value not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value!r}")


def _optional_type(instance: object, attribute: object, value: str | None) -> None:
    if value is not None:
        _check_type(instance, attribute, value)


def _strings(value: Iterable[str] | None) -> tuple[str, ...]:
    return tuple(value) if value else ()


@frozen
class Event:
    """One outcome: what happened (``type``) to which message and recipient, when.

    ``recipients`` lists every recipient of an ``accepted`` event that covers a whole
    message (then ``recipient`` may be None).  ``response`` is the SMTP reply that
    decided the outcome; ``mx`` is the host name and ``mx_ip`` its address.
    """

    id: str
    type: str = field(validator=_check_type)
    timestamp: float
    queue_id: str | None = None
    message_id: str | None = None
    tenant: str | None = None
    sender: str | None = None
    recipient: str | None = None
    attempt: int | None = None
    response: Reply | None = None
    mx: str | None = None
    mx_ip: str | None = None
    provider: str | None = None
    source_ip: str | None = None
    tls: TLSInfo | None = None
    bounce_category: str | None = None
    tags: tuple[str, ...] = field(default=(), converter=_strings)
    node: str | None = None
    recipients: tuple[str, ...] = field(default=(), converter=_strings)
    #: The JSON form, once :meth:`shared_json` has made it (not part of the value).
    _json: dict[str, Any] | None = field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def make(cls, type: str, timestamp: float, **fields: Any) -> Event:
        """A new event with a fresh id."""
        return cls(id=new_event_id(timestamp), type=type, timestamp=timestamp, **fields)

    def all_recipients(self) -> tuple[str, ...]:
        """``recipient`` and ``recipients`` together, without repeats."""
        seen = dict.fromkeys(((self.recipient,) if self.recipient else ()) + self.recipients)
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        """The public JSON form: every key present, null when unknown."""
        return {
            "id": self.id,
            "type": self.type,
            "timestamp": format_timestamp(self.timestamp),
            "queue_id": self.queue_id,
            "message_id": self.message_id,
            "tenant": self.tenant,
            "sender": self.sender,
            "recipient": self.recipient,
            "recipients": list(self.recipients),
            "attempt": self.attempt,
            "response": self.response.to_dict() if self.response else None,
            "mx": self.mx,
            "mx_ip": self.mx_ip,
            "provider": self.provider,
            "source_ip": self.source_ip,
            "tls": self.tls.to_dict() if self.tls else None,
            "bounce_category": self.bounce_category,
            "tags": list(self.tags),
            "node": self.node,
        }

    def shared_json(self) -> dict[str, Any]:
        """:meth:`to_json`, made once per event and shared: for the sinks that only
        read it (the log line and the delivery log both need it, for every event).
        Whoever may change the dictionary takes :meth:`to_json` instead."""
        form = self._json
        if form is None:
            form = self.to_json()
            # The event is frozen; the cache is not part of its value.
            object.__setattr__(self, "_json", form)
        return form

    def stored_json(self) -> str:
        """The JSON form as the delivery logs and webhook outboxes store it: compact
        text of :meth:`shared_json`."""
        return _COMPACT.encode(self.shared_json())

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        """The inverse of :obj:`to_json`; missing keys are unknown (None)."""
        attempt = d.get("attempt")
        return cls(
            id=d["id"],
            type=d["type"],
            timestamp=parse_timestamp(d["timestamp"]),
            queue_id=d.get("queue_id"),
            message_id=d.get("message_id"),
            tenant=d.get("tenant"),
            sender=d.get("sender"),
            recipient=d.get("recipient"),
            attempt=int(attempt) if attempt is not None else None,
            response=Reply.from_dict(d.get("response")),
            mx=d.get("mx"),
            mx_ip=d.get("mx_ip"),
            provider=d.get("provider"),
            source_ip=d.get("source_ip"),
            tls=TLSInfo.from_dict(d.get("tls")),
            bounce_category=d.get("bounce_category"),
            tags=d.get("tags") or (),
            node=d.get("node"),
            recipients=d.get("recipients") or (),
        )


# -- queries ---------------------------------------------------------------------


def _positive(instance: object, attribute: object, value: int) -> None:
    if value < 1:
        raise ValueError(f"limit must be at least 1, not {value}")


@frozen
class EventQuery:
    """A delivery log search; every given field must match (AND).

    ``recipient`` and ``sender`` match the whole address, case-insensitively;
    ``since <= timestamp < until``; ``limit`` is capped at :obj:`MAX_LIMIT`; ``cursor`` is
    a previous page's ``next_cursor``.
    """

    recipient: str | None = None
    sender: str | None = None
    queue_id: str | None = None
    message_id: str | None = None
    type: str | None = field(default=None, validator=_optional_type)
    tenant: str | None = None
    tag: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = field(default=50, validator=_positive)
    cursor: str | None = None


@frozen
class EventPage:
    """One page of search results, newest first; ``next_cursor`` is None on the last."""

    events: tuple[Event, ...]
    next_cursor: str | None

    def to_json(self) -> dict[str, Any]:
        """The ``GET /v1/events`` body."""
        return {"events": [e.to_json() for e in self.events], "next_cursor": self.next_cursor}
