"""A worker's log: twistd's text lines, written a reactor pass at a time.

twistd's own text observer works out the time and its zone offset for every line and
writes and flushes each line by itself.  A busy worker logs two lines per message
(its ``accepted`` and ``delivered`` events), so that is a system call and a time
conversion per line, on the reactor thread, hundreds of times a second.
:class:`BatchedTextObserver` writes the same lines, formatted by Twisted's own
formatter, but works the time out once per second (the format shows whole seconds)
and gathers the lines of one pass of the reactor into one write.  An event line
carries its finished text (:data:`sendarix.events.sinks.PLAIN_TEXT`), so it is put
together without Twisted's formatting pass, into the line that pass would make.

Lines never wait longer than the pass that logged them, except when the reactor is
stuck in a pass (and then nothing else moves either).  Lines are written at once when
they are a warning or worse, when they come from another thread, when the reactor is
not running (start-up, shut-down), and when the gathered lines reach
:data:`WRITE_LIMIT`.  Each write carries whole lines only, at most
:data:`WRITE_LIMIT` characters unless a single line is longer: several workers share
the supervisor's standard output, and on a pipe Linux never splits a write of up to
4,096 octets with another process's (a longer line, or one of much non-ASCII text,
can still be split, as it can with twistd's own observer).

The supervisor starts every worker with ``--logger`` naming :func:`worker_observer`
(``sendarix.node.workers``); a one-process node keeps twistd's observer unless it is
started with the same option.
"""

from __future__ import annotations

import atexit
import math
import signal
import sys
import threading
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from twisted.python.logfile import LogFile
from zope.interface import implementer

from sendarix.events.sinks import PLAIN_TEXT

#: The most characters one write carries, unless a single line is longer (Linux's
#: ``PIPE_BUF``, in octets).
WRITE_LIMIT = 4096

#: Levels written at once, ahead of the end of the pass.
_URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})


@implementer(ILogObserver)
class BatchedTextObserver:
    """Writes events to ``out`` as twistd's text observer would, a pass at a time.

    ``reactor`` is asked whether it runs and is given the write at the end of the
    pass (``callLater(0, ...)``).
    """

    def __init__(self, out: IO[str], reactor: Any, limit: int = WRITE_LIMIT) -> None:
        self._out = out
        self._reactor = reactor
        self._limit = limit
        # Reentrant: Python runs a signal handler on the main thread between two
        # steps of whatever it was doing, which may be a write of this observer, and
        # twistd's handler for SIGTERM logs a line.  With a plain lock that line
        # waited for the lock its own thread held, and the process never stopped.
        self._lock = threading.RLock()
        self._writing = False
        self._pending: list[str] = []
        self._size = 0
        self._scheduled = False
        # One tuple: a thread reading it sees a second and its own text.
        self._second: tuple[int, str] = (-1, "")

    def _time(self, when: float | None) -> str:
        if when is None:
            return formatTime(None)
        fraction, whole = math.modf(when)
        # As datetime rounds it, to the microsecond: 1.9999999 is shown as 2.
        second = int(whole) + (round(fraction * 1e6) >= 1_000_000)
        last, text = self._second
        if second != last:
            text = formatTime(second)
            self._second = (second, text)
        return text

    def _format(self, event: LogEvent) -> str | None:
        plain = event.get(PLAIN_TEXT)
        system = event.get("log_system")
        if (
            isinstance(plain, str) and plain and "\n" not in plain
            and isinstance(system, str) and "log_failure" not in event
        ):
            # An event line (two per message): its text is known already, so the line
            # is put together as Twisted's formatter would put it.
            return f"{self._time(event.get('log_time'))} [{system}] {plain}\n"
        return formatEventAsClassicLogText(event, formatTime=self._time)

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        if not text:
            return
        schedule = False
        with self._lock:
            if self._writing:
                # A line logged on this thread in the middle of its own write (by a
                # signal handler): the write under way takes it before it returns
                # (or, in the last instant of that write, the next write does).
                self._pending.append(text)
                self._size += len(text)
                return
            if self._size + len(text) > self._limit:
                self._write()  # what was gathered, so that this write stays within it
            self._pending.append(text)
            self._size += len(text)
            if (
                self._size >= self._limit
                or event.get("log_level") in _URGENT
                or not self._reactor.running
                # The reactor's thread, as Twisted records it when the reactor starts.
                or threading.get_ident() != threadable.ioThread
            ):
                self._write()
            elif not self._scheduled:
                self._scheduled = schedule = True
        if schedule:
            self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write every gathered line now."""
        with self._lock:
            self._scheduled = False
            self._write()

    def _write(self) -> None:
        # Called with the lock held.  Lines gathered while it writes (see __call__)
        # are written by the same call, after the others.
        self._writing = True
        try:
            while self._pending:
                # Swapped, not cleared after the join: a line added in between
                # would be lost.
                pending, self._pending = self._pending, []
                self._size = 0
                try:
                    self._out.write("".join(pending))
                    self._out.flush()
                except (OSError, ValueError):
                    # A log that cannot be written (a closed pipe, a full disk) must
                    # not stop the node, nor turn into more log lines about itself.
                    pass
        finally:
            self._writing = False


def worker_observer() -> BatchedTextObserver:
    """The log observer a worker is started with (twistd's ``--logger``).

    Like twistd's own, it writes to the file given with ``--logfile`` (rotated at
    the same size and on SIGUSR1), or to standard output without one.
    """
    from twisted.internet import reactor

    from sendarix.node.workers import twistd_log_file

    out: IO[str]
    path = twistd_log_file(sys.argv)
    if path is None:
        out = sys.stdout
    else:
        log_file = LogFile.fromFullPath(path)
        out = log_file  # type: ignore[assignment]  # write() and flush() are all it needs
        if not signal.getsignal(signal.SIGUSR1):
            signal.signal(
                signal.SIGUSR1,
                lambda signum, frame: reactor.callFromThread(log_file.rotate),  # type: ignore[attr-defined]
            )
    observer = BatchedTextObserver(out, reactor)
    atexit.register(observer.flush)
    return observer
