"""Listeners' connections that send a write at once when nothing is waiting before it.

An SMTP session is mostly short replies to short commands; Twisted's TCP transport
would hold each in its buffer until the reactor's next pass.  The listeners' ports
build :class:`EagerServer` connections instead, with the write rule of the delivery
agent's connections (:class:`~sendarix.egress.transport.EagerWrites`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

from sendarix.egress.transport import EagerWrites

__all__ = ["EagerServer", "send_eagerly"]


class EagerServer(EagerWrites, tcp.Server):
    """A TCP server connection with :class:`~sendarix.egress.transport.EagerWrites`."""


def send_eagerly(port: Any) -> None:
    """Make ``port`` (a listening port) build :class:`EagerServer` connections, if
    it is one of Twisted's TCP ports with the plain server transport; any other
    port (UNIX, or one that already has a transport of its own) is left alone."""
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer
