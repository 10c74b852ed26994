"""TCP connections that send a write at once when nothing is waiting before it: the
delivery agent's connections, and the rule the listeners' connections share.

Twisted's TCP transport keeps every write in a buffer and sends it when the reactor
next finds the socket writable: two ``epoll_ctl`` calls (watch for writability, then
stop) and one more pass through the reactor for each write.  An SMTP dialogue is
mostly short lines, each written when the socket's buffer is empty, so that cost
comes with nearly every one, and the line waits for whatever else the reactor does in
the meantime.  :class:`EagerWrites` tries the socket first; what the kernel does not
take, and any write while earlier data still waits, goes through Twisted's buffer as
before, so bytes always leave in the order they were written.  A connection under
STARTTLS writes through its TLS layer, as usual (that layer's records use the buffer).
The close follows the same rule: with nothing left to send, ``loseConnection`` closes
on the reactor's next turn instead of waiting for a writable socket first.

:class:`EagerConnecting` gives an endpoint's connections the eager transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure

__all__ = ["EagerClient", "EagerConnecting", "EagerWrites"]


class EagerWrites:
    """The write and the close of a Twisted TCP connection (mixed in before
    ``tcp.Server`` or ``tcp.Client``), done at once when nothing waits before them.

    It relies on what :class:`twisted.internet.abstract.FileDescriptor` keeps in
    ``dataBuffer``/``offset`` (bytes being sent) and ``_tempDataBuffer`` (bytes
    written since): only when both are empty may a write skip them.  Nor while a
    producer is registered: Twisted asks a producer for more, or lets it go on, as
    its buffer empties, so its writes must go through the buffer.  The tests of
    the listeners' and the delivery agent's connections check that against the
    installed Twisted.
    """

    TLS: bool
    connected: int
    disconnecting: int
    _writeDisconnected: bool
    producer: Any
    _tempDataBuffer: list[bytes]
    dataBuffer: bytes
    offset: int
    socket: Any
    reactor: Any

    def _nothing_waits(self) -> bool:
        """Whether this plain connection has nothing buffered and no producer: only
        then may a write go straight to the socket, or a close skip the flush."""
        return (
            not self.TLS
            and bool(self.connected)
            and not self._writeDisconnected
            and self.producer is None
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
        )

    def sends_at_once(self) -> bool:
        """Whether a write made now goes straight to the socket.  An SMTP session
        asks when it hands a message to the intake, whose 250 it writes once the
        message is stored: when it does, the message is handed to delivery without
        waiting for the reactor's next pass (``Intake.accept``'s
        ``reply_sent_at_once``)."""
        return self._nothing_waits()

    def write(self, data: bytes) -> None:
        if type(data) is bytes and data and self._nothing_waits():
            try:
                sent = self.socket.send(data)
            except OSError:
                # Full, interrupted or broken: the buffer takes it all, and the
                # reactor's own write finds and reports whatever is wrong.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def loseConnection(self) -> None:  # noqa: N802
        """Close once what was written has left, as Twisted's transport does; when
        nothing waits to be sent, without first asking the reactor for a writable
        socket.  Twisted would watch the socket for writability, wake for it, stop
        watching and only then close: two more ``epoll_ctl`` calls and a pass of the
        reactor for each session that ends, when all it has left to send is nothing.
        Here the close runs on the reactor's next turn (never inside the caller, as
        Twisted's own abort does it), and a write made before then still leaves first."""
        if self.disconnecting or not self._nothing_waits():
            super().loseConnection()  # type: ignore[misc]
            return
        self.stopReading()  # type: ignore[attr-defined]
        self.disconnecting = 1
        self.reactor.callLater(0, self._lose_now)

    def _lose_now(self) -> None:
        if not self.connected:
            return  # closed meanwhile (aborted, or the peer went first)
        if not self._nothing_waits():
            # Written to since, and the kernel did not take it all: Twisted's own
            # write path sends the rest and then closes (``disconnecting`` is set).
            self.startWriting()  # type: ignore[attr-defined]
            return
        self.connectionLost(Failure(main.CONNECTION_DONE))  # type: ignore[attr-defined]


class EagerClient(EagerWrites, tcp.Client):
    """A TCP client connection with :class:`EagerWrites`."""


class _EagerConnector(tcp.Connector):
    def _makeTransport(self) -> EagerClient:  # noqa: N802
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


class EagerConnecting:
    """What a TCP client endpoint is given in place of the reactor: it connects as
    the reactor's ``connectTCP`` would, with an :class:`EagerClient` transport.
    (The endpoints call nothing else on their reactor.)"""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectTCP(  # noqa: N802
        self, host: str, port: int, factory: Any, timeout: float = 30,
        bindAddress: Any = None,  # noqa: N803
    ) -> tcp.Connector:
        connector = _EagerConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector
