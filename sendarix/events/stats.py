"""Hourly statistics: every event counted by hour, tenant, type and provider, and
written to the stores about once a second (``/v1/stats`` reads them).

Counting happens in memory on the reactor thread; a flush adds the counts to the
stores in one write, so the message path pays one dictionary update per event.  A
crash loses at most the last second's counts (statistics, not outcomes: the
delivery log keeps every event).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IEventSink, IStatsStore
from sendarix.model.event import Event

log = Logger()

HOUR = 3600.0


def hour_of(timestamp: float) -> float:
    """The start of the hour ``timestamp`` falls in."""
    return (timestamp // HOUR) * HOUR


@implementer(IEventSink)
@define
class StatsSink:
    """Counts events and flushes the counts to ``store`` every ``interval`` seconds."""

    store: IStatsStore
    clock: Any
    interval: float = 1.0
    _counts: Counter[tuple[float, str, str, str]] = field(factory=Counter, init=False)
    _loop: LoopingCall | None = field(default=None, init=False)

    def emit(self, event: Event) -> None:
        key = (hour_of(event.timestamp), event.tenant or "", event.type,
               event.provider or "other")
        self._counts[key] += max(1, len(event.all_recipients()))

    def start(self) -> None:
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("statistics flushing stopped", f)
        )

    def stop(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.flush()

    def flush(self) -> Deferred[None]:
        if not self._counts:
            return succeed(None)
        counts, self._counts = self._counts, Counter()
        d = self.store.add(dict(counts))

        def failed(failure: Any) -> None:
            # Put them back: the next flush tries again.
            self._counts.update(counts)
            log.warn("statistics not written: {why}", why=failure.getErrorMessage())

        return d.addErrback(failed)
