"""The bench's profile summary (tests/bench/profile.py) reads py-spy's raw stacks as
py-spy writes them; the bench itself is not part of the suite."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.bench.profile import summarize

SUPERVISOR = 'process 10:"python -c from twisted.scripts.twistd import run; run() -n sendarix"'
WORKER = (
    'process 11:"python -c from twisted.scripts.twistd import run; run() -n sendarix '
    '--workers 2 --worker 1"'
)
REACTOR = "thread (11): MainThread;run (twisted/internet/base.py:686)"
DATABASE = "thread (12): sqlite:spool.db;_main (sendarix/stores/sqlite/database.py:341)"
READER = "thread (13): sqlite-read:spool.db;_read_main (sendarix/stores/sqlite/database.py:250)"


class SummarizeTests(SynchronousTestCase):
    def write(self, lines: list[str], log: str | None = None) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        if log is not None:
            with open(path + ".log", "w") as f:
                f.write(log)
        return path

    def test_workers_threads_and_modules(self) -> None:
        """Child processes' stacks (command lines holding ";") are split at the thread:
        the supervisor's samples are named so, a worker's threads by what they are,
        and each sample goes to the innermost Sendarix module."""
        path = self.write([
            f"{SUPERVISOR};thread (10): MainThread;"
            "doPoll (twisted/internet/epollreactor.py:227) 5",
            f"{SUPERVISOR};{WORKER};{REACTOR};_process (sendarix/ingress/server.py:325);"
            "write (twisted/internet/abstract.py:394) 60",
            f"{SUPERVISOR};{WORKER};{DATABASE};"
            "_run_batch (sendarix/stores/sqlite/database.py:396) 25",
            f"{SUPERVISOR};{WORKER};{READER};"
            "is_suppressed (sendarix/stores/sqlite/suppression.py:90) 10",
        ])
        self.assertEqual(summarize(path), [
            " 60.0% reactor  sendarix/ingress/server.py",
            " 25.0% database stores/sqlite/database.py: BEGIN/COMMIT (fsync)",
            " 10.0% reader   sendarix/stores/sqlite/suppression.py",
            "  5.0% supervisor twisted/other",
        ])

    def test_single_process(self) -> None:
        """Without child processes a stack starts at its thread."""
        path = self.write([f"{REACTOR};doPoll (twisted/internet/epollreactor.py:227) 3"])
        self.assertEqual(summarize(path), ["100.0% reactor  twisted/other"])

    def test_one_process_node_is_no_supervisor(self) -> None:
        """A node without workers, recorded with its (absent) children followed: its
        own process is the node, so its threads are named as a worker's."""
        path = self.write([
            f"{SUPERVISOR};{REACTOR};_process (sendarix/ingress/server.py:325) 3",
            f"{SUPERVISOR};{DATABASE};_run_batch (sendarix/stores/sqlite/database.py:396) 1",
        ])
        self.assertEqual(summarize(path), [
            " 75.0% reactor  sendarix/ingress/server.py",
            " 25.0% database stores/sqlite/database.py: BEGIN/COMMIT (fsync)",
        ])

    def test_empty_says_why(self) -> None:
        """No samples: py-spy's error, from its log beside the recording."""
        path = self.write([], log="py-spy> starting\nError: Failed to find python version\n")
        self.assertEqual(
            summarize(path), ["(no samples: Error: Failed to find python version)"]
        )
        os.remove(path + ".log")
        self.assertEqual(summarize(path), ["(no samples)"])
