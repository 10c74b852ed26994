"""The destination both relays deliver to: Postfix's ``smtp-sink`` with a timed counter.

``smtp-sink -c`` rewrites a ``sess=N quit=N mesg=N`` line (ending in CR) each time a
message ends; a thread reads that stream and notes the moment each count was reached,
so the harness knows when the last message of a run arrived and when a single
message arrived (latency), the same way for both relays.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

from tests.bench.install import which

_MESG = re.compile(rb"mesg=(\d+)")


class Sink:
    """A running ``smtp-sink`` on 127.0.0.1:``port``; ``count`` is messages received."""

    def __init__(self, port: int, max_sessions: int = 1000) -> None:
        binary = which("smtp-sink")
        if binary is None:
            raise RuntimeError("smtp-sink is not installed")
        self.port = port
        command = [binary, "-c", "-m", str(max_sessions)]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # it refuses to keep root privileges
        command += [f"127.0.0.1:{port}", "1024"]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.count = 0
        self._arrivals: list[float] = []  # monotonic time at which count reached i + 1
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="smtp-sink", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.monotonic()
            counts = _MESG.findall(tail + chunk)
            tail = chunk[-40:]
            if not counts:
                continue
            latest = max(int(c) for c in counts)  # the last may be cut short
            with self._changed:
                while len(self._arrivals) < latest:
                    self._arrivals.append(now)
                self.count = max(self.count, latest)
                self._changed.notify_all()

    def arrival(self, n: int) -> float:
        """When the ``n``-th message (1-based, since start) arrived."""
        with self._changed:
            return self._arrivals[n - 1]

    def wait_for(self, n: int, timeout: float) -> bool:
        """Block until ``n`` messages have arrived (True) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    def stop(self) -> None:
        """End the sink (by its PID) and its reader."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
