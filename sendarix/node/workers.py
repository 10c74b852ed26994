"""Several reactor processes on one machine: ``[node] workers = N`` or ``--workers N``.

The parent process (:class:`WorkerPool`) runs no listener and no delivery itself: it
starts N children, each ``twistd -n sendarix`` with the same configuration plus
``--worker I``, restarts a child that dies, and on stop sends every child SIGTERM
(each drains its sessions as a single node does) and SIGKILL to any child still
running after the grace period.  Worker I runs as node ``<name>-wI``: a stable name,
so its events say which process handled a message and a restarted worker takes back
its own leases at once.

The children share the spool named by ``[spool] url`` (Redis, or SQLite on this
machine) and each TCP listener: the supervisor opens the listening sockets once and
every worker inherits them, and the kernel hands each new connection to a worker that
is waiting for work (:mod:`sendarix.node.sharedports`).

The supervisor also makes a private directory (mode 0700, removed when it stops) and
gives it to every worker (``--peers DIR``): each serves its own metrics there on a
UNIX socket, and the one a scrape reaches answers for the node
(:mod:`sendarix.node.peermetrics`).  The directory's name carries the supervisor's
PID, so a supervisor that was killed (and could not remove it) leaves one that the
next supervisor removes.

A worker whose parent is gone (killed with SIGKILL, so it could not stop its
children) stops itself, as gracefully as on SIGTERM (:class:`ParentWatch`): the old
workers must not go on taking connections beside the workers of a supervisor started
again (which opens its sockets beside theirs, with SO_REUSEPORT, rather than wait).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sendarix.node.sharedports import (
    INHERITED_ENV,
    inheritance,
    open_listening_socket,
    shareable,
)

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
    "PEERS_PREFIX", "SUPERVISOR_ENV", "TWISTD", "ParentWatch", "WorkerPool", "pid_alive",
    "remove_orphan_peer_dirs", "supervisor_pid", "twistd_log_file", "twistd_reactor",
    "worker_name",
]

#: The environment variable in which the supervisor gives each worker its own PID.
SUPERVISOR_ENV = "SENDARIX_SUPERVISOR_PID"


def supervisor_pid(environ: Mapping[str, str] | None = None) -> int | None:
    """The supervisor's PID from a worker's environment; None when not there."""
    text = (os.environ if environ is None else environ).get(SUPERVISOR_ENV, "")
    return int(text) if text.isdigit() else None


#: How a child runs twistd (the same interpreter as the parent).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def worker_name(node: str, index: int) -> str:
    """The node name of worker ``index`` (1-based) of node ``node``."""
    return f"{node}-w{index}"


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

    ``supervisor`` is the PID the supervisor wrote into the worker's environment
    (:data:`SUPERVISOR_ENV`), when it did: a supervisor killed while this worker was
    still starting is then noticed too, where the parent seen at start would already
    be init.
    """

    name = "parent-watch"

    def __init__(
        self,
        reactor: Any,
        stop: Callable[[], None],
        interval: float = 1.0,
        parent: Callable[[], int] = os.getppid,
        supervisor: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._stop = stop
        self._interval = interval
        self._parent = parent
        self._expected = supervisor if supervisor is not None else parent()
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

    ``listen`` are the endpoint strings of the listeners the workers share.  The pool
    opens the TCP ones itself (:meth:`privilegedStartService`: twistd calls it before
    it gives up root, so ports below 1024 can be bound) and every child inherits
    each socket (a restarted child too), named in its environment.  A port that
    cannot be bound stops the start at once, with the endpoint named, rather than in
    every worker over and over.  The pool closes its own copies when it stops, so
    that the port refuses connections once the last child has stopped listening.
    """

    name = "workers"
    #: Seconds before a worker that died is started again (doubling to ``max_delay``).
    restart_delay = 1.0
    max_delay = 30.0

    def __init__(
        self, reactor: Any, count: int, arguments: Sequence[str], grace: float = 40.0,
        log_file: str | None = None, reactor_name: str | None = None,
        listen: Sequence[str] = (),
    ) -> None:
        self.reactor = reactor
        self.listen = list(listen)
        #: The listening sockets the children inherit, by endpoint string.
        self.listeners: dict[str, socket.socket] = {}
        #: The descriptor number each inherited listener has in a child.
        self.child_fds: dict[str, int] = {}
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

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        self._open_listeners()

    def _open_listeners(self) -> None:
        if self.listeners:
            return
        try:
            for description in self.listen:
                if description not in self.listeners and shareable(self.reactor, description):
                    # SO_REUSEPORT as well: the workers of a supervisor that was killed
                    # still hold its socket while they stop, and this start must not
                    # wait for them (they share the port until they are gone).
                    self.listeners[description] = open_listening_socket(
                        self.reactor, description, reuse_port=True)
        except OSError as e:
            self._close_listeners()
            sys.stderr.write(f"sendarix: cannot listen on {description}: {e}\n")
            raise SystemExit(1) from e
        self.child_fds = inheritance(self.listeners)

    def startService(self) -> None:
        self._open_listeners()  # started without twistd's privileged step (embedded)
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
        environment = dict(os.environ)
        environment[SUPERVISOR_ENV] = str(os.getpid())
        descriptors: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        if self.listeners:
            environment[INHERITED_ENV] = json.dumps(self.child_fds)
            for description, sock in self.listeners.items():
                descriptors[self.child_fds[description]] = sock.fileno()
        transport = self.reactor.spawnProcess(
            child, sys.executable, self.command(index), env=environment,
            childFDs=descriptors,
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
        self._close_listeners()
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

    def _close_listeners(self) -> None:
        # The children keep their copies until each stops listening.
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

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
