"""Sending domains and DKIM: keys and records, the node secret, signing checked by
independent verifiers (dkimpy, and Perl's Mail::DKIM when installed), the
``sendarix domains`` commands against an in-process DNS server, and the relay's
use of them (signing, ``require_verified_domains``, refusing to start without the
secret)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import dkim
import dns.resolver
from attrs import evolve
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.cleanup.dkim import load_signing_key, sign_message
from sendarix.cleanup.dkimkeys import (
    check_record,
    dns_name,
    generate_key,
    record_line,
    record_value,
    split_txt,
)
from sendarix.config.errors import ConfigError
from sendarix.config.loader import parse_config
from sendarix.config.secret import NodeSecret, SecretError, node_secret_from_env
from sendarix.interfaces import IDomainStore
from sendarix.model.domain import DKIMKey, DomainExistsError, DomainNotFoundError
from sendarix.node.service import load_node_secret
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.domains import SQLiteDomainStore
from tests.support.dnsserver import start_dns
from tests.support.paths import REPO_ROOT
from tests.support.relay import RawClient, in_thread, smtp_starttls, start_relay

ROOT = REPO_ROOT
SECRET = "test-node-secret-0123456789abcdef"

MESSAGE = (
    b"From: App <app@example.com>\r\nTo: someone@example.org\r\n"
    b"Subject: hello   there\r\n\tfolded\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n\r\nbody line  \r\n\r\n\r\n"
)


def _keys(domain: str = "example.com") -> tuple[list[Any], dict[str, bytes]]:
    keys, records = [], {}
    for key_type in ("rsa", "ed25519"):
        pair = generate_key(key_type)
        keys.append(load_signing_key(domain, f"s-{key_type}", key_type, pair.private_pem))
        name = dns_name(f"s-{key_type}", domain) + "."
        records[name] = record_value(key_type, pair.public_b64).encode()
    return keys, records


def _dnsfunc(records: dict[str, bytes]) -> Any:
    def lookup(name: bytes | str, timeout: int = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return records.get(text)

    return lookup


def _perl_verify(message: bytes, dns_port: int) -> list[str]:
    """Verify with Perl's Mail::DKIM through the test DNS server: one result per
    signature ("pass", "fail (...)", ...)."""
    script = r"""
use strict; use Mail::DKIM::Verifier; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 0, tcp_timeout => 5,
    udp_timeout => 5));
