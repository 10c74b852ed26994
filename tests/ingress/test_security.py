"""Security controls of the submission server: AUTH XOAUTH2, connection and recipient
rates, never an open relay (clients on 127.0.0.5, outside the trusted 127.0.0.1/32),
secrets never in logs, events or the database, TLS settings and the certificate reload
on SIGHUP, and a property: whatever a client sends during AUTH, the server answers
with reply codes and never raises."""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import signal
import smtplib
import ssl
import time
from typing import Any

from attrs import evolve
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.cleanup.dkimkeys import generate_key
from sendarix.config.secret import NodeSecret
from sendarix.config.settings import LimitsConfig, ListenerConfig
from sendarix.ingress.auth import CredentialRealm
from sendarix.ingress.authlimit import AuthLimiter
from sendarix.ingress.ratelimit import RateLimiter
from sendarix.ingress.sasl import parse_xoauth2
from sendarix.ingress.server import ListenerSettings, SubmissionFactory
from sendarix.ingress.xoauth2 import HMACTokenChecker, mint_token
from sendarix.model.credential import Credential
from sendarix.model.domain import DKIMKey
from sendarix.stores.sqlite.credentials import SQLiteCredentialStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from tests.support.relay import HOSTNAME, RawClient, Relay, client_context, in_thread, start_relay

NODE_SECRET = "security-test-node-secret-4242"
BODY = b"From: App <app@example.com>\r\nSubject: hi\r\n\r\nhello\r\n"

STARTTLS = {"name": "submission", "endpoint": "tcp:0:interface=127.0.0.1",
            "tls": "starttls", "auth": "required", "connection_rate_per_ip": "3/min"}
OPTIONAL = {"name": "optional", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "starttls",
            "auth": "optional", "trusted_networks": ["127.0.0.1/32"]}
NOAUTH = {"name": "noauth", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
          "auth": "none", "trusted_networks": ["127.0.0.1/32"]}


