"""Server connections that send a write at once when nothing is waiting before it.

Twisted's TCP transport keeps every write in a buffer and sends it when the reactor
next finds the socket writable: two ``epoll_ctl`` calls (watch for writability, then
stop) and one more pass through the reactor for each reply.  An SMTP session is
mostly short replies to short commands, each sent when the socket's buffer is empty,
so that cost comes with nearly every line.  :class:`EagerServer` tries the socket
first; what the kernel does not take, and any write while earlier data still waits,
goes through Twisted's buffer as before, so bytes always leave in the order they
were written.  A connection under STARTTLS writes through its TLS layer, as usual
(that layer's records use the buffer).

:func:`send_eagerly` makes a listening port give its new connections this transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["EagerServer", "send_eagerly"]


class EagerServer(tcp.Server):
    """A TCP server connection whose writes go straight to the socket when they can.

    It relies on what :class:`twisted.internet.abstract.FileDescriptor` keeps in
    ``dataBuffer``/``offset`` (bytes being sent) and ``_tempDataBuffer`` (bytes
    written since): only when both are empty may a write skip them.  The tests of
    this module check that against the installed Twisted.
    """

    def write(self, data: bytes) -> None:
        if (
            type(data) is bytes
            and data
            and not self.TLS
            and self.connected
            and not self._writeDisconnected
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                # Full, interrupted or broken: the buffer takes it all, and the
                # reactor's own write finds and reports whatever is wrong.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


def send_eagerly(port: Any) -> None:
    """Make ``port`` (a listening port) build :class:`EagerServer` connections, if
    it is one of Twisted's TCP ports with the plain server transport; any other
    port (UNIX, or one that already has a transport of its own) is left alone."""
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer
