"""One running copy of a node (:mod:`sendarix.node.nodelock`): the lock itself, and
a second ``twistd sendarix`` on the configuration of a node that runs."""

from __future__ import annotations

import os
import signal
import subprocess

from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.node import nodelock
from sendarix.node.nodelock import (
    NodeRunningError,
    acquire,
    hold_node_lock,
    lock_path,
    note_pid,
)
from tests.support.relayproc import TWISTD, RelayProcessMixin, env, listens


class NodeLockTests(SynchronousTestCase):
    def hold(self, var: str, name: str) -> str:
        path = hold_node_lock(var, name)
        self.addCleanup(lambda: os.close(nodelock._held.pop(path)))
        return path

    def test_a_second_holder_is_refused_and_told_who(self) -> None:
        """The lock file names its holder's PID; another descriptor cannot take it,
        and the refusal says which node runs and who holds it."""
        var = os.path.join(os.path.abspath(self.mktemp()), "var")
        path = self.hold(var, "box")
        self.assertEqual(path, os.path.abspath(lock_path(var, "box")))
        with open(path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        with self.assertRaises(NodeRunningError) as caught:
            acquire(path, "box")
        e = caught.exception
        self.assertEqual((e.name, e.path, e.pid), ("box", path, os.getpid()))
        self.assertEqual(
            str(e), f"node box is already running (pid {os.getpid()} holds {path})"
        )

    def test_the_same_process_asks_again(self) -> None:
        """A service built twice in one process keeps the lock it has."""
        var = os.path.abspath(self.mktemp())
        path = self.hold(var, "box")
        self.assertEqual(hold_node_lock(var, "box"), path)

    def test_names_apart_and_let_go_on_close(self) -> None:
        """A worker's name is a lock of its own; a lock closed (its process ended)
        can be taken again at once."""
        var = os.path.abspath(self.mktemp())
        self.hold(var, "box")
        self.hold(var, "box-w1")
        path = lock_path(var, "box-w2")
        fd = acquire(path, "box-w2")
        self.assertFalse(os.get_inheritable(fd))
        os.close(fd)
        os.close(acquire(path, "box-w2"))

    def test_pid_noted_again(self) -> None:
        """Once running (twistd may have forked), the process writes its PID again
        into the locks it holds."""
        var = os.path.abspath(self.mktemp())
        path = self.hold(var, "box")
        with open(path, "w") as f:
            f.write("1\n")
        note_pid()
        with open(path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")

    def test_unknown_holder(self) -> None:
        """A holder that has not written its PID yet is "another process"."""
        var = os.path.abspath(self.mktemp())
        path = self.hold(var, "box")
        os.truncate(path, 0)
        with self.assertRaises(NodeRunningError) as caught:
            acquire(path, "box")
        self.assertIsNone(caught.exception.pid)
        self.assertIn("another process holds", str(caught.exception))


class SecondCopyTests(RelayProcessMixin, TestCase):
    """``twistd -n sendarix`` started twice on one configuration."""

    timeout = 90

    def start_again(self) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "sendarix", "--config", self.config],
            cwd=self.dir, env=env(), capture_output=True, timeout=60,
        )

    def test_refused_while_the_first_runs(self) -> None:
        """The second copy exits at once with status 1 and says why; the first keeps
        its port.  Once the first is killed (no chance to clean up), the node starts."""
        self.write_relay_config("twice", "")
        first = self.start_relay()
        second = self.start_again()
        self.assertEqual(second.returncode, 1, second.stderr)
        lock = os.path.join(self.dir, "var", "twice.lock")
        self.assertIn(
            f"sendarix: node twice is already running (pid {first.pid} holds {lock})",
            second.stderr.decode(),
        )
        self.assertTrue(listens(first.pid, self.port))

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        self.start_relay()
