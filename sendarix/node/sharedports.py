"""The worker processes' listening sockets: opened once by the supervisor, inherited by
every worker, and handed to whichever worker is idle.

Before, each worker bound its own socket to the listener's address with SO_REUSEPORT,
and the kernel spread connections over the sockets by a hash of each connection.  Two
things about that hurt a mail relay:

* **A connection can wait behind a busy worker while another is idle.**  Hashing
  cannot know which process is free.  For mail that trickles in (a message now and
  then, the usual case between peaks) it also means both processes write the SQLite
  spool by turns, and every commit of one makes SQLite in the other drop its page
  cache and read its pages back in (about three dozen reads per message, measured
  with ``strace -c``).
* **A worker that dies takes its queue with it.**  Connections the kernel had already
  queued on that worker's socket are reset.

So the supervisor (:class:`~sendarix.node.workers.WorkerPool`) opens each TCP listener
itself (:func:`open_listening_socket`) and passes the one socket to every worker, as
inherited descriptors named in the environment (:data:`INHERITED_ENV`).  A worker adopts
its copy (:func:`listen_shared`) and waits on it with ``EPOLLEXCLUSIVE``: the kernel
then wakes one worker per new connection, the first in line that is waiting for work,
rather than all of them.  The line is the order in which the workers started to
listen, so while the first is idle it takes every connection, and a busy moment
spills over to the next.  A worker that is restarted takes up the same socket (at
the end of the line), and nothing queued is lost.

A worker started by hand (``--worker N``, no supervisor) binds its own socket with
SO_REUSEPORT instead, and a ``unix:`` or ``systemd:`` listener is opened by each worker
as usual.  Where the reactor is not epoll (asyncio, select), every worker is woken and
one wins the ``accept``: correct, only without the preference for the idle worker.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import endpoints, tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

log = Logger()

__all__ = [
    "INHERITED_ENV", "ExclusivePort", "inheritance", "inherited_listeners",
    "listen_shared", "open_listening_socket", "shareable",
]

#: The environment variable that names a worker's inherited listening descriptors:
#: a JSON object from each listener's endpoint string to its descriptor number.
INHERITED_ENV = "SENDARIX_LISTEN_FDS"

_TCP = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
        endpoints.SSL4ServerEndpoint)


def shareable(reactor: Any, description: str) -> bool:
    """Whether the endpoint string names a TCP listener (``tcp:``, ``tcp6:``, ``ssl:``)
    that worker processes can share; ``unix:``, ``systemd:`` and others cannot."""
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except Exception:
        return False
    return isinstance(endpoint, _TCP)


def _address(endpoint: Any) -> tuple[int, str]:
    interface: str = endpoint._interface or (
        "::" if isinstance(endpoint, endpoints.TCP6ServerEndpoint) else "0.0.0.0"
    )
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    return family, interface


def open_listening_socket(reactor: Any, description: str, reuse_port: bool = False
                          ) -> socket.socket:
    """A listening, non-blocking socket for a TCP endpoint string (its address, port
    and backlog), with SO_REUSEPORT when ``reuse_port``.  Raises OSError when the
    address cannot be bound and ValueError for an endpoint that is not TCP."""
    endpoint = endpoints.serverFromString(reactor, description)
    if not isinstance(endpoint, _TCP):
        raise ValueError(f"{description} is not a TCP endpoint")
    family, interface = _address(endpoint)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, endpoint._port))
        sock.listen(endpoint._backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def inherited_listeners(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The listening descriptors this process inherited from its supervisor, by
    endpoint string; empty when it has none (or the variable is not what we write)."""
    text = (os.environ if environ is None else environ).get(INHERITED_ENV, "")
    if not text:
        return {}
    try:
        named = json.loads(text)
    except ValueError:
        log.warn("{name} is not JSON: ignored", name=INHERITED_ENV)
        return {}
    if not isinstance(named, dict):
        return {}
    return {str(k): v for k, v in named.items() if isinstance(v, int) and v >= 0}