def xoauth2(user: str, token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def plain(user: str, secret: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{secret}".encode())


def _tls_session(port: int, ca: str, source: str | None = None) -> RawClient:
    c = RawClient(port, source=source)
    c.reply()
    c.send(b"EHLO c.test\r\n")
    c.reply()
    c.send(b"STARTTLS\r\n")
    c.reply()
    c.starttls(ca)
    return c


class SecurityRelayTests(TestCase):
    """A relay with a STARTTLS submission listener (connection rate 3/min), an
    auth=optional and an auth=none listener trusting only 127.0.0.1/32."""

    timeout = 60

    def setUp(self) -> Any:
        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=NODE_SECRET))
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

        async def go() -> None:
            self.relay = await start_relay(
                self, [STARTTLS, OPTIONAL, NOAUTH],
                limits={"credential_recipient_rate": "3/min"},
                events={"json_log": True},
            )
            self.secret = await self.relay.add_credential("app")
            self.node = NodeSecret(NODE_SECRET.encode())
        return ensureDeferred(go())

    async def _cred(self, name: str = "app") -> Credential:
        cred = await self.relay.stores.credentials.get(name)
        assert cred is not None
        return cred

    async def test_xoauth2(self) -> None:
        """XOAUTH2 is advertised only inside TLS; a minted token logs in (235) and
        mail is accepted; a bad token gets the error challenge, then 535 5.7.8; an
        expired token and a token of a rotated credential are refused."""
        port, ca = self.relay.ports["submission"], self.relay.ca_path
        good = mint_token(self.node, await self._cred(), time.time() + 600)
        expired = mint_token(self.node, await self._cred(), time.time() - 1)

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            c = RawClient(port)
            c.reply()
            c.send(b"EHLO c.test\r\n")
            out["plain_ehlo"] = c.reply()[1]
            c.send(b"AUTH XOAUTH2 " + xoauth2("app", good) + b"\r\n")
            out["plain_auth"] = c.codes(1)
            c.close()
            c = _tls_session(port, ca)
            c.send(b"EHLO c.test\r\n")
            out["tls_ehlo"] = c.reply()[1]
            c.send(b"AUTH XOAUTH2 " + xoauth2("app", "v1.bad.1.x.y") + b"\r\n")
            out["bad"] = c.codes(1)
            c.send(b"\r\n")
            out["bad"] += c.codes(1)
            c.send(b"AUTH XOAUTH2 " + xoauth2("app", expired) + b"\r\n")
            out["expired"] = c.codes(1)
            c.send(b"\r\n")
            c.codes(1)
            c.send(b"AUTH XOAUTH2 " + xoauth2("app", good) + b"\r\n")
            out["good"] = c.codes(1)
            c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            c.codes(3)
            c.send(BODY + b".\r\n")
            out["queued"] = c.codes(1)
            c.close()
            return out

        out = await in_thread(run)
        self.assertFalse(any(b"XOAUTH2" in line for line in out["plain_ehlo"]))
        self.assertEqual(out["plain_auth"], [b"530 5.7.0 Must issue a STARTTLS command first"])
        self.assertIn(b"250 AUTH PLAIN LOGIN XOAUTH2", out["tls_ehlo"])
        challenge = out["bad"][0]
        self.assertTrue(challenge.startswith(b"334 "), challenge)
        self.assertEqual(json.loads(base64.b64decode(challenge[4:]))["status"], "401")
        self.assertEqual(out["bad"][1], b"535 5.7.8 Authentication credentials invalid")
        self.assertTrue(out["expired"][0].startswith(b"334 "))
        self.assertEqual(out["good"], [b"235 2.7.0 Authentication successful"])
        self.assertTrue(out["queued"][0].startswith(b"250 2.0.0 OK: queued as"))

        await self.relay.stores.credentials.rotate("app")

        def after_rotation() -> list[bytes]:
            c = _tls_session(port, ca)
            c.send(b"EHLO c.test\r\nAUTH XOAUTH2 " + xoauth2("app", good) + b"\r\n")
            c.reply()
            codes = c.codes(1)
            c.send(b"\r\n")
            return codes + c.codes(1)

        codes = await in_thread(after_rotation)
        self.assertEqual(codes[1], b"535 5.7.8 Authentication credentials invalid")

    async def test_connection_rate(self) -> None:
        """The 4th new connection within a minute from one address (rate 3/min)
        gets 421 4.7.0 and is closed; other addresses are not affected."""
        port = self.relay.ports["submission"]

        def run() -> list[bytes]:
            greetings = []
            for _ in range(4):
                c = RawClient(port)
                greetings.append(c.line())
                c.close()
            other = RawClient(port, source="127.0.0.5")
            greetings.append(other.line())
            return greetings

        greetings = await in_thread(run)
        self.assertTrue(all(g.startswith(b"220 ") for g in greetings[:3]), greetings)
        self.assertEqual(greetings[3], f"421 4.7.0 {HOSTNAME} Too many new connections from "
                                       "your address, slow down".encode())
        self.assertTrue(greetings[4].startswith(b"220 "))

    async def test_recipient_rate_per_credential(self) -> None:
        """With credential_recipient_rate = 3/min the 4th RCPT of the credential in a
        minute gets 450 4.7.1, also in a new session."""
        port, ca = self.relay.ports["submission"], self.relay.ca_path

        def run() -> list[bytes]:
            c = _tls_session(port, ca)
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("app", self.secret) + b"\r\n"
                   b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.org>\r\n"
                   b"RCPT TO:<b@example.org>\r\n")
            c.reply()
            codes = c.codes(4)
            c.close()
            c = _tls_session(port, ca)
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("app", self.secret) + b"\r\n"
                   b"MAIL FROM:<app@example.com>\r\nRCPT TO:<c@example.org>\r\n"
                   b"RCPT TO:<d@example.org>\r\n")
            c.reply()
            return codes + c.codes(4)

        codes = await in_thread(run)
        self.assertEqual(codes[3], b"250 2.1.5 Recipient OK")
        self.assertEqual(codes[6], b"250 2.1.5 Recipient OK")
        self.assertEqual(codes[7], b"450 4.7.1 Recipient rate limit exceeded, try again later")

    async def test_never_an_open_relay(self) -> None:
        """From 127.0.0.5 (outside 127.0.0.1/32): without AUTH, 530 5.7.0 on
        auth=optional and 554 5.7.1 at RCPT on auth=none, DATA refused; with a failed
        AUTH still 530; a credential bound to 127.0.0.1/32 cannot log in from there;
        only a good AUTH opens the transaction.  From 127.0.0.1 (trusted) mail flows."""
        bound_secret = await self.relay.add_credential("bound2", networks=("127.0.0.1/32",))
        ca = self.relay.ca_path
        attempt = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<victim@example.org>\r\n"
                   b"DATA\r\n")

        def run() -> dict[str, list[bytes]]:
            out = {}
            for name in ("optional", "noauth"):
                c = RawClient(self.relay.ports[name], source="127.0.0.5")
                c.reply()
                c.send(b"EHLO c.test\r\n" + attempt)
                c.reply()
                out[name] = c.codes(3)
            c = _tls_session(self.relay.ports["optional"], ca, source="127.0.0.5")
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("app", "wrong") + b"\r\n" + attempt)
            c.reply()
            out["failed_auth"] = c.codes(4)
            c = _tls_session(self.relay.ports["optional"], ca, source="127.0.0.5")
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("bound2", bound_secret) + b"\r\n")
            c.reply()
            out["bound"] = c.codes(1)
            c = _tls_session(self.relay.ports["optional"], ca, source="127.0.0.5")
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("app", self.secret) + b"\r\n"
                   + attempt)
            c.reply()
            out["good_auth"] = c.codes(4)
            c = RawClient(self.relay.ports["noauth"])
            c.reply()
            c.send(b"EHLO c.test\r\n" + attempt)
            c.reply()
            out["trusted"] = c.codes(3)
            return out

        out = await in_thread(run)
        self.assertEqual(out["optional"][0], b"530 5.7.0 Authentication required")
        self.assertTrue(out["optional"][1].startswith(b"503"))
        self.assertTrue(out["optional"][2].startswith(b"503"))
        self.assertEqual(out["noauth"][0], b"250 2.1.0 Sender OK")
        self.assertEqual(out["noauth"][1], b"554 5.7.1 Relay access denied")
        self.assertTrue(out["noauth"][2].startswith(b"554 5.5.1"), out["noauth"])
        self.assertEqual(out["failed_auth"][:2], [b"535 5.7.8 Authentication credentials invalid",
                                                  b"530 5.7.0 Authentication required"])
        self.assertEqual(out["bound"], [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(out["good_auth"][:3], [b"235 2.7.0 Authentication successful",
                                                b"250 2.1.0 Sender OK",
                                                b"250 2.1.5 Recipient OK"])
        self.assertEqual(out["trusted"][:2], [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"])
        spooled = await self.relay.stores.spool.list_messages()
        self.assertEqual(spooled, [])

    async def test_secrets_never_logged_or_stored(self) -> None:
        """After good and bad AUTH PLAIN/LOGIN/XOAUTH2, a message and a stored DKIM
        key, no secret, password, token, node secret or private key appears in the
        log output (events included) or in the database files."""
        port, ca = self.relay.ports["submission"], self.relay.ca_path
        token = mint_token(self.node, await self._cred(), time.time() + 600)
        wrong = "wrong-password-Zq81x"
        pair = generate_key("ed25519")
        await self.relay.stores.domains.add(
            "example.com", None,
            [DKIMKey("s1", "ed25519", pair.public_b64, self.node.encrypt(pair.private_pem),
                     time.time())],
            time.time(),
        )
        await self.relay.stores.domains.set_verified("example.com", time.time())

        def run() -> None:
            c = _tls_session(port, ca)
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("app", wrong) + b"\r\n")
            c.reply()
            c.codes(1)
            c.send(b"AUTH LOGIN\r\n")
            c.codes(1)
            c.send(base64.b64encode(b"app") + b"\r\n")
            c.codes(1)
            c.send(base64.b64encode(wrong.encode()) + b"\r\n")
            c.codes(1)
            c.send(b"AUTH XOAUTH2 " + xoauth2("app", token + "x") + b"\r\n\r\n")
            c.codes(2)
            c.send(b"AUTH XOAUTH2 " + xoauth2("app", token) + b"\r\n")
            c.codes(1)
            c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            c.codes(3)
            c.send(BODY + b".\r\n")
            assert c.codes(1)[0].startswith(b"250 ")
            c.close()
            s = smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=30)
            s._host = HOSTNAME  # type: ignore[attr-defined]
            s.starttls(context=client_context(ca))
            s.login("app", self.secret)
            s.quit()

        await in_thread(run)
        await deferLater(reactor, 0.2, lambda: None)  # let the event writes land
        logged = "\n".join(repr(e) for e in self.logged)
        self.assertIn("accepted", logged)  # the JSON event log did run
        stored = b""
        for path in glob.glob(os.path.join(self.relay.directory, "var", "*")):
            with open(path, "rb") as f:
                stored += f.read()
        self.assertIn(b"DKIM-Signature", stored)
        pem_body = b"".join(pair.private_pem.splitlines()[1:-1]).decode()
        for secret in (self.secret, wrong, token, NODE_SECRET, pem_body,
                       base64.b64encode(f"\0app\0{self.secret}".encode()).decode()):
            self.assertNotIn(secret, logged)
            self.assertNotIn(secret.encode(), stored)
        self.assertNotIn(b"PRIVATE KEY", stored)


class SandboxTests(TestCase):
    """A sandbox credential's mail goes to the simulator, never out; the same
    recipient from a normal credential is routed to its MX hosts."""

    timeout = 60

    async def test_sandbox_mail_is_simulated(self) -> None:
        """The sandbox message is delivered by the simulator (mx "simulator"); the
        normal one is deferred (its MX lookup fails in tests: no real DNS)."""
        from sendarix.model.event import EventQuery

        relay = await start_relay(self, [STARTTLS])
        sandbox = await relay.add_credential("sandboxed", sandbox=True)
        normal = await relay.add_credential("normal")

        def send(user: str, secret: str, rcpt: str) -> Any:
            c = _tls_session(relay.ports["submission"], relay.ca_path)
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain(user, secret) + b"\r\n"
                   b"MAIL FROM:<app@example.com>\r\nRCPT TO:<" + rcpt.encode() + b">\r\n"
                   b"DATA\r\n")
            c.reply()
            c.codes(4)
            c.send(BODY + b".\r\n")
            return c.codes(1)[0]

        await in_thread(send, "sandboxed", sandbox, "bob@example.org")
        await in_thread(send, "normal", normal, "carol@example.org")
        types: dict[str, list[Any]] = {}
        for _ in range(100):
            await deferLater(reactor, 0.1, lambda: None)
            for rcpt in ("bob@example.org", "carol@example.org"):
                page = await relay.stores.eventlog.search(EventQuery(recipient=rcpt))
                types[rcpt] = [(e.type, e.mx) for e in page.events if e.type != "accepted"]
            if all(types.values()):
                break
        self.assertEqual(types["bob@example.org"], [("delivered", "simulator")])
        self.assertEqual([t for t, _ in types["carol@example.org"]], ["deferred"])

    async def test_sandbox_suppressed_and_complaint(self) -> None:
        """For a sandbox credential ``suppressed@`` any domain is refused at RCPT as a
        suppressed address (a ``suppressed`` event); a normal credential's is not.
        The sandbox's ``complaint@`` is delivered by the simulator, then complained
        about through the feedback handler and suppressed."""
        from sendarix.model.event import EventQuery

        relay = await start_relay(self, [STARTTLS])
        sandbox = await relay.add_credential("sandboxed", sandbox=True)
        normal = await relay.add_credential("normal")

        def rcpt(user: str, secret: str, address: str) -> bytes:
            c = _tls_session(relay.ports["submission"], relay.ca_path)
            try:
                c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain(user, secret) + b"\r\n"
                       b"MAIL FROM:<app@example.com>\r\nRCPT TO:<" + address.encode()
                       + b">\r\n")
                c.reply()
                return c.codes(3)[-1]
            finally:
                c.close()

        refused = await in_thread(rcpt, "sandboxed", sandbox, "suppressed@example.org")
        self.assertEqual(refused, b"550 5.1.1 recipient suppressed")
        accepted = await in_thread(rcpt, "normal", normal, "suppressed@example.org")
        self.assertTrue(accepted.startswith(b"250"), accepted)
        page = await relay.stores.eventlog.search(
            EventQuery(recipient="suppressed@example.org", type="suppressed"))
        self.assertEqual(len(page.events), 1)

        def send() -> bytes:
            c = _tls_session(relay.ports["submission"], relay.ca_path)
            c.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("sandboxed", sandbox) + b"\r\n"
                   b"MAIL FROM:<app@example.com>\r\nRCPT TO:<complaint@example.org>\r\n"
                   b"DATA\r\n")
            c.reply()
            c.codes(4)
            c.send(BODY + b".\r\n")
            return c.codes(1)[0]

        self.assertTrue((await in_thread(send)).startswith(b"250"))
        types: list[tuple[str, str | None]] = []
        for _ in range(100):
            await deferLater(reactor, 0.1, lambda: None)
            page = await relay.stores.eventlog.search(
                EventQuery(recipient="complaint@example.org"))
            types = sorted((e.type, e.mx) for e in page.events if e.type != "accepted")
            if len(types) == 2:
                break
        self.assertEqual(types, [("complained", None), ("delivered", "simulator")])
        entry = await relay.stores.suppressions.is_suppressed("acme", "complaint@example.org")
        self.assertEqual(entry.source if entry else None, "complaint")