my $v = Mail::DKIM::Verifier->new();
local $/; my $m = <STDIN>; $m =~ s/\r?\n/\015\012/g; $v->PRINT($m); $v->CLOSE();
foreach my $s ($v->signatures) { print $s->algorithm, " ", $s->result_detail, "\n"; }
"""
    out = subprocess.run(
        ["perl", "-e", script, str(dns_port)], input=message, capture_output=True,
        timeout=60, check=True,
    )
    return out.stdout.decode().splitlines()


def _need_perl_dkim() -> None:
    have = shutil.which("perl") and subprocess.run(
        ["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True
    ).returncode == 0
    if not have:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI: Mail::DKIM (libmail-dkim-perl) must be installed")
        raise SkipTest("Perl Mail::DKIM not installed (apt-get install libmail-dkim-perl)")


def assertPerlResults(case: Any, results: list[str]) -> None:  # noqa: N802
    """rsa-sha256 passes; ed25519-sha256 passes or, with a Mail::DKIM older than
    1.20230630 (Debian 12 ships 1.20230212), is "unsupported algorithm", never a
    failed signature."""
    results = sorted(results)
    case.assertEqual(len(results), 2, results)
    case.assertIn(results[0], ("ed25519-sha256 pass",
                               "ed25519-sha256 invalid (unsupported algorithm ed25519-sha256)"))
    case.assertEqual(results[1], "rsa-sha256 pass")


class RecordTests(SynchronousTestCase):
    """DKIM key generation and the DNS records."""

    def test_rsa_record_split_into_strings(self) -> None:
        """An RSA record is longer than 255 bytes: the printed line holds quoted
        strings of at most 255 bytes that join back to the value."""
        pair = generate_key("rsa")
        value = record_value("rsa", pair.public_b64)
        self.assertGreater(len(value), 255)
        parts = split_txt(value)
        self.assertTrue(all(len(p.encode()) <= 255 for p in parts))
        self.assertEqual("".join(parts), value)
        line = record_line("s1", "example.com", "rsa", pair.public_b64)
        prefix = 'record: s1._domainkey.example.com TXT "v=DKIM1; k=rsa; p='
        self.assertTrue(line.startswith(prefix))
        self.assertEqual(line.count('"'), 2 * len(parts))

    def test_ed25519_record(self) -> None:
        """An ed25519 record carries the raw 32-byte key in base64, in one string."""
        pair = generate_key("ed25519")
        line = record_line("s2", "example.com", "ed25519", pair.public_b64)
        self.assertRegex(line, r'^record: s2\._domainkey\.example\.com TXT "v=DKIM1; '
                               r'k=ed25519; p=[A-Za-z0-9+/]{43}="$')

    def test_check_record_reasons(self) -> None:
        """A published record matches only with the same key type and key."""
        pair = generate_key("ed25519")
        good = record_value("ed25519", pair.public_b64)
        self.assertIsNone(check_record([good], "ed25519", pair.public_b64))
        self.assertIsNone(check_record(["v=spf1 -all", good], "ed25519", pair.public_b64))
        self.assertIn("no TXT", check_record([], "ed25519", pair.public_b64) or "")
        self.assertIn("different public key",
                      check_record([record_value("ed25519", "AAAA")], "ed25519",
                                   pair.public_b64) or "")
        self.assertIn("k=rsa", check_record([good], "rsa", pair.public_b64) or "")
        self.assertIn("revoked", check_record(["v=DKIM1; k=ed25519; p="], "ed25519",
                                              pair.public_b64) or "")


class NodeSecretTests(SynchronousTestCase):
    """Private keys at rest are encrypted with the node secret."""

    def test_round_trip_and_wrong_secret(self) -> None:
        """What one secret encrypts, only that secret decrypts."""
        secret = NodeSecret(SECRET.encode())
        token = secret.encrypt(b"private key")
        self.assertNotIn(b"private key", token.encode())
        self.assertEqual(secret.decrypt(token), b"private key")
        other = NodeSecret(b"another-secret-of-enough-length")
        self.assertRaises(SecretError, other.decrypt, token)
        self.assertNotIn(SECRET, repr(secret))

    def test_from_env(self) -> None:
        """Unset means None; too short is refused with a hint."""
        self.assertIsNone(node_secret_from_env("X", {}))
        self.assertRaises(SecretError, node_secret_from_env, "X", {"X": "short"})
        secret = node_secret_from_env("X", {"X": SECRET})
        assert secret is not None
        self.assertEqual(secret.value, SECRET.encode())
        self.assertNotEqual(secret.derive("a"), secret.derive("b"))


class SigningTests(SynchronousTestCase):
    """Our signatures verify with dkimpy's verifier (an independent implementation of
    canonicalization and verification) for rsa-sha256 and ed25519-sha256."""

    def test_dual_signature_verifies(self) -> None:
        """Both signatures verify; From and the other singletons are over-signed."""
        keys, records = _keys()
        signed = sign_message(MESSAGE, keys, int(time.time()))
        verifier = dkim.DKIM(signed)
        self.assertTrue(verifier.verify(idx=0, dnsfunc=_dnsfunc(records)))
        self.assertTrue(verifier.verify(idx=1, dnsfunc=_dnsfunc(records)))
        first = signed.split(b"\r\n\r\n")[0]
        self.assertIn(b"a=rsa-sha256; c=relaxed/relaxed; d=example.com", first)
        self.assertIn(b"a=ed25519-sha256", first)
        self.assertIn(b"h=from:from:subject:subject:date:date:message-id:message-id:to:to",
                      first)

    def test_added_from_breaks_signature(self) -> None:
        """A second From added after signing fails verification (over-signing), and
        so does a changed body."""
        keys, records = _keys()
        signed = sign_message(MESSAGE, keys[:1], int(time.time()))
        forged = signed.replace(b"From: App", b"From: Evil <evil@example.net>\r\nFrom: App")
        self.assertFalse(dkim.verify(forged, dnsfunc=_dnsfunc(records)))
        changed = signed.replace(b"body line", b"body lime")
        self.assertFalse(dkim.verify(changed, dnsfunc=_dnsfunc(records)))
        self.assertTrue(dkim.verify(signed, dnsfunc=_dnsfunc(records)))


class PerlVerifierTests(TestCase):
    """A second independent verifier: Perl's Mail::DKIM, resolving the keys through
    the in-process DNS server."""

    timeout = 60

    async def test_mail_dkim_passes_both(self) -> None:
        """Mail::DKIM reports pass for the rsa-sha256 and the ed25519-sha256 signature."""
        _need_perl_dkim()
        keys, records = _keys()
        port, stop = start_dns({k.rstrip("."): {"TXT": [v.decode()]} for k, v in records.items()})
        self.addCleanup(stop)
        signed = sign_message(MESSAGE, keys, int(time.time()))
        results = await deferToThread(_perl_verify, signed, port)
        self.assertPerlResults(results)

    def assertPerlResults(self, results: list[str]) -> None:  # noqa: N802
        """rsa-sha256 passes; ed25519-sha256 passes, or (Mail::DKIM before 1.20230630,
        Debian 12's) is reported unsupported, never failed."""
        assertPerlResults(self, results)


class DomainStoreContractMixin:
    """The IDomainStore contract, run against every implementation: a TestCase
    mixing it in provides ``make_store()`` (a coroutine giving an open store)."""

    async def make_store(self) -> Any:
        raise NotImplementedError

    async def test_store(self) -> None:
        """add, get, list, set_verified, remove; a second add fails; values survive
        the round trip exactly; the private key is not in to_dict(); rotation with
        add_keys, per-key verification and removal of one key."""
        case: Any = self
        store = await self.make_store()
        verifyObject(IDomainStore, store)
        key = DKIMKey("s1", "ed25519", "cHVi", "token", 1.25)
        rsa = DKIMKey("s2", "rsa", "cnNh", "token2", 1.5)
        sd = await store.add("example.com", None, [rsa, key], 2.0)
        case.assertFalse(sd.verified)
        with case.assertRaises(DomainExistsError):
            await store.add("example.com", "other", [key], 3.0)
        await store.add("a.example", "acme", [], 4.0)
        case.assertTrue(await store.set_verified("example.com", 1796150000.123456))
        case.assertFalse(await store.set_verified("missing.example", 5.0))
        got = await store.get("example.com")
        case.assertEqual((got.tenant, got.created_at, got.verified_at),
                         (None, 2.0, 1796150000.123456))
        case.assertEqual(got.keys, tuple(evolve(k, verified_at=1796150000.123456)
                                         for k in (rsa, key)))  # in the order given
        case.assertNotIn("token", json.dumps(got.to_dict()))
        case.assertEqual([(d.domain, d.tenant) for d in await store.list()],
                         [("a.example", "acme"), ("example.com", None)])
        case.assertTrue(await store.set_verified("example.com", None))
        got = await store.get("example.com")
        case.assertFalse(got.verified)
        case.assertIsNone(await store.get("missing.example"))

        # Rotation: a new key joins unverified; per-key verification; removing a key.
        new = DKIMKey("s3", "ed25519", "bmV3", "token3", 6.0)
        await store.set_verified("example.com", 7.0)
        rotated = await store.add_keys("example.com", [new])
        case.assertEqual([k.selector for k in rotated.keys], ["s2", "s1", "s3"])
        case.assertEqual(rotated.state, "partly verified")
        case.assertTrue(rotated.usable)
        with case.assertRaises(DomainExistsError):
            await store.add_keys("example.com", [DKIMKey("s9", "rsa", "x", "t", 1.0), new])
        with case.assertRaises(DomainNotFoundError):
            await store.add_keys("missing.example", [new])
        case.assertEqual(len((await store.get("example.com")).keys), 3)  # nothing added
        case.assertTrue(await store.set_verified("example.com", 8.5, "s3"))
        case.assertFalse(await store.set_verified("example.com", 8.5, "nope"))
        got = await store.get("example.com")
        case.assertEqual((got.state, got.verified_at, got.key("s3").verified_at),
                         ("verified", 8.5, 8.5))
        case.assertTrue(await store.remove("example.com", "s1"))
        case.assertFalse(await store.remove("example.com", "s1"))
        case.assertEqual([k.selector for k in (await store.get("example.com")).keys],
                         ["s2", "s3"])
        case.assertTrue(await store.remove("example.com", "s2"))
        case.assertTrue(await store.remove("example.com", "s3"))
        got = await store.get("example.com")
        case.assertEqual((got.keys, got.state), ((), "unverified"))

        case.assertTrue(await store.remove("example.com"))
        case.assertFalse(await store.remove("example.com"))
        case.assertIsNone(await store.get("example.com"))


class SQLiteDomainStoreTests(DomainStoreContractMixin, TestCase):
    """SQLiteDomainStore passes the IDomainStore contract."""

    async def make_store(self) -> Any:
        from twisted.internet import reactor

        db = SQLiteDatabase(os.path.join(self.mktemp(), "d.db"), reactor)
        store = SQLiteDomainStore(db)
        await db.open()
        self.addCleanup(db.close)
        return store


class RedisDomainStoreTests(DomainStoreContractMixin, TestCase):
    """RedisDomainStore passes the IDomainStore contract (its own redis-server)."""

    async def make_store(self) -> Any:
        import txredisapi

        from sendarix.stores.redis.domains import RedisDomainStore
        from tests.support.redisserver import start_redis

        port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        pool = txredisapi.lazyConnectionPool("127.0.0.1", port, poolsize=2)
        self.addCleanup(pool.disconnect)
        return RedisDomainStore(pool, prefix="t:")


CLI_CONFIG = """\
[node]
name = "domtest"

[spool]
url = "sqlite:var/spool.db"

[dns]
nameservers = ["127.0.0.1:{port}"]
timeout = "2s"

[events]
json_log = false
"""


def _cli(args: list[str], cwd: str, secret: str | None = SECRET) -> Any:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("SENDARIX_SECRET_KEY", None)
    if secret is not None:
        env["SENDARIX_SECRET_KEY"] = secret
    return getProcessOutputAndValue(sys.executable, ["-m", "sendarix.control.cli", *args], env=env,
                                    path=cwd)


def _records(stdout: bytes) -> dict[str, list[str]]:
    """``record:`` lines -> {name: [strings]}."""
    out = {}
    for line in stdout.decode().splitlines():
        assert line.startswith("record: "), line
        _, name, kind, rest = line.split(" ", 3)
        assert kind == "TXT"
        out[name] = json.loads("[" + rest.replace('" "', '", "') + "]")
    return out


class DomainsCommandTests(TestCase):
    """``sendarix domains add|verify|list|check`` against the test DNS server."""

    timeout = 120

    def setUp(self) -> None:
        self.zone: dict[str, dict[str, Any]] = {"example.com": {"TXT": []}}
        port, stop = start_dns(self.zone)
        self.addCleanup(stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "sendarix.toml"), "w") as f:
            f.write(CLI_CONFIG.format(port=port))

    async def test_add_verify_list_check(self) -> None:
        """Dual keys by default; verify fails before the records are published (exit 1,
        with the reason) and passes after; list and check report it."""
        out, err, code = await _cli(["domains", "add", "example.com", "--selector", "mail"],
                                    self.dir)
        self.assertEqual(code, 0, err)
        records = _records(out)
        self.assertEqual(sorted(records), ["mail-ed25519._domainkey.example.com",
                                           "mail._domainkey.example.com"])
        self.assertGreater(len(records["mail._domainkey.example.com"]), 1)

        out, err, code = await _cli(["domains", "verify", "example.com"], self.dir)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(b"not verified", err)
        self.assertIn(b"mail._domainkey.example.com: no TXT record", err)

        for name, strings in records.items():
            self.zone[name] = {"TXT": [strings]}
        out, err, code = await _cli(["domains", "verify", "example.com"], self.dir)
        self.assertEqual(code, 0, err)
        self.assertIn(b"example.com verified", out)

        out, err, code = await _cli(["domains", "list", "--json"], self.dir)
        self.assertEqual(code, 0, err)
        listed = json.loads(out)
        self.assertEqual([(d["domain"], d["verified"]) for d in listed], [("example.com", True)])
        self.assertNotIn(b"PRIVATE", out)

        out, err, code = await _cli(["domains", "check", "example.com", "--json"], self.dir)
        self.assertEqual(code, 0, err)
        findings = {(f["kind"], f["status"]) for f in json.loads(out)}
        self.assertEqual(findings, {("SPF", "missing"), ("DKIM", "ok"), ("DMARC", "missing")})
        self.zone["example.com"] = {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]}
        self.zone["_dmarc.example.com"] = {
            "TXT": ["v=DMARC1; p=reject; rua=mailto:d@example.com"]}
        out, err, code = await _cli(["domains", "check", "example.com"], self.dir)
        self.assertEqual(code, 0, err)
        self.assertIn(b"example.com: all good", out)

        # A key replaced in DNS no longer matches: verify fails and un-verifies.
        self.zone["mail._domainkey.example.com"] = {"TXT": ["v=DKIM1; k=rsa; p=AAAA"]}
        out, err, code = await _cli(["domains", "verify", "example.com"], self.dir)
        self.assertEqual(code, 1)
        self.assertIn(b"different public key", err)

    async def test_key_rotation(self) -> None:
        """A new selector on a verified domain: verify fails until it is published
        (the old keys keep signing), then passes; old keys are removed; the last
        verified key is not removed without --force."""
        out, err, code = await _cli(["domains", "add", "example.com", "--selector", "old",
                                     "--algorithm", "ed25519"], self.dir)
        self.assertEqual(code, 0, err)
        for name, strings in _records(out).items():
            self.zone[name] = {"TXT": [strings]}
        out, err, code = await _cli(["domains", "verify", "example.com"], self.dir)
        self.assertEqual(code, 0, err)
        out, err, code = await _cli(["domains", "add", "example.com"], self.dir)
        self.assertEqual(code, 1)
        self.assertIn(b"--selector NEW", err)
        out, err, code = await _cli(["domains", "add", "example.com", "--selector", "new"],
                                    self.dir)
        self.assertEqual(code, 0, err)
        new_records = _records(out)
        self.assertEqual(sorted(new_records), ["new-ed25519._domainkey.example.com",
                                               "new._domainkey.example.com"])
        out, err, code = await _cli(["domains", "verify", "example.com"], self.dir)
        self.assertEqual(code, 1)
        self.assertIn(b"new._domainkey.example.com: no TXT record", err)
        self.assertIn(b"still signing with old", err)
        out, err, code = await _cli(["domains", "list", "--json"], self.dir)
        (listed,) = json.loads(out)
        self.assertEqual(listed["state"], "partly verified")
        self.assertEqual([(k["selector"], k["verified"]) for k in listed["keys"]],
                         [("old", True), ("new", False), ("new-ed25519", False)])
        for name, strings in new_records.items():
            self.zone[name] = {"TXT": [strings]}
        out, err, code = await _cli(["domains", "verify", "example.com"], self.dir)
        self.assertEqual(code, 0, err)
        out, err, code = await _cli(["domains", "remove", "example.com", "--selector", "old"],
                                    self.dir)
        self.assertEqual(code, 0, err)
        out, err, code = await _cli(["domains", "remove", "example.com", "--selector",
                                     "new"], self.dir)
        self.assertEqual(code, 0, err)
        out, err, code = await _cli(["domains", "remove", "example.com", "--selector",
                                     "new-ed25519"], self.dir)
        self.assertEqual(code, 1)
        self.assertIn(b"last verified key", err)
        out, err, code = await _cli(["domains", "list", "--json"], self.dir)
        (listed,) = json.loads(out)
        self.assertEqual([k["selector"] for k in listed["keys"]], ["new-ed25519"])
        self.assertEqual(listed["state"], "verified")

    async def test_add_needs_secret(self) -> None:
        """Without the node secret, add refuses with one line naming the variable."""
        out, err, code = await _cli(["domains", "add", "example.com"], self.dir, secret=None)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(b"$SENDARIX_SECRET_KEY is not set", err)

    async def test_check_reports_problems(self) -> None:
        """check says what is missing or wrong in words to act on."""
        self.zone["example.com"] = {"TXT": ["v=spf1 +all", ]}
        out, err, code = await _cli(["domains", "check", "example.com"], self.dir)
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("'+all' lets anyone send", text)
        self.assertIn("sendarix domains add example.com", text)
        self.assertIn('publish _dmarc.example.com TXT "v=DMARC1; p=none;', text)
        self.assertIn("3 problem(s) to fix", text)


SUBMISSION = {"name": "submission", "endpoint": "tcp:0:interface=127.0.0.1",
              "tls": "starttls", "auth": "required"}
RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.0/8"]}


class RelaySigningTests(TestCase):
    """The relay signs mail from verified domains; with require_verified_domains it
    refuses other sender domains; without the secret it refuses to start."""

    timeout = 60

    def setUp(self) -> Any:
        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        self.secret = NodeSecret(SECRET.encode())
        self.zone: dict[str, dict[str, Any]] = {}
        self.dns_port, stop = start_dns(self.zone)
        self.addCleanup(stop)

    async def _relay(self, **sections: Any) -> Any:
        relay = await start_relay(self, [SUBMISSION, RELAY], **sections)
        now = time.time()
        keys = []
        for key_type in ("rsa", "ed25519"):
            pair = generate_key(key_type)
            keys.append(DKIMKey(f"k-{key_type}", key_type, pair.public_b64,
                                self.secret.encrypt(pair.private_pem), now))
            self.zone[dns_name(f"k-{key_type}", "example.com")] = {
                "TXT": [record_value(key_type, pair.public_b64)]}
        await relay.stores.domains.add("example.com", None, keys, now)
        await relay.stores.domains.set_verified("example.com", now)
        await relay.stores.domains.add("pending.example", None, [], now)
        return relay

    def _dnsfunc(self) -> Any:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.nameserver_ports = {"127.0.0.1": self.dns_port}

        def lookup(name: bytes | str, timeout: int = 5) -> bytes | None:
            text = name.decode() if isinstance(name, bytes) else name
            try:
                answer = resolver.resolve(text, "TXT")
            except dns.resolver.NXDOMAIN:
                return None
            return b"".join(answer[0].strings)

        return lookup

    async def test_relay_signs_verified_domain(self) -> None:
        """Mail with a verified header From domain is stored with two signatures that
        verify (dkimpy through the DNS server, and Mail::DKIM when installed); mail
        from another domain is accepted unsigned."""
        relay = await self._relay()

        def send(sender: str, header_from: str) -> Any:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(f"EHLO c.test\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<x@example.org>\r\n"
                   "DATA\r\n".encode())
            c.codes(4)
            c.send(MESSAGE.replace(b"app@example.com", header_from.encode()) + b".\r\n")
            return c.codes(1)[0]

        reply = await in_thread(send, "app@example.com", "app@example.com")
        self.assertTrue(reply.startswith(b"250 2.0.0 OK: queued as "), reply)
        stored = bytes(await relay.stores.spool.body(reply.split()[-1].decode()))
        self.assertEqual(stored.count(b"DKIM-Signature:"), 2)
        self.assertTrue(stored.startswith(b"DKIM-Signature:"))
        lookup = self._dnsfunc()
        results = await deferToThread(
            lambda: [dkim.DKIM(stored).verify(idx=i, dnsfunc=lookup) for i in (0, 1)]
        )
        self.assertEqual(results, [True, True])
        if shutil.which("perl") and subprocess.run(
            ["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True
        ).returncode == 0:
            perl = await deferToThread(_perl_verify, stored, self.dns_port)
            assertPerlResults(self, perl)

        reply = await in_thread(send, "app@other.example", "app@other.example")
        stored = bytes(await relay.stores.spool.body(reply.split()[-1].decode()))
        self.assertNotIn(b"DKIM-Signature:", stored)

    async def test_pending_key_does_not_sign(self) -> None:
        """During a rotation only the verified keys sign: a key added but not yet
        verified adds no signature."""
        relay = await self._relay()
        pair = generate_key("ed25519")
        await relay.stores.domains.add_keys("example.com", [DKIMKey(
            "pending", "ed25519", pair.public_b64, self.secret.encrypt(pair.private_pem), 1.0)])

        def send() -> bytes:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<app@example.com>\r\n"
                   b"RCPT TO:<x@example.org>\r\nDATA\r\n")
            c.codes(4)
            c.send(MESSAGE + b".\r\n")
            return c.codes(1)[0]

        reply = await in_thread(send)
        stored = bytes(await relay.stores.spool.body(reply.split()[-1].decode()))
        self.assertEqual(stored.count(b"DKIM-Signature:"), 2)
        self.assertNotIn(b"s=pending", stored)

    async def test_unreadable_key_answers_451(self) -> None:
        """A verified domain whose key does not open with the node secret: the message
        is refused with 451 4.3.0 (the client retries), not sent unsigned."""
        relay = await self._relay()
        other = NodeSecret(b"a-different-node-secret")
        pair = generate_key("ed25519")
        await relay.stores.domains.add(
            "bad.example", None,
            [DKIMKey("s", "ed25519", pair.public_b64, other.encrypt(pair.private_pem), 1.0)],
            1.0,
        )
        await relay.stores.domains.set_verified("bad.example", 2.0)

        def send() -> bytes:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@bad.example>\r\nRCPT TO:<x@example.org>\r\n"
                   b"DATA\r\n")
            c.codes(4)
            c.send(MESSAGE.replace(b"app@example.com", b"a@bad.example") + b".\r\n")
            return c.codes(1)[0]

        reply = await in_thread(send)
        self.assertTrue(reply.startswith(b"451 4.3.0"), reply)
        self.assertTrue(self.flushLoggedErrors(SecretError))
        self.assertEqual(await relay.stores.spool.list_messages(), [])

    async def test_require_verified_domains(self) -> None:
        """An unverified envelope sender domain gets 550 5.7.1 at MAIL FROM; an
        unverified header From domain gets 550 5.7.1 after the data; a verified
        domain passes."""
        relay = await self._relay(domains={"require_verified_domains": True})

        def run() -> list[bytes]:
            c = RawClient(relay.ports["relay"])
            c.reply()
            c.send(b"EHLO c.test\r\nMAIL FROM:<a@pending.example>\r\n"
                   b"MAIL FROM:<a@unknown.example>\r\n"
                   b"MAIL FROM:<app@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            codes = c.codes(6)
            c.send(MESSAGE.replace(b"app@example.com", b"app@pending.example") + b".\r\n")
            codes += c.codes(1)
            c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            codes += c.codes(3)
            c.send(MESSAGE + b".\r\n")
            return codes + c.codes(1)

        codes = await in_thread(run)
        self.assertEqual(codes[1], b"550 5.7.1 Sender domain pending.example is not a "
                                   b"verified sending domain")
        self.assertTrue(codes[2].startswith(b"550 5.7.1 Sender domain unknown.example"))
        self.assertEqual(codes[3:6], [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK",
                                      b"354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(codes[6], b"550 5.7.1 Header From domain pending.example is not a "
                                   b"verified sending domain")
        self.assertTrue(codes[10].startswith(b"250 2.0.0 OK: queued as"), codes)

    async def test_submission_with_auth_signed(self) -> None:
        """Authenticated submission over STARTTLS is signed as well."""
        relay = await self._relay(domains={"require_verified_domains": True})
        secret = await relay.add_credential("app")

        def send() -> Any:
            s = smtp_starttls(relay.ports["submission"], relay.ca_path)
            s.login("app", secret)
            r = s.sendmail("app@example.com", ["x@example.org"], MESSAGE)
            s.quit()
            return r

        self.assertEqual(await in_thread(send), {})


class StartupSecretTests(TestCase):
    """A relay without the node secret refuses to start when encrypted keys exist."""

    def test_refuses_without_or_with_wrong_secret(self) -> Any:
        """ConfigError naming node.secret_key_env: when unset, and when wrong."""
        from twisted.internet import reactor

        folder = os.path.abspath(self.mktemp())
        config = parse_config({"spool": {"url": "sqlite:var/spool.db"}}, folder)
        db = SQLiteDatabase(config.spool.sqlite_path or "", reactor)
        store = SQLiteDomainStore(db)
        secret = NodeSecret(SECRET.encode())

        async def go() -> None:
            await db.open()
            await store.add("example.com", None,
                            [DKIMKey("s", "ed25519", "p", secret.encrypt(b"k"), 1.0)], 1.0)
            await db.close()
            with self.assertRaises(ConfigError) as e:
                load_node_secret(config, {})
            self.assertEqual(e.exception.key, "node.secret_key_env")
            self.assertIn("$SENDARIX_SECRET_KEY is not set, but 1 DKIM", str(e.exception))
            with self.assertRaises(ConfigError) as e:
                load_node_secret(config, {"SENDARIX_SECRET_KEY": "a-different-secret-xyz"})
            self.assertIn("does not decrypt", str(e.exception))
            loaded = load_node_secret(config, {"SENDARIX_SECRET_KEY": SECRET})
            self.assertEqual(loaded, secret)

        return ensureDeferred(go())

    def test_twistd_refuses_to_start(self) -> None:
        """``twistd sendarix`` exits 1 with one clear line when the secret is missing,
        also with ``--workers 2`` (the supervisor refuses before starting workers)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        import sqlite3

        db = os.path.join(folder, "spool.db")
        conn = sqlite3.connect(db)
        conn.executescript(
            "CREATE TABLE dom_key (domain TEXT, selector TEXT, key_type TEXT, "
            "public_b64 TEXT, private_encrypted TEXT, created_at REAL);"
            "INSERT INTO dom_key VALUES ('example.com','s','rsa','p','tok',1);"
        )
        conn.commit()
        conn.close()
        config = os.path.join(folder, "sendarix.toml")
        with open(config, "w") as f:
            f.write('[spool]\nurl = "sqlite:spool.db"\n[[listener]]\nname = "l"\n'
                    'endpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\nauth = "none"\n'
                    'trusted_networks = ["127.0.0.0/8"]\n')
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("SENDARIX_SECRET_KEY", None)
        proc = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "sendarix", "--config", config],
            cwd=folder, env=env, capture_output=True, timeout=60,
        )
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(b"configuration error: node.secret_key_env: $SENDARIX_SECRET_KEY is "
                      b"not set, but 1 DKIM private key(s) are stored", proc.stderr,
                      proc.stdout)
        workers = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "sendarix", "--config", config, "--workers", "2"],
            cwd=folder, env=env, capture_output=True, timeout=60,
        )
        self.assertEqual(workers.returncode, 1, workers.stdout + workers.stderr)
        self.assertIn(b"configuration error: node.secret_key_env", workers.stderr)


class DomainCheckTests(TestCase):
    """``check_domain`` findings against the test DNS server (called directly, in a
    thread, as the command does)."""

    timeout = 60

    def setUp(self) -> None:
        self.zone: dict[str, dict[str, Any]] = {}
        port, stop = start_dns(self.zone)
        self.addCleanup(stop)
        self.config = parse_config({"dns": {"nameservers": [f"127.0.0.1:{port}"],
                                            "timeout": "2s"}}, os.path.abspath(self.mktemp()))

    async def findings(self, domain: str, egress: tuple[str, ...] = ()) -> dict[str, Any]:
        from sendarix.control.domaincheck import check_domain, make_resolver

        found = await deferToThread(check_domain, make_resolver(self.config), domain, None,
                                    egress)
        return {f.kind: f for f in found if f.kind != "DKIM"}

    async def test_spf_cases(self) -> None:
        """Two SPF records, an unlisted sending address, a listed one."""
        self.zone["a.example"] = {"TXT": ["v=spf1 -all", "v=spf1 ip4:192.0.2.1 -all"]}
        self.zone["b.example"] = {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]}
        self.zone["c.example"] = {"TXT": ["google-site-verification=x",
                                          "v=spf1 ip4:192.0.2.1 ip6:2001:db8::1 ~all"]}
        a = (await self.findings("a.example"))["SPF"]
        self.assertEqual(a.status, "wrong")
        self.assertIn("merge them into one", a.advice)
        b = (await self.findings("b.example", ("192.0.2.9",)))["SPF"]
        self.assertEqual(b.status, "wrong")
        self.assertIn("add ip4:192.0.2.9", b.advice)
        c = (await self.findings("c.example", ("192.0.2.1", "2001:db8::1")))["SPF"]
        self.assertEqual((c.status, c.found), ("ok", "v=spf1 ip4:192.0.2.1 ip6:2001:db8::1 ~all"))

    async def test_dmarc_cases(self) -> None:
        """A subdomain inherits its parent's record; a bad policy is wrong; reject
        with reports is ok."""
        self.zone["_dmarc.example.net"] = {"TXT": ["v=DMARC1; p=reject; rua=mailto:r@example.net"]}
        self.zone["_dmarc.bad.example"] = {"TXT": ["v=DMARC1; p=maybe"]}
        sub = (await self.findings("mail.example.net"))["DMARC"]
        self.assertEqual((sub.status, sub.name), ("ok", "_dmarc.example.net"))
        bad = (await self.findings("bad.example"))["DMARC"]
        self.assertEqual(bad.status, "wrong")
        self.assertIn("p= must be none, quarantine or reject", bad.advice)


class SecretMismatchTests(TestCase):
    """Keys encrypted with one secret are never mixed with another's."""

    timeout = 60

    async def test_add_with_other_secret_refused(self) -> None:
        """A second ``domains add`` with a different node secret is refused."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(os.path.join(folder, "sendarix.toml"), "w") as f:
            f.write('[spool]\nurl = "sqlite:var/spool.db"\n[events]\njson_log = false\n')
        out, err, code = await _cli(["domains", "add", "a.example", "--algorithm", "ed25519"],
                                    folder)
        self.assertEqual(code, 0, err)
        out, err, code = await _cli(["domains", "add", "b.example"], folder,
                                    secret="some-other-secret-value")
        self.assertEqual(code, 1)
        self.assertIn(b"does not decrypt the stored keys", err)
        self.assertEqual(len(err.splitlines()), 1)


class RedisStartupTests(TestCase):
    """With the stores in Redis, a node whose secret does not open the stored DKIM
    keys never opens its listeners."""

    timeout = 60

    async def test_redis_node_does_not_serve_without_secret(self) -> None:
        """Keys in Redis, no secret: the listener never listens, and the reason is
        logged; with the secret it starts."""
        import txredisapi

        from sendarix.stores.redis.domains import RedisDomainStore
        from tests.support.redisserver import start_redis
        from tests.support.relay import Relay

        port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        pool = txredisapi.lazyConnectionPool("127.0.0.1", port, poolsize=1)
        self.addCleanup(pool.disconnect)
        secret = NodeSecret(SECRET.encode())
        await RedisDomainStore(pool).add(
            "example.com", None, [DKIMKey("s", "ed25519", "p", secret.encrypt(b"k"), 1.0)], 1.0)

        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k != "SENDARIX_SECRET_KEY"})
        relay = Relay(self.mktemp(), [RELAY], spool={"url": f"redis://127.0.0.1:{port}/0"})
        with self.assertRaises(RuntimeError):
            await relay.start()
        await relay.stop()
        # A Deferred still holding the failure would report it when collected, in
        # whichever test runs next: collect now, so it is flushed here.
        gc.collect()
        logged = self.flushLoggedErrors(SecretError)  # the stores, then each waiting service
        self.assertTrue(logged)
        self.assertIn("$SENDARIX_SECRET_KEY is not set, but 1 DKIM", str(logged[0].value))

        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        relay = Relay(self.mktemp(), [RELAY], spool={"url": f"redis://127.0.0.1:{port}/0"})
        await relay.start()
        self.addCleanup(relay.stop)
        self.assertIn("relay", relay.ports)
        # Let the start-up event-log trim finish before the connection closes.
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0.3, lambda: None)
