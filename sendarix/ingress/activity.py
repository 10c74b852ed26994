"""How many clients are sending mail to this process right now.

Delivery reads it to tell a lone message from one of a burst: while other clients are
still sending, more mail is on its way, and the mail already handed over may wait a
moment to share an outgoing session with it (``Scheduler._gather``).  A session counts
from its connection until the reply that ends its first transaction, then from each
MAIL to the reply that ends that transaction.  When the last one stops counting, the
listeners registered with :meth:`IntakeActivity.on_quiet` are told, so nothing waits
longer than the clients keep sending.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field

__all__ = ["IntakeActivity"]


@define
class IntakeActivity:
    """The count of sessions sending mail, shared by every listener of one process."""

    receiving: int = 0
    _quiet: list[Callable[[], None]] = field(factory=list, init=False)

    def busy(self) -> bool:
        """Whether a client is sending mail now."""
        return self.receiving > 0

    def began(self) -> None:
        """A session started sending (it connected, or its MAIL was accepted)."""
        self.receiving += 1

    def ended(self) -> None:
        """A session stopped sending: its transaction was answered or dropped (RSET,
        a new EHLO), or it left; the last one to stop tells the quiet listeners."""
        if self.receiving <= 0:
            return  # a count that cannot go below zero, whatever the caller does
        self.receiving -= 1
        if self.receiving == 0:
            for listener in list(self._quiet):
                listener()

    def on_quiet(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` each time the count falls to zero."""
        self._quiet.append(listener)