class TLSReloadTests(TestCase):
    """TLS 1.2 or newer; SIGHUP reloads the certificate without dropping sessions."""

    timeout = 60

    async def test_sighup_reloads_certificate(self) -> None:
        """A session opened before the reload keeps working and delivers a message;
        new sessions after SIGHUP see the new certificate."""
        relay = await start_relay(self, [OPTIONAL])
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        relay.service.install_sighup_handler()  # what twistd's node does at start
        port = relay.ports["optional"]

        def peer_cert(c: RawClient) -> bytes:
            der = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            assert der is not None
            return der

        old = await in_thread(_tls_session, port, relay.ca_path)
        old_cert = peer_cert(old)
        self.assertIn(old.sock.version(), ("TLSv1.2", "TLSv1.3"))  # type: ignore[attr-defined]
        relay.ca.issue(HOSTNAME)  # new key and certificate at the same paths
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):  # the handler hands the reload to the reactor thread
            await deferLater(reactor, 0.02, lambda: None)
            new = await in_thread(_tls_session, port, relay.ca_path)
            new_cert = peer_cert(new)
            new.close()
            if new_cert != old_cert:
                break
        self.assertNotEqual(new_cert, old_cert)

        def use_old() -> list[bytes]:
            old.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                     b"DATA\r\n")
            old.reply()
            codes = old.codes(3)
            old.send(BODY + b".\r\n")
            return codes + old.codes(1)

        codes = await in_thread(use_old)
        self.assertTrue(codes[3].startswith(b"250 2.0.0 OK: queued as"), codes)

    async def test_bad_reload_keeps_certificate(self) -> None:
        """A reload from a broken file fails, is logged, and the old certificate stays."""
        relay = await start_relay(self, [OPTIONAL])
        with open(relay.config.tls.certificate or "", "wb") as f:
            f.write(b"not a certificate")
        self.assertFalse(relay.service.reload_tls())
        self.flushLoggedErrors()
        c = await in_thread(_tls_session, relay.ports["optional"], relay.ca_path)
        c.close()

    async def test_minimum_version(self) -> None:
        """With min_version = "1.3" a TLS 1.2-only client cannot connect; TLS 1.3 can."""
        relay = Relay(self.mktemp(), [OPTIONAL])
        relay.config = evolve(relay.config, tls=evolve(relay.config.tls, min_version="1.3"))
        await relay.start()
        self.addCleanup(relay.stop)

        def handshake(maximum: ssl.TLSVersion) -> str:
            c = RawClient(relay.ports["optional"])
            c.reply()
            c.send(b"EHLO c.test\r\nSTARTTLS\r\n")
            c.reply()
            c.reply()
            ctx = client_context(relay.ca_path)
            ctx.maximum_version = maximum
            try:
                sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
            except ssl.SSLError:
                return "refused"
            return str(sock.version())

        self.assertEqual(await in_thread(handshake, ssl.TLSVersion.TLSv1_2), "refused")
        self.assertEqual(await in_thread(handshake, ssl.TLSVersion.TLSv1_3), "TLSv1.3")

    async def test_modern_ciphers_only(self) -> None:
        """TLS 1.2 clients get a forward-secret AEAD suite; a client offering only
        CBC suites with RSA key exchange is refused."""
        relay = await start_relay(self, [OPTIONAL])

        def handshake(ciphers: str | None) -> tuple[str, str] | str:
            c = RawClient(relay.ports["optional"])
            c.reply()
            c.send(b"EHLO c.test\r\nSTARTTLS\r\n")
            c.reply()
            c.reply()
            ctx = client_context(relay.ca_path)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            if ciphers:
                ctx.set_ciphers(ciphers)
            try:
                sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
            except ssl.SSLError:
                return "refused"
            cipher = sock.cipher()
            assert cipher is not None
            return str(sock.version()), cipher[0]

        version, cipher = await in_thread(handshake, None)
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(cipher.startswith(("ECDHE-", "DHE-")), cipher)
        self.assertTrue("GCM" in cipher or "CHACHA20" in cipher, cipher)
        self.assertEqual(await in_thread(handshake, "AES128-SHA:AES256-SHA"), "refused")


