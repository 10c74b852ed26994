"""The dashboard's figures from what the stores return (pure: time is passed in).

Throughput and outcomes are counted from the delivery log's events in fixed
intervals; bounce and deferral rates per provider from the same events; queue age per
destination domain from the oldest queued messages.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from attrs import frozen

from sendarix.model.event import Event
from sendarix.model.message import RecipientStatus, StoredMessage

#: The outcomes charted, in stacking order.
OUTCOMES: tuple[str, ...] = ("delivered", "deferred", "bounced", "expired", "suppressed")
#: What the throughput chart stacks.
INTAKE: tuple[str, ...] = ("accepted", "rejected")


@frozen
class Span:
    """A chart's time range: ``count`` intervals of ``step`` seconds ending now."""

    name: str
    step: float
    count: int
    #: strftime format of an interval's label (UTC).
    label: str

    @property
    def seconds(self) -> float:
        return self.step * self.count


HOUR = Span("last hour", 300.0, 12, "%H:%M")
DAY = Span("last day", 3600.0, 24, "%H:00")


@frozen
class Series:
    """Counts per interval of each event type, and each interval's label."""

    labels: tuple[str, ...]
    counts: dict[str, list[int]]

    def pick(self, types: Sequence[str]) -> dict[str, list[int]]:
        return {t: self.counts.get(t, [0] * len(self.labels)) for t in types}


def series(events: Iterable[Event], span: Span, now: float) -> Series:
    """Events per type in each of ``span``'s intervals (the last one ends at ``now``,
    rounded up to a whole interval)."""
    end = (now // span.step + 1) * span.step
    start = end - span.seconds
    labels = tuple(
        datetime.datetime.fromtimestamp(start + i * span.step, datetime.UTC).strftime(span.label)
        for i in range(span.count)
    )
    counts: dict[str, list[int]] = {}
    for event in events:
        if not start <= event.timestamp < end:
            continue
        slot = int((event.timestamp - start) // span.step)
        row = counts.setdefault(event.type, [0] * span.count)
        row[slot] += _weight(event)
    return Series(labels, counts)


def _weight(event: Event) -> int:
    """How many recipients an event counts for (an accepted message names them all)."""
    return max(1, len(event.all_recipients())) if event.type == "accepted" else 1


@frozen
class ProviderRates:
    """Outcomes towards one provider over a span."""

    provider: str
    delivered: int
    deferred: int
    bounced: int

    @property
    def attempts(self) -> int:
        return self.delivered + self.deferred + self.bounced

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.attempts if self.attempts else 0.0

    @property
    def deferral_rate(self) -> float:
        return self.deferred / self.attempts if self.attempts else 0.0


def provider_rates(events: Iterable[Event]) -> list[ProviderRates]:
    """Delivered, deferred and bounced attempts per provider (``other`` when the
    event names none), busiest first."""
    counts: dict[str, dict[str, int]] = {}
    for event in events:
        if event.type not in ("delivered", "deferred", "bounced"):
            continue
        row = counts.setdefault(event.provider or "other", {})
        row[event.type] = row.get(event.type, 0) + 1
    rates = [
        ProviderRates(name, c.get("delivered", 0), c.get("deferred", 0), c.get("bounced", 0))
        for name, c in counts.items()
    ]
    return sorted(rates, key=lambda r: (-r.attempts, r.provider))


@frozen
class DomainAge:
    """Recipients waiting for one destination domain, and the oldest one's age."""

    domain: str
    waiting: int
    oldest: float


def queue_ages(messages: Iterable[StoredMessage], now: float) -> list[DomainAge]:
    """Waiting recipients (pending or deferred) per domain with the oldest's age in
    seconds, oldest first."""
    found: dict[str, tuple[int, float]] = {}
    for message in messages:
        for record in message.recipients:
            if record.status.final or record.status not in (
                RecipientStatus.PENDING, RecipientStatus.DEFERRED
            ):
                continue
            count, received = found.get(record.domain, (0, message.meta.received_at))
            found[record.domain] = (count + 1, min(received, message.meta.received_at))
    ages = [DomainAge(d, n, max(0.0, now - t)) for d, (n, t) in found.items()]
    return sorted(ages, key=lambda a: (-a.oldest, a.domain))


def duration(seconds: float) -> str:
    """``seconds`` in the largest fitting unit: ``45 s``, ``12 min``, ``3 h``, ``2 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def percent(value: float) -> str:
    return f"{value * 100:.1f} %"
