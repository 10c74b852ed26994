"""Several reactor processes on one machine: ``[node] workers = N`` or ``--workers N``.

The parent process (:class:`WorkerPool`) runs no listener and no delivery itself: it
starts N children, each ``twistd -n sendarix`` with the same configuration plus
``--worker I``, restarts a child that dies, and on stop sends every child SIGTERM
(each drains its sessions as a single node does) and SIGKILL to any child still
running after the grace period.  Worker I runs as node ``<name>-wI``: a stable name,
so its events say which process handled a message and a restarted worker takes back
its own leases at once.

The children share the spool named by ``[spool] url`` (Redis, or SQLite on this
machine) and share each TCP listener's port through SO_REUSEPORT: every worker binds
its own socket to the same address, and the kernel spreads incoming connections
across them (:func:`listen_shared`; Twisted's ``listenTCP`` cannot set the option, so
the socket is made here and handed to ``reactor.adoptStreamPort``).

The supervisor also makes a private directory (mode 0700, removed when it stops) and
gives it to every worker (``--peers DIR``): each serves its own metrics there on a
UNIX socket, and the one a scrape reaches answers for the node
(:mod:`sendarix.node.peermetrics`).  The directory's name carries the supervisor's
PID, so a supervisor that was killed (and could not remove it) leaves one that the
next supervisor removes.

A worker whose parent is gone (killed with SIGKILL, so it could not stop its
children) stops itself, as gracefully as on SIGTERM (:class:`ParentWatch`): a
supervisor started again must not find the old workers still holding the port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

log = Logger()

#: The log observer factory every worker is started with (twistd's ``--logger``).
WORKER_LOGGER = "sendarix.node.logfile.worker_observer"

#: The workers' directory of supervisor PID is ``<tmp>/sendarix-workers-PID-XXXXXXXX``.
PEERS_PREFIX = "sendarix-workers-"


def remove_orphan_peer_dirs(parent: str) -> list[str]:
    """Remove the workers' directories in ``parent`` whose supervisor is gone (no
    process has its PID any more); the paths removed.  Only this user's are looked
    at (others' cannot be ours), and a directory whose PID is in use, even by another
    program, is left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PEERS_PREFIX):
            continue
        pid_text, sep, _ = name[len(PEERS_PREFIX):].partition("-")
        if not sep or not pid_text.isdigit():
            continue  # not ours, or made before the PID was in the name
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or pid_alive(int(pid_text)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether some process (ours or another user's) has ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process has it
    return True


__all__ = [
    "PEERS_PREFIX", "TWISTD", "ParentWatch", "WorkerPool", "listen_shared",
    "pid_alive", "remove_orphan_peer_dirs", "twistd_log_file", "twistd_reactor",
    "worker_name",
]

#: How a child runs twistd (the same interpreter as the parent).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def worker_name(node: str, index: int) -> str:
    """The node name of worker ``index`` (1-based) of node ``node``."""
    return f"{node}-w{index}"


def listen_shared(reactor: Any, description: str, factory: Any) -> Deferred[IListeningPort]:
    """Listen on a server endpoint string with SO_REUSEPORT, so that several processes
    can each listen on the same TCP address.  ``tcp:``, ``tcp6:`` and ``ssl:`` endpoints
    are shared; any other kind (``unix:``, ``systemd:``) is listened on as usual."""
    endpoint = endpoints.serverFromString(reactor, description)
    tcp = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint, endpoints.SSL4ServerEndpoint)
    if not isinstance(endpoint, tcp) or not hasattr(socket, "SO_REUSEPORT"):
        log.warn("listener {endpoint} cannot be shared between workers", endpoint=description)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening
    interface = endpoint._interface or (
        "::" if isinstance(endpoint, endpoints.TCP6ServerEndpoint) else "0.0.0.0"
    )
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, endpoint._port))
            sock.listen(endpoint._backlog)
            sock.setblocking(False)
            port: IListeningPort = reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
    except OSError:
        return _failed()
    return succeed(port)