# -- the AUTH property ---------------------------------------------------------------

_REPLY = re.compile(rb"^\d{3}[ -]")


def _starttls_relay_config(path: str, name: str) -> tuple[str, Any, int, str]:
    """A folder at ``path`` with a test CA and a config for a STARTTLS relay named
    ``name`` on a free port: ``(folder, ca, port, config path)``."""
    from tests.support.relayproc import free_port
    from tests.support.tlsca import TestCA

    folder = os.path.abspath(path)
    os.makedirs(folder)
    ca = TestCA(os.path.join(folder, "ca"))
    cert, key = ca.issue(HOSTNAME)
    port = free_port()
    config = os.path.join(folder, "sendarix.toml")
    with open(config, "w") as f:
        f.write(
            f'[node]\nname = "{name}"\nhostname = "{HOSTNAME}"\nworkers = 1\n'
            '[spool]\nurl = "sqlite:var/spool.db"\n[events]\njson_log = false\n'
            '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.5\n'
            f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
            f'[[listener]]\nname = "relay"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
            'tls = "starttls"\nauth = "none"\ntrusted_networks = ["127.0.0.0/8"]\n'
        )
    return folder, ca, port, config


def _session(clock: Clock) -> tuple[Any, StringTransport]:
    """A session on an implicit-TLS listener (AUTH allowed without a handshake), with
    a portal that refuses every password at once and checks XOAUTH2 tokens."""
    store = SQLiteCredentialStore(SQLiteDatabase(":memory-never-opened:", clock), clock)
    checkers = [InMemoryUsernamePasswordDatabaseDontUse(app=b"secret"),
                HMACTokenChecker(store, NodeSecret(NODE_SECRET.encode()), clock)]
    settings_ = ListenerSettings(
        listener=ListenerConfig(name="t", endpoint="tcp:0", tls="implicit", auth="required"),
        limits=LimitsConfig(), hostname="relay.test", intake=None,  # type: ignore[arg-type]
        clock=clock, portal=Portal(CredentialRealm(store), checkers), credentials=store,
        auth_limiter=AuthLimiter(base_delay=0.0, max_delay=0.0), rate_limiter=RateLimiter(),
        tls_options=None,
    )
    factory = SubmissionFactory(settings_)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    proto.makeConnection(transport)
    return proto, transport


