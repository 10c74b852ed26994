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

:class:`EagerConnecting` gives an endpoint's connections the eager transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["EagerClient", "EagerConnecting", "EagerWrites"]


class EagerWrites:
    """The write of a Twisted TCP connection (mixed in before ``tcp.Server`` or
    ``tcp.Client``), sent straight to the socket when it can be.

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
    _writeDisconnected: bool
    producer: Any
    _tempDataBuffer: list[bytes]
    dataBuffer: bytes
    offset: int
    socket: Any

    def write(self, data: bytes) -> None:
        if (
            type(data) is bytes
            and data
            and not self.TLS
            and self.connected
            and not self._writeDisconnected
            and self.producer is None
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
        super().write(data)  # type: ignore[misc]


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
