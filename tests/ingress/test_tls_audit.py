"""A TLS audit with ``testssl.sh`` (Debian's package) against an implicit-TLS (465)
and a STARTTLS (587) listener: only TLS 1.2 and 1.3, only forward-secret AEAD
ciphers, no vulnerability it knows, and the certificate chain served and trusted
(against the test CA).

Findings about the test certificate itself are left out: a private CA publishes no
revocation (CRL/OCSP) and no CAA record, and its certificates name ``relay.test``,
not the address testssl connects to, and live for a day.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.relay import start_relay

IMPLICIT = {"name": "smtps", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "implicit",
            "auth": "required"}
STARTTLS = {"name": "submission", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "starttls",
            "auth": "required"}

#: Findings that judge the private test CA's certificate, not our TLS.
_ABOUT_THE_TEST_CERTIFICATE = ("cert_revocation", "DNS_CAArecord", "cert_commonName",
                               "cert_expirationStatus", "cert_notAfter",
                               "cert_subjectAltName", "cert_trust", "cert_ocsp",
                               "cert_crlDistributionPoints", "cert_caIssuers")
_AEAD = ("GCM", "CHACHA20", "CCM")


class TLSAuditTests(TestCase):
    timeout = 300

    def setUp(self) -> Any:
        self.testssl = shutil.which("testssl") or shutil.which("testssl.sh")
        if self.testssl is None:
            if os.environ.get("CI") == "true":
                raise AssertionError("CI: testssl (Debian package testssl.sh) is required")
            raise SkipTest("testssl is not installed")

        async def go() -> None:
            self.relay = await start_relay(self, [IMPLICIT, STARTTLS])

        return ensureDeferred(go())

    async def audit(self, port: int, starttls: bool) -> list[dict[str, Any]]:
        out = os.path.abspath(self.mktemp()) + ".json"
        args = ["--quiet", "--color", "0", "--warnings", "off", "-p", "-s", "-E", "-U", "-S",
                "--connect-timeout", "5", "--openssl-timeout", "5",
                "--add-ca", self.relay.ca_path, "--jsonfile", out]
        if starttls:
            args += ["--starttls", "smtp"]
        assert self.testssl is not None
        stdout, stderr, code = await getProcessOutputAndValue(
            self.testssl, [*args, f"127.0.0.1:{port}"], env=dict(os.environ), reactor=reactor
        )
        with open(out, encoding="utf-8") as f:
            findings: list[dict[str, Any]] = json.load(f)
        self.assertTrue(findings, stdout[-2000:])
        return findings

    def check(self, findings: list[dict[str, Any]]) -> None:
        by_id = {f["id"]: f for f in findings}
        for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
            self.assertIn("not offered", by_id[old]["finding"], old)
        for new in ("TLS1_2", "TLS1_3"):
            self.assertTrue(by_id[new]["finding"].startswith("offered"), by_id[new])
        ciphers = [f["finding"] for f in findings if f["id"].startswith("cipher-tls")]
        self.assertTrue(ciphers)
        for line in ciphers:
            self.assertTrue(any(a in line.upper() for a in _AEAD), f"not AEAD: {line}")
            fs = "TLS 1.3" in line or "ECDHE" in line or "DHE" in line
            self.assertTrue(fs, f"not forward secret: {line}")
        bad = [f for f in findings
               if f["severity"] in ("MEDIUM", "HIGH", "CRITICAL")
               and not f["id"].startswith(_ABOUT_THE_TEST_CERTIFICATE)]
        self.assertEqual(bad, [])
        self.assertEqual(by_id["cert_chain_of_trust"]["severity"], "OK",
                         by_id["cert_chain_of_trust"])

    async def test_implicit_tls_listener(self) -> None:
        self.check(await self.audit(self.relay.ports["smtps"], starttls=False))

    async def test_starttls_listener(self) -> None:
        self.check(await self.audit(self.relay.ports["submission"], starttls=True))
