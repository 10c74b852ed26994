"""The relay as a real process for tests: started with twistd the way operators start
it, on a config file in the test's folder, and killed by PID at cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor

from sendarix.sink import SinkOptions, SinkServer, parse_fault

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"relay not listening on {port}")


def sink_server(port: int, *faults: str) -> SinkServer:
    """A sink (not started yet) on 127.0.0.2:``port`` (0: a free port), idling forever,
    with ``faults`` (see sendarix.sink.parse_fault)."""
    return SinkServer(
        SinkOptions(
            listen=(f"tcp:{port}:interface=127.0.0.2",),
            hostname="sink.test",
            idle_timeout=0,
            faults=tuple(parse_fault(f) for f in faults),
        ),
        reactor,
    )


class RelayProcessMixin:
    """For a TestCase with ``dir``, ``config`` (path) and ``port``: ``start_relay()``
    runs ``twistd -n sendarix`` there (log in ``relayN.log``); every process started is
    killed at cleanup."""

    dir: str
    config: str
    port: int
    addCleanup: Any

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
