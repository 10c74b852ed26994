"""What the bench reads of a system's cost (tests/bench/resources.py): the machine's
context switches and a process tree's CPU time; the bench itself is not part of the
suite."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.bench.resources import machine_context_switches, tree_cpu_seconds


class ContextSwitchTests(SynchronousTestCase):
    def test_a_wake_up_counts(self) -> None:
        """A thread woken 50 times by another switches the machine at least 50 times."""
        before = machine_context_switches()
        ping, pong = threading.Event(), threading.Event()

        def answer() -> None:
            for _ in range(50):
                ping.wait(5)
                ping.clear()
                pong.set()

        thread = threading.Thread(target=answer)
        thread.start()
        for _ in range(50):
            ping.set()
            pong.wait(5)
            pong.clear()
        thread.join(5)
        self.assertGreaterEqual(machine_context_switches() - before, 50)


class TreeCPUTests(SynchronousTestCase):
    def test_busy_work_counts(self) -> None:
        """Half a second of work in this process shows in its tree's CPU seconds (the
        kernel counts in ticks of 10 ms, hence the margin)."""
        before = tree_cpu_seconds([os.getpid()])
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
        self.assertGreater(tree_cpu_seconds([os.getpid()]) - before, 0.3)

    def test_a_gone_process_counts_nothing(self) -> None:
        """A process that ended (and was reaped) between two readings is left out,
        not an error."""
        child = subprocess.Popen(["true"])
        child.wait()
        self.assertEqual(tree_cpu_seconds([child.pid]), 0.0)
