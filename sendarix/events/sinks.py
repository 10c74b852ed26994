"""Event sinks: where each outcome event goes once it happened (log lines, fan-out)."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sendarix.interfaces import IEventSink
from sendarix.model.event import Event

# -- sinks -----------------------------------------------------------------------


@implementer(IEventSink)
class JSONLogSink:
    """Writes each event to twisted.logger, the JSON form under ``sendarix_event``.

    With ``twist``'s JSON log output every event becomes one machine-readable line.
    """

    log_format = (
        "event {sendarix_event[type]} queue_id={sendarix_event[queue_id]}"
        " recipient={sendarix_event[recipient]}"
    )

    def __init__(self, logger: Logger | None = None) -> None:
        self._log = logger if logger is not None else Logger(namespace="sendarix.events")

    def emit(self, event: Event) -> None:
        """Log one event."""
        self._log.info(self.log_format, sendarix_event=event.to_json())


@implementer(IEventSink)
class FanoutSink:
    """Emits every event to several sinks; a failing sink is logged and skipped.

    The Deferred from ``emit`` fires (with None, never failing) once every sink is
    done with the event.
    """

    _log = Logger()

    def __init__(self, sinks: Iterable[IEventSink]) -> None:
        self.sinks: tuple[IEventSink, ...] = tuple(sinks)

    def emit(self, event: Event) -> Deferred[None]:
        """Hand ``event`` to every sink."""
        results = []
        for sink in self.sinks:
            d = maybeDeferred(sink.emit, event)
            d.addErrback(self._failed, sink, event)
            results.append(d)
        return gatherResults(results).addCallback(lambda _: None)

    def _failed(self, failure: Failure, sink: IEventSink, event: Event) -> None:
        self._log.failure(
            "event sink {sink!r} failed on event {event_id}",
            failure,
            sink=sink,
            event_id=event.id,
        )
