"""What the tests of the eager connections share: looking at what has reached the
other end of a socket without taking it, and a flood larger than the kernel takes at
once, followed by a marker, read back whole."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.protocol import Protocol

#: Written after the flood: it must arrive last.
MARKER = b"END"


def peek(sock: socket.socket, size: int = 4096) -> bytes:
    """What has arrived on ``sock`` (non-blocking) and not been read: b"" for none."""
    try:
        return sock.recv(size, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


def flood() -> bytes:
    """16 MiB of random bytes: more than a loopback socket takes at once."""
    return os.urandom(1 << 16) * 256


class Flooding(Protocol):
    """Once connected, writes ``data`` and then :data:`MARKER`, and closes.  Notes in
    ``buffered`` whether the first write left bytes in Twisted's buffer (the kernel
    took only part of it, so the marker had to wait behind the rest)."""

    def __init__(self, data: bytes, buffered: list[bool]) -> None:
        self.data = data
        self.buffered = buffered

    def connectionMade(self) -> None:  # noqa: N802
        transport: Any = self.transport
        # A small, fixed send buffer: with the kernel's autotuned one and a reader
        # draining on the other CPU, a 16 MiB send once went through whole, and the
        # test then had nothing left in Twisted's buffer to keep in order.
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        transport.write(self.data)
        self.buffered.append(bool(transport._tempDataBuffer or transport.dataBuffer))
        transport.write(MARKER)
        transport.loseConnection()


def read_until_closed(sock: socket.socket, timeout: float = 20.0) -> bytes:
    """Everything ``sock`` receives until the other end closes (blocking: run it in
    a thread); closes ``sock``."""
    chunks = []
    with sock:
        sock.settimeout(timeout)
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)
