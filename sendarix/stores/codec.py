"""What every spool backend stores and decides the same way.

Versioned JSON for envelopes, metadata and replies; the destination domain of a
recipient; and how one delivery outcome changes a recipient's record.  Pure
functions, no I/O, so the SQLite and Redis spools cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from attrs import evolve

from sendarix.model.message import (
    Envelope,
    MessageMeta,
    RecipientOutcome,
    RecipientRecord,
    RecipientStatus,
    Reply,
)

FORMAT = 1
"""The ``"v"`` field of every JSON document a spool writes."""

ACTIVE_STATUSES = (RecipientStatus.PENDING, RecipientStatus.DEFERRED)
"""Recipients in these states still have deliveries ahead of them."""


def look_past_limit(limit: int) -> int:
    """How many due deliveries of left-out domains one lease poll of at most ``limit``
    deliveries looks past (:obj:`sendarix.interfaces.ISelectiveLease`); past that, the
    deliveries that come next are leased whatever their domain, and the delivery
    agent parks what a full site cannot take (and defers what a resting one would).

    The bound keeps a poll's cost from growing with a left-out site's backlog: without
    it, a poll behind 100,000 due deliveries of one full site walked past all of them
    (inside the write transaction, every poll) to find the little else that was due.
    Parking moves the leased ones out of the way, so what lies behind them comes up.
    """
    return 1000 + 10 * max(limit, 0)


def recipient_domain(address: str) -> str:
    """The destination domain: the part after the last ``@``, lower-cased ("" if none).

    IDNA domains are kept as given (A-label or U-label), only lower-cased.
    """
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


def unique_recipients(recipients: Iterable[str]) -> tuple[str, ...]:
    """The recipients in envelope order with repeats dropped (one record each)."""
    return tuple(dict.fromkeys(recipients))


#: One encoder for every record: ``json.dumps`` with options builds one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def dump(document: dict[str, Any]) -> str:
    """Compact JSON with the format version added."""
    return _ENCODER.encode({"v": FORMAT, **document})


def load(text: str | bytes) -> dict[str, Any]:
    """Parse a document written by :func:`dump`; refuse a format we do not know."""
    document = json.loads(text)
    version = document.pop("v", None)
    if version != FORMAT:
        raise ValueError(f"unknown spool record format {version!r}")
    return dict(document)


def encode_envelope(envelope: Envelope) -> str:
    return dump(envelope.to_dict())


def decode_envelope(text: str | bytes) -> Envelope:
    return Envelope.from_dict(load(text))


def encode_meta(meta: MessageMeta) -> str:
    return dump(meta.to_dict())


def decode_meta(text: str | bytes) -> MessageMeta:
    return MessageMeta.from_dict(load(text))


def encode_reply(reply: Reply | None) -> str | None:
    return None if reply is None else dump(reply.to_dict())


def decode_reply(text: str | bytes | None) -> Reply | None:
    return None if text is None else Reply.from_dict(load(text))


def check_outcomes(outcomes: Iterable[RecipientOutcome]) -> None:
    """Refuse outcomes that cannot be recorded (before anything is written)."""
    for outcome in outcomes:
        if outcome.status is RecipientStatus.DEFERRED and outcome.next_attempt is None:
            raise ValueError(f"a deferred outcome needs next_attempt: {outcome.address!r}")


def counts_as_attempt(outcome: RecipientOutcome) -> bool:
    """Whether an outcome used up a delivery attempt.

    Talking to a server (or failing to reach one) is an attempt; suppressing a
    recipient, or expiring or requeueing it without trying, is not.
    """
    if outcome.status in (
        RecipientStatus.DELIVERED,
        RecipientStatus.BOUNCED,
        RecipientStatus.DEFERRED,
    ):
        return True
    return outcome.status is RecipientStatus.EXPIRED and outcome.reply is not None


def apply_outcome(
    record: RecipientRecord, outcome: RecipientOutcome, now: float
) -> RecipientRecord:
    """The recipient's record after ``outcome``.

    A final status clears ``next_attempt``; a reply-less outcome keeps the last reply
    (so an expiry still shows why the recipient was being retried).
    """
    return evolve(
        record,
        status=outcome.status,
        attempts=record.attempts + (1 if counts_as_attempt(outcome) else 0),
        next_attempt=None if outcome.status.final else outcome.next_attempt,
        last_reply=outcome.reply if outcome.reply is not None else record.last_reply,
        updated_at=now,
    )
