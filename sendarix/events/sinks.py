"""Event sinks: where each outcome event goes once it happened (log lines, fan-out)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import ClassVar

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from sendarix.interfaces import IEventSink, ILaterEventSink
from sendarix.model.event import Event

#: The key under which a log event made here carries its finished text: no fields to
#: look up, no braces escaped.  The workers' log observer
#: (:class:`sendarix.node.logfile.BatchedTextObserver`) writes that text as it is,
#: instead of running Twisted's formatter over ``log_format`` to get it back.
PLAIN_TEXT = "sendarix_text"

# -- sinks -----------------------------------------------------------------------


def _sinks(sinks: Iterable[IEventSink]) -> tuple[IEventSink, ...]:
    # A fan-out among the sinks is opened up: one loop over all of them per event,
    # not a loop and a Deferred per level.
    flat: list[IEventSink] = []
    for sink in sinks:
        flat.extend(sink.sinks if isinstance(sink, FanoutSink) else (sink,))
    return tuple(flat)


@implementer(IEventSink)
@define
class JSONLogSink:
    """Writes each event to twisted.logger, the JSON form under ``sendarix_event``.

    With ``twist``'s JSON log output every event becomes one machine-readable line.
    """

    _log: Logger = field(factory=lambda: Logger(namespace="sendarix.events"), alias="logger")

    def emit(self, event: Event) -> None:
        """Log one event: ``event TYPE queue_id=Q recipient=R``."""
        line = f"event {event.type} queue_id={event.queue_id} recipient={event.recipient}"
        log = self._log
        # Two lines per message make this the busiest logging there is, so the log
        # event is made here as Logger.info would make it, with what the text output
        # would otherwise work out for every line: the line written out (its braces
        # escaped), marked as having no fields to look up ("log_flattened"), and
        # the "system" it is shown under.
        log.observer({
            "log_logger": log,
            "log_level": LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": line.replace("{", "{{").replace("}", "}}"),
            "log_flattened": {},
            PLAIN_TEXT: line,
            "log_system": f"{log.namespace}#info",
            "log_time": time.time(),
            "sendarix_event": event.shared_json(),
        })


def _nothing(_: object) -> None:
    return None


@implementer(ILaterEventSink)
@define
class FanoutSink:
    """Emits every event to several sinks; a failing sink is logged and skipped.

    The Deferred from ``emit`` fires (with None, never failing) once every sink is
    done with the event.  With a ``clock``, :meth:`emit_later` holds an event for
    the reactor's next pass (without one, it emits at once).
    """

    sinks: tuple[IEventSink, ...] = field(converter=_sinks)
    clock: IReactorTime | None = None
    _log: ClassVar[Logger] = Logger()
    #: Events held by emit_later, in order, with what fires once each is recorded.
    _later: list[tuple[Event, Deferred[None]]] = field(factory=list, init=False)
    _flush: IDelayedCall | None = field(default=None, init=False)

    def emit_later(self, event: Event) -> Deferred[None]:
        """Hand ``event`` to every sink on the reactor's next pass, or before the
        next :meth:`emit`, whichever comes first; the Deferred fires then (what the
        sinks do with it afterwards, such as the delivery log's commit, is not
        waited for, as a stopping node need not: the stores close after it).

        A message's ``accepted`` event comes here: its log line and delivery-log
        row then wait while the reactor reads what has arrived since the hand-over
        (the destination's first replies, the client's QUIT), instead of keeping
        the message's delivery waiting.  Any event emitted meanwhile (its delivery's
        outcome among them) sends the held ones first, so no sink sees them out of
        order."""
        if self.clock is None:
            self.emit(event)
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._later.append((event, done))
        if self._flush is None:
            # Called from a timed call (the hand-over's), a timed call made now runs
            # on the reactor's next pass, after it has looked at its sockets.
            self._flush = self.clock.callLater(0, self._emit_held)
        return done

    def _emit_held(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        held, self._later = self._later, []
        for event, done in held:
            self._emit_now(event)  # never fails: a failing sink is logged
            done.callback(None)

    def emit(self, event: Event) -> Deferred[None]:
        """Hand ``event`` to every sink (after any held by :meth:`emit_later`)."""
        if self._later:
            self._emit_held()
        return self._emit_now(event)

    def _emit_now(self, event: Event) -> Deferred[None]:
        # Most sinks answer at once (a log line, a counter): only the Deferreds of
        # those that do not are waited for (two events per message pass here).
        waiting = []
        for sink in self.sinks:
            try:
                result = sink.emit(event)
            except Exception:
                self._failed(Failure(), sink, event)
                continue
            if isinstance(result, Deferred):
                waiting.append(result.addErrback(self._failed, sink, event))
        if not waiting:
            return succeed(None)
        if len(waiting) == 1:
            # The usual case (the delivery log): no DeferredList for a single wait.
            return waiting[0].addCallback(_nothing)
        return gatherResults(waiting).addCallback(_nothing)

    def _failed(self, failure: Failure, sink: IEventSink, event: Event) -> None:
        self._log.failure(
            "event sink {sink!r} failed on event {event_id}",
            failure,
            sink=sink,
            event_id=event.id,
        )
