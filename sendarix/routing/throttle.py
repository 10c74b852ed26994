"""Outbound pacing building blocks (sans-IO: time is passed in).

:class:`MemoryThrottle` is the single-node :class:`~sendarix.interfaces.IThrottle`:
per-key connection counters and GCRA pacing (:mod:`sendarix.model.gcra`) that says
how long to wait rather than only yes or no, so a delivery can be rescheduled for
exactly when it will be admitted.  :class:`AdaptiveRate` adjusts one destination's
rate from its replies: a 421 or a 4.7.x deferral halves it (multiplicative decrease,
down to a floor, optionally suspending the destination), each success adds back a
twentieth of the base rate (additive recovery), as TCP does with its window.
"""

from __future__ import annotations

from attrs import define, field
from zope.interface import implementer

from sendarix.interfaces import IThrottle
from sendarix.model.gcra import GcraTable, Pacing


@implementer(IThrottle)
@define
class MemoryThrottle:
    """In-memory connection counters and GCRA pacing for one node.

    ``burst`` is how many messages may go back to back before pacing starts (1: even
    spacing of ``period / rate`` seconds).  Keys are arbitrary strings.

    ``share`` is this process's part of every limit (1/N for one of N worker
    processes that count on their own): each takes that part of each connection
    cap (at least one connection) and rate, so that together they stay within it.
    """

    burst: float = 1.0
    pacing: GcraTable = field(factory=GcraTable)
    share: float = 1.0
    _connections: dict[str, int] = field(factory=dict, init=False)

    def acquire_connection(self, key: str, limit: int, now: float) -> bool:
        """Take a connection slot for ``key`` unless ``limit`` are already open."""
        count = self._connections.get(key, 0)
        if self.share < 1.0:
            limit = max(1, int(limit * self.share))
        if count >= limit:
            return False
        self._connections[key] = count + 1
        return True

    def release_connection(self, key: str) -> None:
        """Give back a connection slot (a release without an acquire is ignored)."""
        count = self._connections.get(key, 0)
        if count <= 1:
            self._connections.pop(key, None)
        else:
            self._connections[key] = count - 1

    def connections(self, key: str) -> int:
        """Connections open for ``key`` now."""
        return self._connections.get(key, 0)

    def admit(self, key: str, rate: float, period: float, now: float) -> float:
        """0.0 when one message for ``key`` may go now (it is counted), else the
        seconds until it may."""
        return self.pacing.admit(key, Pacing.of(rate * self.share, period, self.burst), now)


def is_rate_signal(code: int, enhanced: str | None = None) -> bool:
    """True for a reply that asks us to slow down: 421, or a 4.7.x enhanced code."""
    return code == 421 or (enhanced is not None and enhanced.startswith("4.7."))


@define
class AdaptiveRate:
    """One destination's current sending rate (messages per period), between
    ``floor`` and ``base_rate``."""

    base_rate: float
    floor: float
    rate: float = field(init=False)
    suspended_until: float | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if not 0 < self.floor <= self.base_rate:
            raise ValueError("need 0 < floor <= base_rate")
        self.rate = float(self.base_rate)

    def throttled(self, now: float, suspend_for: float = 0.0) -> None:
        """The destination asked us to slow down: halve the rate (not below the
        floor) and, with ``suspend_for`` > 0, send nothing for that many seconds."""
        self.rate = max(self.floor, self.rate * 0.5)
        if suspend_for > 0:
            until = now + suspend_for
            if self.suspended_until is None or until > self.suspended_until:
                self.suspended_until = until

    def success(self) -> None:
        """A message was accepted: recover a twentieth of the base rate."""
        self.rate = min(self.base_rate, self.rate + self.base_rate / 20.0)

    def on_reply(
        self, code: int, enhanced: str | None, now: float, suspend_for: float = 0.0
    ) -> bool:
        """Feed one reply: a rate signal throttles (True), a 2xx counts as a success;
        other replies change nothing."""
        if is_rate_signal(code, enhanced):
            self.throttled(now, suspend_for)
            return True
        if 200 <= code < 300:
            self.success()
        return False

    def is_suspended(self, now: float) -> bool:
        """True while a suspension is running."""
        if self.suspended_until is not None and now >= self.suspended_until:
            self.suspended_until = None
        return self.suspended_until is not None
