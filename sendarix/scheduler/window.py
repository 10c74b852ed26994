"""Per-destination concurrency windows, after Postfix's qmgr (sans-IO: time is passed in).

A destination starts with a small number of parallel connections.  Each successful
delivery grows the window by ``1/window`` (so a whole cohort of successes adds one
slot, like TCP's additive increase); each connection-level failure shrinks it by one.
When the window is already at its minimum and ``dead_after`` failed cohorts follow each
other with no success in between, the destination is declared dead for ``suspend_for``
seconds: its mail is deferred at once instead of timing out connection after
connection.

A connection's slot is a :class:`WindowSlot`: it is given back once, with the session's
verdict or without one, and giving it back again does nothing.  No path of the delivery
agent can then free a slot that another connection holds.
"""

from __future__ import annotations

from attrs import define, field


@define
class DestinationWindow:
    """The concurrency window of one destination (domain or MX site)."""

    initial: int = 5
    maximum: int = 20
    minimum: int = 1
    dead_after: int = 3
    suspend_for: float = 300.0
    window: float = field(init=False)
    active: int = field(init=False, default=0)
    _failed_cohorts: float = field(init=False, default=0.0)
    dead_until: float | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        self.window = float(self.initial)

    @property
    def limit(self) -> int:
        """Connections allowed at once now."""
        return max(self.minimum, min(self.maximum, int(self.window)))

    def is_dead(self, now: float) -> bool:
        """True while the destination is suspended."""
        if self.dead_until is not None and now >= self.dead_until:
            # Probe again: one connection at the minimum window.
            self.dead_until = None
            self._failed_cohorts = 0.0
            self.window = float(self.minimum)
        return self.dead_until is not None

    def acquire(self, now: float) -> WindowSlot | None:
        """A connection slot; None when the window is full or the site is dead."""
        return WindowSlot(self) if self.try_acquire(now) else None

    def try_acquire(self, now: float) -> bool:
        """Take a connection slot; False when the window is full or the site is dead."""
        if self.is_dead(now) or self.active >= self.limit:
            return False
        self.active += 1
        return True

    def success(self) -> None:
        """A connection delivered (whatever the per-recipient replies were)."""
        self._release()
        self._failed_cohorts = 0.0
        self.window = min(float(self.maximum), self.window + 1.0 / self.limit)

    def failure(self, now: float) -> None:
        """A connection failed (refused, timed out, 421, dropped)."""
        self._release()
        at_floor = self.window <= self.minimum
        self.window = max(float(self.minimum), self.window - 1.0)
        if at_floor:
            self._failed_cohorts += 1.0 / max(self.limit, 1)
            if self._failed_cohorts >= self.dead_after:
                self.dead_until = now + self.suspend_for

    def release(self) -> None:
        """Give a slot back without a verdict (e.g. nothing was sent)."""
        self._release()

    def _release(self) -> None:
        if self.active > 0:
            self.active -= 1


@define(eq=False)
class WindowSlot:
    """One connection's place in a :class:`DestinationWindow`, given back once."""

    window: DestinationWindow
    #: Still counted in the window's ``active``.
    held: bool = True

    def success(self) -> None:
        """The connection delivered: give the slot back and grow the window."""
        if self._give_back():
            self.window.success()

    def failure(self, now: float) -> None:
        """The connection failed: give the slot back and shrink the window."""
        if self._give_back():
            self.window.failure(now)

    def release(self) -> None:
        """Give the slot back without a verdict (nothing was sent)."""
        if self._give_back():
            self.window.release()

    def _give_back(self) -> bool:
        held, self.held = self.held, False
        return held
