"""The cyclic garbage collector, set for a node that runs for months.

CPython's defaults suit short scripts.  In a busy node they cost about a twentieth
of each worker's CPU, in two ways:

- Every full collection walks every object the process holds, and nearly all of
  them were made at start-up and live as long as the process: modules, classes,
  functions, the configuration, compiled templates.  With about 95,000 of them, a
  full collection took 45–60 ms, six times per 5,000 messages relayed per worker.
  That is also a pause of the reactor that a message in flight waits out.
- The youngest generation is collected after every 700 net allocations of
  container objects.  Each message creates Deferreds, coroutines and Failures that
  refer to one another (reference cycles that only the collector frees), so that
  happened about once per eight messages, and each time the collector also walked
  the objects of every message still in flight.

:class:`CollectorTuning` therefore does two things:

- once the reactor runs, it collects once and then freezes what start-up left
  (``gc.freeze``), so later collections skip it;
- it collects the youngest generation after :data:`YOUNG_THRESHOLD` allocations
  instead of 700, so each collection frees the cycles of many messages at once.

Measured per worker over 5,000 relayed messages: 682 ms in the collector before;
after, about 20 ms, plus 55–80 ms once at start-up for the collection before the
freeze.  The garbage left waiting between collections did not show in the peak
RSS (226–227 MiB for the two workers and the supervisor, before and after).

Only ``twistd sendarix`` adds this service (:mod:`sendarix.node.tap`): an
application that embeds the node keeps its collector as it set it.  Stopping the
service puts the thresholds back and unfreezes.
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Net allocations of container objects between two collections of the youngest
#: generation (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


class CollectorTuning(Service):
    """Sets the collector's thresholds while running, and freezes what start-up left
    once the reactor has run its first pass."""

    name = "garbage-collector"

    def __init__(self, reactor: IReactorTime, young: int = YOUNG_THRESHOLD) -> None:
        self._reactor = reactor
        self._young = young
        #: The thresholds in force before :meth:`startService`, put back on stop.
        self._before: tuple[int, int, int] | None = None
        self._freeze: IDelayedCall | None = None
        self._frozen = False

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        if not hasattr(gc, "freeze"):
            # Not CPython's collector (PyPy's has neither generations to set nor a
            # freeze): left as it is.
            return
        self._before = gc.get_threshold()
        gc.set_threshold(self._young, *self._before[1:])
        # Services start before the reactor runs; what they set up by its first
        # pass lives as long as the node does.
        self._freeze = self._reactor.callLater(0, self._freeze_start_up)

    def _freeze_start_up(self) -> None:
        self._freeze = None
        gc.collect()
        gc.freeze()
        self._frozen = True

    def stopService(self) -> None:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        if self._freeze is not None:
            self._freeze.cancel()
            self._freeze = None
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        if self._before is not None:
            gc.set_threshold(*self._before)
            self._before = None