def _twistd_option(argv: Sequence[str], long: str, short: str) -> str | None:
    """The value of twistd's option ``--long`` / ``-short`` in ``argv`` (before the
    ``sendarix`` subcommand, in any of its spellings); None when not given."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "sendarix":
            break
        if arg.startswith(f"--{long}="):
            value = arg.split("=", 1)[1]
        elif arg in (f"--{long}", f"-{short}") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"-{short}") and not arg.startswith("--") and len(arg) > 2:
            value = arg[2:]
    return value


def twistd_log_file(argv: Sequence[str]) -> str | None:
    """The ``--logfile`` given to twistd in ``argv`` (before the ``sendarix``
    subcommand), as an absolute path; None for none or standard output (``-``)."""
    value = _twistd_option(argv, "logfile", "l")
    if not value or value == "-":
        return None
    return os.path.abspath(value)


def twistd_reactor(argv: Sequence[str]) -> str | None:
    """The ``--reactor`` given to twistd in ``argv``, which the workers are started
    with too; None when none was chosen (each then installs twistd's default)."""
    return _twistd_option(argv, "reactor", "r") or None


class ParentWatch(Service):
    """In a worker: stop the node once the supervisor that started it is gone.

    The supervisor's death is seen as a change of the parent process id (the
    orphan is adopted by init or a subreaper), checked every ``interval`` seconds;
    ``stop`` then stops the node as SIGTERM would (its sessions drain, its leases go
    back).  The supervisor's stop is not needed for this: a SIGKILL skips it.
    """

    name = "parent-watch"

    def __init__(
        self,
        reactor: Any,
        stop: Callable[[], None],
        interval: float = 1.0,
        parent: Callable[[], int] = os.getppid,
    ) -> None:
        self._reactor = reactor
        self._stop = stop
        self._interval = interval
        self._parent = parent
        self._expected = parent()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._loop = LoopingCall(self._check)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _check(self) -> None:
        if self._parent() == self._expected:
            return
        log.warn("the supervisor (pid {pid}) is gone: stopping this worker",
                 pid=self._expected)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._stop()


def _failed() -> Deferred[IListeningPort]:
    d: Deferred[IListeningPort] = Deferred()
    d.errback(Failure())
    return d


class _Child(ProcessProtocol):
    """One worker process, reporting its end to the pool."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool._ended(self, reason)


class WorkerPool(Service):
    """Starts ``count`` worker processes and keeps them running until stopped.

    ``arguments`` are the sendarix plugin's arguments every child gets (its config);
    each child also gets ``--worker I``, and twistd's ``--reactor`` when
    ``reactor_name`` is given.  ``grace`` is how long a stop waits for the children's
    own graceful stop before it kills them.
    """

    name = "workers"
    #: Seconds before a worker that died is started again (doubling to ``max_delay``).
    restart_delay = 1.0
    max_delay = 30.0

    def __init__(
        self, reactor: Any, count: int, arguments: Sequence[str], grace: float = 40.0,
        log_file: str | None = None, reactor_name: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.arguments = list(arguments)
        self.grace = grace
        self.log_file = log_file
        self.reactor_name = reactor_name
        self.children: dict[int, _Child] = {}
        self.pids: dict[int, int] = {}
        self._delays: dict[int, float] = {}
        #: The workers' private directory (their metrics sockets) while running.
        self.peers: str | None = None

    def command(self, index: int) -> list[str]:
        """The command line of worker ``index``.  Workers log to the supervisor's
        standard output, or with ``log_file`` each to its own file next to it
        (``sendarix.log`` -> ``sendarix-w1.log``), through the observer that writes
        a pass of the reactor at a time (:mod:`sendarix.node.logfile`)."""
        logging = [f"--logger={WORKER_LOGGER}"]
        if self.log_file:
            root, ext = os.path.splitext(self.log_file)
            logging.append(f"--logfile={root}-w{index}{ext}")
        peers = ["--peers", self.peers] if self.peers else []
        reactor = [f"--reactor={self.reactor_name}"] if self.reactor_name else []
        return [
            *TWISTD, "-n", "--pidfile=", *reactor, *logging, "sendarix", *self.arguments,
            *peers, "--worker", str(index),
        ]

    #: Pass SIGHUP on to every worker (each reloads its TLS certificate); twistd sets it.
    forward_sighup = False

    def startService(self) -> None:
        super().startService()
        removed = remove_orphan_peer_dirs(tempfile.gettempdir())
        if removed:
            log.info("removed {count} workers' directories of supervisors that are gone",
                     count=len(removed))
        # Made 0700 by mkdtemp: only this user may read the workers' metrics.
        self.peers = tempfile.mkdtemp(prefix=f"{PEERS_PREFIX}{os.getpid()}-")
        for index in range(1, self.count + 1):
            self._spawn(index)
        if self.forward_sighup:
            signal.signal(
                signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self._hup)
            )

    def _hup(self) -> None:
        for child in list(self.children.values()):
            self._signal(child, signal.SIGHUP)

    def _spawn(self, index: int) -> None:
        if not self.running:
            return
        child = _Child(self, index)
        transport = self.reactor.spawnProcess(
            child, sys.executable, self.command(index), env=dict(os.environ),
            childFDs={0: "w", 1: 1, 2: 2},
        )
        self.children[index] = child
        self.pids[index] = transport.pid
        log.info("worker {index} started, pid {pid}", index=index, pid=transport.pid)

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
            self.pids.pop(child.index, None)
        if not self.running:
            return
        delay = self._delays.get(child.index, self.restart_delay)
        self._delays[child.index] = min(delay * 2, self.max_delay)
        log.warn(
            "worker {index} ended ({why}); starting it again in {delay:.0f} s",
            index=child.index, why=reason.getErrorMessage(), delay=delay,
        )
        self.reactor.callLater(delay, self._spawn, child.index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        children = list(self.children.values())
        for child in children:
            self._signal(child, signal.SIGTERM)
        if not children:
            self._remove_peers()
            return succeed(None)
        killer = self.reactor.callLater(self.grace, self._kill_all, children)

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            self._remove_peers()
            return result

        return DeferredList([c.ended for c in children]).addBoth(done)

    def _remove_peers(self) -> None:
        if self.peers is not None:
            shutil.rmtree(self.peers, ignore_errors=True)
            self.peers = None

    def _kill_all(self, children: list[_Child]) -> None:
        for child in children:
            if not child.ended.called:
                log.warn("worker {index} did not stop in time: killing it", index=child.index)
                self._signal(child, signal.SIGKILL)

    @staticmethod
    def _signal(child: _Child, signum: int) -> None:
        try:
            if child.transport is not None:
                child.transport.signalProcess(signum)
        except Exception:  # already gone
            pass