class AuthPropertyTests(SynchronousTestCase):
    """Whatever bytes a client sends during AUTH, the server answers with reply codes
    and never raises (no sockets: a StringTransport and a Clock)."""

    @given(
        mechanism=st.sampled_from([b"PLAIN", b"LOGIN", b"XOAUTH2", b"CRAM-MD5", b"plain"]),
        initial=st.one_of(st.none(), st.binary(max_size=200),
                          st.binary(max_size=150).map(base64.b64encode)),
        responses=st.lists(
            st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(base64.b64encode),
                      st.sampled_from([b"*", b"=", b"", b"\x00", b"AUTH PLAIN"])),
            max_size=6,
        ),
        chunk=st.integers(min_value=1, max_value=64),
    )
    def test_any_auth_input_gets_replies(
        self, mechanism: bytes, initial: bytes | None, responses: list[bytes], chunk: int
    ) -> None:
        """Every output line is a reply line; the AUTH command and each complete
        response line are answered (or the session is closed with 421)."""
        clock = Clock()
        proto, transport = _session(clock)
        transport.clear()
        first = b"AUTH " + mechanism + (b" " + initial if initial is not None else b"")
        data = b"EHLO c.test\r\n" + first + b"\r\n" + b"".join(r + b"\r\n" for r in responses)
        for i in range(0, len(data), chunk):
            proto.dataReceived(data[i : i + chunk])
        clock.advance(1)
        output = transport.value()
        lines = output.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        for line in lines[:-1]:
            self.assertRegex(line, _REPLY)
        finals = [line for line in lines[:-1] if line[3:4] == b" "]
        self.assertGreaterEqual(len(finals), 2, output)  # EHLO and AUTH answered at least
        self.assertEqual(self.flushLoggedErrors(), [])


