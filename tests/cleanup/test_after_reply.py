"""When the work after an accepted message's reply runs, against the reactor's next
look at its sockets.

The spool's commit reaches the reactor thread as a call from the database thread
(``callFromThread``); the session writes its 250 from that call.  These tests start
from such a call too, with a socket that is already readable: whatever the reactor
reads from it marks its next look at the sockets.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from sendarix.cleanup.intake import after_reply
from tests.support.relay import until


@implementer(IReadDescriptor)
class _Marker:
    """A readable socket that notes, once, that the reactor looked at it."""

    def __init__(self, sock: socket.socket, order: list[str]) -> None:
        self.sock = sock
        self.order = order

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        self.sock.recv(64)
        reactor.removeReader(self)
        self.order.append("sockets")

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        pass

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "marker"


class AfterReplyTests(TestCase):
    timeout = 10

    async def _order(self, sent_at_once: bool) -> list[str]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        theirs.send(b"x")
        order: list[str] = []
        marker = _Marker(ours, order)

        def from_the_database_thread() -> None:
            reactor.addReader(marker)
            after_reply(reactor, order.append, "work", sent_at_once=sent_at_once)

        reactor.callFromThread(from_the_database_thread)
        await until(lambda: len(order) == 2, 5, "the work and the read")
        return order

    async def test_sent_at_once_runs_in_this_pass(self) -> None:
        """A reply that has left: the work runs before the reactor reads what is
        waiting (a session's QUIT, say)."""
        self.assertEqual(await self._order(sent_at_once=True), ["work", "sockets"])

    async def test_held_reply_waits_for_the_next_pass(self) -> None:
        """A reply the transport holds for the reactor's next pass (TLS, Twisted's
        own transports): the work runs only after that pass."""
        self.assertEqual(await self._order(sent_at_once=False), ["sockets", "work"])
