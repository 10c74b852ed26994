"""The bench's idle-session client (tests/bench/idle.py) as the bench runs it."""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.support.relayproc import ROOT, env


class IdleClientTests(SynchronousTestCase):
    def test_none_asked_for(self) -> None:
        """Asked for no sessions (``--idle-sessions 0``), the client reports none
        open and ends once its input closes, instead of failing."""
        done = subprocess.run(
            [sys.executable, "-m", "tests.bench.idle", "9", "0", "5"],
            cwd=ROOT, env=env(), input=b"", capture_output=True, timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace")[-500:])
        self.assertEqual(done.stdout.split(), [b"open", b"0"])