class XOAuth2ParsingTests(SynchronousTestCase):
    """The XOAUTH2 client response format."""

    def test_parse(self) -> None:
        """user and token come out; anything else is a ValueError."""
        self.assertEqual(parse_xoauth2(b"user=a@b\x01auth=Bearer tok\x01\x01"), (b"a@b", b"tok"))
        for bad in (b"", b"user=a\x01\x01", b"user=a\x01auth=Basic x\x01\x01",
                    b"user=a\x01auth=Bearer x\x01", b"user=a\x01user=b\x01auth=Bearer x\x01\x01"):
            self.assertRaises(ValueError, parse_xoauth2, bad)



class TokenCheckerTests(TestCase):
    """The built-in HMAC token checker, on a real SQLite credential store."""

    def test_token_checker(self) -> Deferred[None]:
        """A token for another user, a forged one and an expired one are refused;
        the good one gives the credential name (a real SQLite credential store)."""
        from twisted.cred.error import UnauthorizedLogin

        from sendarix.ingress.sasl import XOAuth2Mechanism

        async def go() -> None:
            db = SQLiteDatabase(os.path.join(self.mktemp(), "c.db"), reactor)
            store = SQLiteCredentialStore(db, reactor)
            await db.open()
            cred, _ = await store.add("app", "t")
            clock = Clock()
            clock.advance(1000)
            secret = NodeSecret(NODE_SECRET.encode())
            checker = HMACTokenChecker(store, secret, clock)

            def creds(user: bytes, token: str) -> XOAuth2Mechanism:
                m = XOAuth2Mechanism()
                m.username, m.token = user, token.encode()
                return m

            good = mint_token(secret, cred, 2000)
            self.assertEqual(await checker.requestAvatarId(creds(b"app", good)), b"app")
            for user, token in ((b"other", good), (b"app", good[:-2] + "AA"),
                                (b"app", mint_token(secret, cred, 999)),
                                (b"app", mint_token(NodeSecret(b"x" * 20), cred, 2000))):
                with self.assertRaises(UnauthorizedLogin):
                    await checker.requestAvatarId(creds(user, token))
            await db.close()

        d: Deferred[None] = ensureDeferred(go())
        return d


