"""A throwaway ``redis-server`` on a free loopback port, for tests of Redis-backed parts.

Tests skip when redis-server is not installed, except on CI (``CI=true``), where a
missing server is a failure rather than a silently skipped suite.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from unittest import SkipTest

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from sendarix.stores.redis.connection import RedisClient

_START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    directory: str, aof: bool = True, port: int | None = None, extra: Sequence[str] = ()
) -> tuple[int, Callable[[], None]]:
    """Start redis-server with its files in ``directory``; return (port, stop).

    ``aof``: keep an append-only file fsynced on every write (the durable setting the
    spool wants); without it the server persists nothing.  ``port``: listen there
    (a restart of an earlier server), else on a free port.  ``extra``: more
    redis-server options (TLS, a unix socket, ACL users).  ``stop`` kills the
    server by its PID (SIGKILL: like a crash) and waits for it to exit.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("redis-server is not installed (required on CI)")
        raise SkipTest("redis-server is not installed")
    os.makedirs(directory, exist_ok=True)
    # A port taken between probing and binding fails the start; try a few.
    wanted = port
    for _ in range(5):
        port = wanted or _free_port()
        command = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", os.path.abspath(directory),
            "--save", "",
            "--appendonly", "yes" if aof else "no",
            "--appendfsync", "always",
            "--logfile", "redis.log",
            *extra,
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers_ping(port):
                return port, _stopper(process)
            time.sleep(0.005)
        _stopper(process)()
    raise RuntimeError(f"redis-server did not start; see {directory}/redis.log")


def _stopper(process: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)

    return stop


def redis_client(test: Any, aof: bool = True) -> Deferred[RedisClient]:
    """Start a server for ``test`` and connect a :obj:`RedisClient` pool to it; both are
    stopped at the test's cleanup.  Fires once the pool is connected.  Sets
    ``test.redis_port``, ``test.redis_dir`` and ``test.redis_stop`` (a test that
    restarts the server replaces ``redis_stop``)."""
    from twisted.internet import reactor

    from sendarix.stores.redis.connection import connect

    directory = os.path.abspath(test.mktemp())
    port, stop = start_redis(directory, aof=aof)
    test.addCleanup(lambda: test.redis_stop())
    test.redis_stop, test.redis_dir = stop, directory
    client = connect(f"redis://127.0.0.1:{port}/0", poolsize=4)
    test.addCleanup(client.disconnect)
    test.redis_port = port
    d = client.wait_connected(reactor, 10.0)
    return d.addCallback(lambda _: client)