def inheritance(descriptions: Iterable[str], first_fd: int = 3) -> dict[str, int]:
    """The child descriptor number each listener gets: ``first_fd``, the next, ..."""
    return {d: first_fd + i for i, d in enumerate(descriptions)}


class ExclusivePort(tcp.Port):
    """A TCP port on a socket several processes listen on, where only one waiting
    process is woken for each new connection (``EPOLLEXCLUSIVE``, on the epoll
    reactor; any other reactor registers it as usual).

    The flag can only be given when a descriptor is added to epoll, so once Twisted
    has added the port, it is removed and added again with the flag.  A process busy
    in a callback is not waiting and is passed over; if it finds the connection gone
    when it comes back, its ``accept`` gets EAGAIN, which Twisted ignores.

    One wake-up can be lost: when the worker the kernel chose is killed before it
    accepts, nobody else is told, and the connection would wait for the next one
    (or for the dead worker's restart).  So the port also looks at its socket every
    :attr:`sweep_interval` seconds and takes what is waiting; with nothing waiting,
    that is one ``accept`` that fails at once.
    """

    #: Seconds between two looks at the socket that no wake-up asked for.
    sweep_interval = 1.0
    _sweep: LoopingCall | None = None

    def startListening(self) -> None:  # noqa: N802
        super().startListening()
        self._sweep = LoopingCall(self._look)
        self._sweep.clock = self.reactor  # type: ignore[assignment]  # it is both
        self._sweep.start(self.sweep_interval, now=False)

    def _look(self) -> None:
        if self.connected and not self.disconnecting:
            self.doRead()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        super().connectionLost(reason)

    def startReading(self) -> None:  # noqa: N802
        super().startReading()
        poller = getattr(self.reactor, "_poller", None)
        exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
        if isinstance(poller, select.epoll) and exclusive:
            fd = self.fileno()
            poller.unregister(fd)
            poller.register(fd, select.EPOLLIN | exclusive)


def _adopt(reactor: Any, fd: int, family: int, factory: Any) -> IListeningPort:
    """Listen with ``factory`` on a copy of the listening descriptor ``fd`` (which is
    closed: the port keeps its own copy)."""
    try:
        port = ExclusivePort._fromListeningDescriptor(reactor, fd, family, factory)
        # The supervisor makes it non-blocking; made sure here, because a blocking
        # socket would hang the reactor in the first accept that finds nobody waiting
        # (another worker took the connection, or the periodic look found none).
        port._preexistingSocket.setblocking(False)
        port.startListening()
    finally:
        os.close(fd)
    return port


def listen_shared(reactor: Any, description: str, factory: Any,
                  inherited: Mapping[str, int] | None = None) -> Deferred[IListeningPort]:
    """Listen on a server endpoint string so that the worker processes share it.

    ``tcp:``, ``tcp6:`` and ``ssl:`` endpoints take the descriptor inherited from the
    supervisor (``inherited``, by default this process's :func:`inherited_listeners`),
    each descriptor once; without one, a socket of this process's own bound with
    SO_REUSEPORT.  Any other kind (``unix:``, ``systemd:``) is listened on as usual.
    """
    endpoint = endpoints.serverFromString(reactor, description)
    if not isinstance(endpoint, _TCP):
        log.warn("listener {endpoint} cannot be shared between workers", endpoint=description)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening
    family, _ = _address(endpoint)
    if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
    named = inherited_listeners() if inherited is None else dict(inherited)
    fd = named.get(description)
    try:
        if fd is not None:
            _forget(description)
            return succeed(_adopt(reactor, fd, family, factory))
        sock = open_listening_socket(reactor, description, reuse_port=True)
        try:
            port: IListeningPort = reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
    except Exception:
        return fail()
    return succeed(port)


def _forget(description: str) -> None:
    """Take one listener out of this process's inherited set: its descriptor is closed
    once adopted, and a later listen on the same endpoint must not reuse the number."""
    named = inherited_listeners()
    if description in named:
        del named[description]
        os.environ[INHERITED_ENV] = json.dumps(named)
