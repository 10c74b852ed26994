"""The relay as a real process for tests: started with twistd the way operators start
it, on a config file in the test's folder, and killed by PID at cleanup."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor

from sendarix.control.cli.sink import SinkOptions, SinkServer, parse_fault
from sendarix.node.workers import twistd_log_file
from tests.support.paths import REPO_ROOT

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ROOT = REPO_ROOT


def env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until ``proc`` itself listens on ``port``: a free port picked earlier may
    have been taken by another test's server meanwhile, and a connection that reached
    that one would prove nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}")
        if listens(proc.pid, port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"relay not listening on {port}")


def listens(pid: int, port: int | None = None) -> bool:
    """True once process ``pid`` holds a listening TCP socket (on ``port``, when
    given), from /proc."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        return any(
            row[3] == "0A" and row[9] in inodes
            and (port is None or int(row[1].rsplit(":", 1)[1], 16) == port)
            for row in rows
        )
    except OSError:
        return False


def serving(log_path: str, port: int) -> int:
    """How many listeners on ``port`` the node's log says are serving: one line per
    worker once it listens, in ``log_path`` or in the workers' own files beside it
    (``node.log``: ``node-w1.log``, ...).  A worker holds the supervisor's listening
    socket from its start, before it can answer, so /proc cannot tell when it serves."""
    root, ext = os.path.splitext(log_path)
    pattern = re.compile(rb"(?:listener \S+|HTTP API) on \S+:%d\b" % port)
    found = 0
    for path in [log_path, *glob.glob(f"{glob.escape(root)}-w*{glob.escape(ext)}")]:
        try:
            with open(path, "rb") as f:
                found += len(pattern.findall(f.read()))
        except FileNotFoundError:  # twistd has not opened its --logfile yet
            pass
    return found


def start_workers(
    testcase: Any, folder: str, config: str, port: int, count: int = 2, timeout: float = 30.0,
    twistd_options: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], str, list[int]]:
    """Run ``twistd [twistd_options] sendarix --config config --workers count`` in
    ``folder`` until every worker serves on ``port``.  Returns the parent, its log file
    (the ``--logfile`` among the options, given as an absolute path, else its standard
    output) and the workers' pids (a list the test may update: every pid in it is
    SIGKILLed at cleanup, with the parent)."""
    output = os.path.join(folder, "parent.log")
    log_path = twistd_log_file([*twistd_options, "sendarix"]) or output
    log = open(output, "wb")
    testcase.addCleanup(log.close)
    parent = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", *twistd_options, "sendarix", "--config", config,
         "--workers", str(count)],
        cwd=folder, env=env(), stdout=log, stderr=subprocess.STDOUT,
    )
    children: list[int] = []

    def cleanup() -> None:
        for pid in [parent.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        parent.wait()

    testcase.addCleanup(cleanup)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log_path, "rb") as f:
                found = re.findall(rb"worker \d+ started, pid (\d+)", f.read())
        except FileNotFoundError:  # twistd has not opened its --logfile yet
            found = []
        children[:] = [int(p) for p in found]
        if len(children) == count and serving(log_path, port) >= count:
            break
        if parent.poll() is not None:
            raise RuntimeError(f"relay exited with {parent.returncode}")
        time.sleep(0.1)
    testcase.assertEqual(len(children), count)
    testcase.assertGreaterEqual(serving(log_path, port), count, "not every worker serves")
    return parent, log_path, children


def sink_server(port: int, *faults: str) -> SinkServer:
    """A sink (not started yet) on 127.0.0.2:``port`` (0: a free port), idling forever,
    with ``faults`` (see sendarix.control.cli.sink.parse_fault)."""
    return SinkServer(
        SinkOptions(
            listen=(f"tcp:{port}:interface=127.0.0.2",),
            hostname="sink.test",
            idle_timeout=0,
            faults=tuple(parse_fault(f) for f in faults),
        ),
        reactor,
    )


#: The HTTP API on a port the system picks (several relays run at once).
API_ON_FREE_PORT = '[api]\nendpoint = "tcp:0:interface=127.0.0.1"\n'


class RelayProcessMixin:
    """For a TestCase with ``dir``, ``config`` (path) and ``port``: ``start_relay()``
    runs ``twistd -n sendarix`` there (log in ``relayN.log``); every process started is
    killed at cleanup."""

    dir: str
    config: str
    port: int
    addCleanup: Any

    def write_relay_config(self, node: str, sections: str) -> None:
        """Make ``dir`` and its ``sendarix.toml`` (``config``) for node ``node``: a
        SQLite spool, no JSON log, ``sections`` (more TOML), and one listener on a free
        ``port`` that trusts loopback without AUTH."""
        test: Any = self
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        self.port = free_port()
        self.config = os.path.join(self.dir, "sendarix.toml")
        with open(self.config, "w") as f:
            f.write(
                f"[node]\nname = \"{node}\"\nhostname = \"relay.test\"\n"
                # One process: these tests kill it by its PID and read its log.
                "workers = 1\n"
                "[spool]\nurl = \"sqlite:var/spool.db\"\n"
                "[events]\njson_log = false\n"
                + ("" if "[api]" in sections else API_ON_FREE_PORT)
                + sections
                + "[[listener]]\nname = \"relay\"\n"
                f"endpoint = \"tcp:{self.port}:interface=127.0.0.1\"\n"
                "tls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n"
            )

    def start_relay(self) -> subprocess.Popen[bytes]:
        procs: list[subprocess.Popen[bytes]] = self.__dict__.setdefault("_relay_procs", [])
        if not procs:
            self.addCleanup(self._end_relays)
        log = open(os.path.join(self.dir, f"relay{len(procs)}.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sendarix", "--config", self.config],
            cwd=self.dir, env=env(), stdout=log, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        wait_listening(self.port, proc)
        return proc

    def _end_relays(self) -> None:
        for proc in self.__dict__.get("_relay_procs", []):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