class TokenCommandTests(TestCase):
    """``sendarix credentials token`` mints a token the relay's checker accepts."""

    timeout = 60

    async def test_token_command(self) -> None:
        """The printed token logs in as its credential until it is rotated; without
        the node secret the command refuses with one line."""
        from tests.cleanup.test_domains import _cli

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(os.path.join(folder, "sendarix.toml"), "w") as f:
            f.write('[spool]\nurl = "sqlite:var/spool.db"\n[events]\njson_log = false\n')
        out, err, code = await _cli(["credentials", "add", "app", "--tenant", "t"], folder,
                                    secret=NODE_SECRET)
        self.assertEqual(code, 0, err)
        out, err, code = await _cli(["credentials", "token", "app", "--ttl", "10m", "--json"],
                                    folder, secret=NODE_SECRET)
        self.assertEqual(code, 0, err)
        minted = json.loads(out)
        self.assertLess(abs(minted["expires"] - (time.time() + 600)), 30)
        out, err, code = await _cli(["credentials", "token", "app"], folder, secret=None)
        self.assertEqual((code, len(err.splitlines())), (1, 1), err)
        self.assertIn(b"SENDARIX_SECRET_KEY is not set", err)

        from sendarix.config.loader import parse_config
        from sendarix.ingress.sasl import XOAuth2Mechanism
        from sendarix.stores.backends import open_stores

        stores = open_stores(parse_config({"spool": {"url": "sqlite:var/spool.db"}},
                                                 folder), reactor, json_log=False)
        await stores.open()
        self.addCleanup(stores.close)
        checker = HMACTokenChecker(stores.credentials, NodeSecret(NODE_SECRET.encode()), reactor)
        creds = XOAuth2Mechanism()
        creds.username, creds.token = b"app", minted["token"].encode()
        self.assertEqual(await checker.requestAvatarId(creds), b"app")


