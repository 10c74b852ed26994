"""The development certificate made on first start: several worker processes starting
together end up with one matching certificate and key."""

from __future__ import annotations

import os
import subprocess
import sys

from OpenSSL import SSL, crypto
from twisted.trial.unittest import TestCase

from sendarix.ingress.tls import ensure_certificate, server_tls_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MAKE = """
import sys, time
from sendarix.ingress.tls import ensure_certificate
start = float(sys.argv[2])
while time.time() < start:
    pass
ensure_certificate(None, None, sys.argv[1], "box.test")
"""


class SelfSignedTests(TestCase):
    timeout = 60

    def test_kept_once_made(self) -> None:
        var = os.path.abspath(self.mktemp())
        cert, key = ensure_certificate(None, None, var, "box.test")
        with open(cert, "rb") as f:
            first = f.read()
        self.assertEqual(ensure_certificate(None, None, var, "box.test"), (cert, key))
        with open(cert, "rb") as f:
            self.assertEqual(f.read(), first)
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)

    def test_processes_starting_together_share_one_pair(self) -> None:
        """Eight processes asking at the same instant: the key on disk is the key of
        the certificate on disk (a mismatch would stop every worker's TLS)."""
        import time

        for _ in range(3):
            var = os.path.abspath(self.mktemp())
            start = time.time() + 1.0
            procs = [
                subprocess.Popen([sys.executable, "-c", _MAKE, var, str(start)],
                                 env=dict(os.environ, PYTHONPATH=ROOT))
                for _ in range(8)
            ]
            self.assertEqual([p.wait(timeout=30) for p in procs], [0] * 8)
            cert, key = ensure_certificate(None, None, var, "box.test")
            server_tls_options(cert, key)  # loads both
            context = SSL.Context(SSL.TLS_METHOD)
            with open(cert, "rb") as f:
                context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, f.read()))
            with open(key, "rb") as f:
                context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, f.read()))
            context.check_privatekey()  # raises when they do not match