class SighupProcessTests(TestCase):
    """``twistd sendarix`` reloads its certificate on ``kill -HUP``."""

    timeout = 120

    def test_kill_hup(self) -> None:
        """The running process serves the new certificate to new sessions after
        SIGHUP; a session opened before keeps working."""
        from tests.support.relayproc import RelayProcessMixin

        folder, ca, port, config = _starttls_relay_config(self.mktemp(), "hup")
        runner = RelayProcessMixin()
        runner.dir, runner.config, runner.port = folder, config, port
        runner.addCleanup = self.addCleanup  # type: ignore[method-assign]
        proc = runner.start_relay()

        def peer(c: RawClient) -> bytes:
            der = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            assert der is not None
            return der

        old = _tls_session(port, ca.ca_path)
        before = peer(old)
        ca.issue(HOSTNAME)
        os.kill(proc.pid, signal.SIGHUP)
        after = before
        for _ in range(100):
            time.sleep(0.05)
            c = _tls_session(port, ca.ca_path)
            after = peer(c)
            c.close()
            if after != before:
                break
        self.assertNotEqual(after, before)
        old.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                 b"DATA\r\n")
        old.reply()
        old.codes(3)
        old.send(BODY + b".\r\n")
        self.assertTrue(old.codes(1)[0].startswith(b"250 2.0.0 OK: queued as"))
        self.assertIsNone(proc.poll())

    def test_kill_hup_with_workers(self) -> None:
        """With ``--workers 2``, SIGHUP to the parent reaches every worker: after it,
        every new session (whichever worker takes it) sees the new certificate."""
        from tests.support.relayproc import start_workers

        folder, ca, port, config = _starttls_relay_config(self.mktemp(), "hupw")
        parent, _, _ = start_workers(self, folder, config, port)

        def peer() -> bytes:
            c = _tls_session(port, ca.ca_path)
            der = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            c.close()
            assert der is not None
            return der

        before = peer()
        ca.issue(HOSTNAME)
        parent.send_signal(signal.SIGHUP)
        streak = 0
        for _ in range(200):  # 12 new-certificate sessions in a row: both workers reloaded
            streak = streak + 1 if peer() != before else 0
            if streak == 12:
                break
            time.sleep(0.02)
        self.assertEqual(streak, 12)
        self.assertIsNone(parent.poll())
