"""Tests for :obj:`sendarix.stores.credentials`: secret hashing, the value, the store, the checker.

scrypt costs ~50 ms per hash with the real parameters, so each test hashes only a
few times.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING, Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from sendarix.ingress.auth import CredentialChecker
from sendarix.interfaces import ICredentialStore
from sendarix.model.credential import Credential, api_key_name, check_name, parse_rate
from sendarix.stores.credentials import (
    SCRYPT_N,
    CredentialExistsError,
    CredentialNotFoundError,
    hash_secret,
    new_secret,
    verify_secret,
)
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.credentials import RedisCredentialStore
from sendarix.stores.sqlite.credentials import SQLiteCredentialStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

# The global reactor, typed loosely: it provides every reactor interface we pass it as.
reactor: Any = _reactor


class SecretHashTests(SynchronousTestCase):
    """hash_secret / verify_secret / new_secret."""

    def test_verify_right_and_wrong(self) -> None:
        """The hash verifies its own secret and nothing else."""
        stored = hash_secret("correct horse")
        self.assertTrue(verify_secret("correct horse", stored))
        self.assertTrue(verify_secret(b"correct horse", stored))
        self.assertFalse(verify_secret("correct horsE", stored))

    def test_self_describing_and_salted(self) -> None:
        """The string names the algorithm and parameters and has a fresh salt each time."""
        a, b = hash_secret("s"), hash_secret("s")
        parts = a.split("$")
        self.assertEqual(parts[:4], ["scrypt", str(SCRYPT_N), "8", "1"])
        self.assertEqual(len(parts), 6)
        self.assertNotEqual(a, b)

    def test_malformed_never_matches(self) -> None:
        """Garbage or out-of-bounds parameters never match and never raise."""
        for stored in (
            "",
            "plain",
            "bcrypt$1$2$3$4$5",
            "scrypt$x$8$1$AAAA$AAAA",
            "scrypt$16384$8$1$!!!!$AAAA",
            "scrypt$16385$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
            f"scrypt${2**30}$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        ):
            self.assertFalse(verify_secret("s", stored), stored)

    def test_new_secret(self) -> None:
        """Secrets are long, URL-safe, different each time, and carry the name (so
        each is also the credential's API key)."""
        secrets = {new_secret("app@example.com") for _ in range(50)}
        self.assertEqual(len(secrets), 50)
        for s in secrets:
            self.assertGreaterEqual(len(s.rpartition(".")[2]), 43)
            self.assertRegex(s, r"^sx1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
            self.assertEqual(api_key_name(s), "app@example.com")

    def test_api_key_name_refuses_other_strings(self) -> None:
        """Old secrets, garbage and names that are not credential names give None."""
        for key in ("", "abc", "sx1..x", "sx1.!!.x", "sx2.YXBw.x", "sx1.YXBw", "sx1.IA.x",
                    "sx1.YXBw.x.y", "Bearer sx1.YXBw.x"):
            self.assertIsNone(api_key_name(key), key)
        self.assertEqual(api_key_name("sx1.YXBw.x"), "app")


class ParseRateTests(SynchronousTestCase):
    """parse_rate."""

    def test_units(self) -> None:
        """Per second, minute and hour all come out per minute; hours round up."""
        self.assertEqual(parse_rate("100/min"), 100)
        self.assertEqual(parse_rate("2/s"), 120)
        self.assertEqual(parse_rate("120/h"), 2)
        self.assertEqual(parse_rate("90/h"), 2)
        self.assertEqual(parse_rate("1/hour"), 1)
        self.assertEqual(parse_rate(" 7 / minutes "), 7)
        self.assertEqual(parse_rate("30"), 30)

    def test_bad(self) -> None:
        """Zero, junk and unknown units are refused."""
        for text in ("0/min", "", "ten/min", "5/ms", "5/day", "-1/min", "1.5/min"):
            self.assertRaises(ValueError, parse_rate, text)


class CredentialValueTests(SynchronousTestCase):
    """The Credential value object."""

    def test_defaults(self) -> None:
        """A bare credential may do smtp and send, from anywhere, for any domain."""
        c = Credential(name="app", tenant="t")
        self.assertEqual(c.scopes, frozenset({"smtp", "send"}))
        self.assertTrue(c.active)
        self.assertTrue(c.allows_ip("203.0.113.9"))
        self.assertTrue(c.allows_sender_domain("anything.example"))
        self.assertTrue(c.has_scope("smtp"))
        self.assertFalse(c.has_scope("admin"))
        self.assertFalse(Credential(name="a", tenant="t", revoked_at=5.0).active)

    def test_allows_ip(self) -> None:
        """Only addresses inside the listed networks are allowed, in v4, v6 and mapped form."""
        c = Credential(name="a", tenant="t", networks=["10.1.2.3/8", "2001:db8::/32", "192.0.2.7"])
        self.assertIn(ipaddress.ip_network("10.0.0.0/8"), c.networks)
        self.assertTrue(c.allows_ip("10.200.0.1"))
        self.assertTrue(c.allows_ip("::ffff:10.0.0.1"))
        self.assertTrue(c.allows_ip("2001:db8:1::5"))
        self.assertTrue(c.allows_ip("192.0.2.7"))
        self.assertFalse(c.allows_ip("192.0.2.8"))
        self.assertFalse(c.allows_ip("11.0.0.1"))
        self.assertFalse(c.allows_ip("2001:db9::1"))
        self.assertFalse(c.allows_ip("not-an-ip"))

    def test_allows_sender_domain_exact(self) -> None:
        """Domains match exactly and case-insensitively; subdomains are not covered."""
        c = Credential(name="a", tenant="t", domains=["Example.COM", "b.example"])
        self.assertEqual(c.domains, ("b.example", "example.com"))
        self.assertTrue(c.allows_sender_domain("example.com"))
        self.assertTrue(c.allows_sender_domain("EXAMPLE.com."))
        self.assertFalse(c.allows_sender_domain("mail.example.com"))
        self.assertFalse(c.allows_sender_domain("example.org"))

    def test_bad_values(self) -> None:
        """Unknown scopes and bad networks are refused."""
        self.assertRaises(ValueError, Credential, name="a", tenant="t", scopes=["smtp", "root"])
        self.assertRaises(ValueError, Credential, name="a", tenant="t", networks=["10.0.0.0/33"])

    def test_repr_hides_hash_and_dict_round_trip(self) -> None:
        """The hash is not in repr nor (by default) in to_dict; from_dict inverts to_dict."""
        c = Credential(
            name="a",
            tenant="t",
            domains=["x.example"],
            networks=["10.0.0.0/8"],
            scopes=["read"],
            rate_per_minute=5,
            sandbox=True,
            created_at=1.5,
            secret_hash="scrypt$SECRETHASH",
        )
        self.assertNotIn("SECRETHASH", repr(c))
        self.assertNotIn("secret_hash", c.to_dict())
        self.assertEqual(Credential.from_dict(c.to_dict(include_secret_hash=True)), c)
        self.assertEqual(c.to_dict()["networks"], ["10.0.0.0/8"])

    def test_names(self) -> None:
        """Names are 1-128 characters of a small alphabet."""
        for good in ("app", "ci.build-1", "user@example.com", "a+b_c", "x" * 128):
            self.assertEqual(check_name(good), good)
        for bad in ("", "x" * 129, "has space", "colon:", "ünï", "a/b", "a\r\nb"):
            self.assertRaises(ValueError, check_name, bad)


def make_db(test: TestCase) -> SQLiteDatabase:
    """A fresh SQLite file for ``test``, closed at cleanup."""
    db = SQLiteDatabase(os.path.join(test.mktemp(), "sendarix.db"), reactor)
    test.addCleanup(db.close)
    return db


class CredentialStoreContractMixin(_Base):
    """The ICredentialStore contract: every backend passes these tests.

    A backend's TestCase implements ``open_store``: a ready store whose clock (a
    ``task.Clock`` at 1000) is returned with it, and something backend-specific.
    """

    async def open_store(self) -> tuple[Any, task.Clock, Any]:
        raise NotImplementedError

    async def test_interface(self) -> None:
        """The store provides ICredentialStore."""
        store, _, _ = await self.open_store()
        self.assertTrue(verifyObject(ICredentialStore, store))

    async def test_add_get_list(self) -> None:
        """add stores the credential and a hash of the secret it returns, once."""
        store, _, _ = await self.open_store()
        cred, secret = await store.add(
            "app",
            "acme",
            domains=["acme.example"],
            networks=["192.0.2.0/24"],
            scopes=["smtp", "read"],
            rate="10/s",
            sandbox=True,
        )
        self.assertEqual(cred.created_at, 1000.0)
        self.assertEqual(cred.rate_per_minute, 600)
        self.assertNotIn(secret, cred.secret_hash)
        stored = await store.get("app")
        self.assertEqual(stored, cred)
        assert stored is not None
        self.assertTrue(verify_secret(secret, stored.secret_hash))
        self.assertIsNone(await store.get("nobody"))

        await store.add("zed", "other")
        self.assertEqual([c.name for c in await store.list()], ["app", "zed"])
        self.assertEqual([c.name for c in await store.list(tenant="other")], ["zed"])

    async def test_add_refuses(self) -> None:
        """Bad names, scopes, rates and taken names are refused."""
        store, _, _ = await self.open_store()
        await store.add("app", "t")
        with self.assertRaises(CredentialExistsError):
            await store.add("app", "t2")
        for kwargs in (
            {"name": "bad name", "tenant": "t"},
            {"name": "x" * 129, "tenant": "t"},
            {"name": "ok", "tenant": ""},
            {"name": "ok", "tenant": "t", "scopes": ["everything"]},
            {"name": "ok", "tenant": "t", "rate": "fast"},
            {"name": "ok", "tenant": "t", "rate": 0},
            {"name": "ok", "tenant": "t", "networks": ["nowhere"]},
        ):
            with self.assertRaises(ValueError):
                await store.add(**kwargs)  # type: ignore[arg-type]
        self.assertEqual([c.name for c in await store.list()], ["app"])

    async def test_revoke(self) -> None:
        """revoke marks the credential revoked at once, and keeps the first revocation time."""
        store, clock, _ = await self.open_store()
        await store.add("app", "t")
        clock.advance(5)
        self.assertTrue(await store.revoke("app"))
        clock.advance(5)
        self.assertTrue(await store.revoke("app"))
        cred = await store.get("app")
        assert cred is not None
        self.assertFalse(cred.active)
        self.assertEqual(cred.revoked_at, 1005.0)
        self.assertFalse(await store.revoke("nobody"))

    async def test_rotate(self) -> None:
        """rotate stores a new hash; revoked and unknown credentials cannot be rotated."""
        store, _, _ = await self.open_store()
        before, old = await store.add("app", "t")
        new = await store.rotate("app")
        self.assertNotEqual(new, old)
        after = await store.get("app")
        assert after is not None
        self.assertNotEqual(after.secret_hash, before.secret_hash)
        self.assertEqual(after.created_at, before.created_at)
        with self.assertRaises(CredentialNotFoundError):
            await store.rotate("nobody")
        await store.revoke("app")
        with self.assertRaises(CredentialNotFoundError):
            await store.rotate("app")



class SQLiteCredentialStoreTests(CredentialStoreContractMixin, TestCase):
    """SQLiteCredentialStore on a real SQLite file."""

    async def open_store(self) -> tuple[SQLiteCredentialStore, task.Clock, SQLiteDatabase]:
        clock = task.Clock()
        clock.advance(1000)
        db = make_db(self)
        store = SQLiteCredentialStore(db, clock, threads=reactor)
        await db.open()
        return store, clock, db

    async def test_survives_reopen(self) -> None:
        """Credentials are on disk: a new store on the same file sees them."""
        store, clock, db = await self.open_store()
        cred, _ = await store.add("app", "t", networks=["2001:db8::/48"], scopes=["admin"])
        await db.close()
        db2 = SQLiteDatabase(db.path, reactor)
        self.addCleanup(db2.close)
        store2 = SQLiteCredentialStore(db2, clock)
        await db2.open()
        self.assertEqual(await store2.get("app"), cred)


class RedisCredentialStoreTests(CredentialStoreContractMixin, TestCase):
    """RedisCredentialStore on a private redis-server."""

    async def open_store(self) -> tuple[RedisCredentialStore, task.Clock, Any]:
        clock = task.Clock()
        clock.advance(1000)
        redis = await redis_client(self)
        return RedisCredentialStore(redis, clock, threads=reactor), clock, redis

    async def test_revoke_and_rotate_on_every_node(self) -> None:
        """Two nodes (two connection pools) share the store: a credential revoked or
        rotated on one is refused on the other at once, despite its checker's cache."""
        store, _, _ = await self.open_store()
        other_pool = connect(f"redis://127.0.0.1:{self.redis_port}/0", poolsize=2)  # type: ignore[attr-defined]
        self.addCleanup(other_pool.disconnect)
        await other_pool.wait_connected(reactor, 10.0)
        other = CredentialChecker(RedisCredentialStore(other_pool, reactor), reactor)
        _, old = await store.add("app", "t")
        _, second = await store.add("second", "t")
        await other.authenticate("app", old)
        new = await store.rotate("app")
        with self.assertRaises(UnauthorizedLogin):
            await other.authenticate("app", old)
        self.assertEqual((await other.authenticate("app", new)).name, "app")
        await other.authenticate("second", second)
        await store.revoke("second")
        with self.assertRaises(UnauthorizedLogin):
            await other.authenticate("second", second)


@implementer(IRealm)
class _NameRealm:
    """A realm whose avatar is the avatar id itself."""

    def requestAvatar(self, avatarId, mind, *interfaces):  # type: ignore[no-untyped-def]
        return interfaces[0], avatarId, lambda: None


class CredentialCheckerTests(TestCase):
    """CredentialChecker against a real store."""

    async def setup_checker(
        self, scopes: tuple[str, ...] = ("smtp", "send")
    ) -> tuple[CredentialChecker, SQLiteCredentialStore, str]:
        db = make_db(self)
        store = SQLiteCredentialStore(db, reactor)
        await db.open()
        _, secret = await store.add("app", "t", scopes=scopes)
        return CredentialChecker(store, reactor), store, secret

    async def test_interface(self) -> None:
        """The checker provides ICredentialsChecker for user name + password."""
        db = make_db(self)
        checker = CredentialChecker(SQLiteCredentialStore(db, reactor))
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword,))

    async def test_accepts_right_refuses_wrong(self) -> None:
        """The right secret gives the name as avatar id; a wrong one or name is refused."""
        checker, _, secret = await self.setup_checker()
        avatar = await checker.requestAvatarId(UsernamePassword(b"app", secret.encode()))
        self.assertEqual(avatar, b"app")
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"app", b"wrong"))
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"nobody", secret.encode()))
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"\xff\xfe", b"x"))

    async def test_through_portal(self) -> None:
        """A Portal with the checker logs in with the right secret."""
        checker, _, secret = await self.setup_checker()
        portal = Portal(_NameRealm(), [checker])
        iface, avatar, _ = await portal.login(
            UsernamePassword(b"app", secret.encode()), None, Interface
        )
        self.assertEqual(avatar, b"app")

    async def test_revoke_applies_at_once(self) -> None:
        """A revoked credential is refused, even right after a cached success."""
        checker, store, secret = await self.setup_checker()
        creds = UsernamePassword(b"app", secret.encode())
        await checker.requestAvatarId(creds)
        await store.revoke("app")
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(creds)

    async def test_rotate_applies_at_once(self) -> None:
        """After rotation the old secret is refused (despite the cache) and the new works."""
        checker, store, old = await self.setup_checker()
        await checker.requestAvatarId(UsernamePassword(b"app", old.encode()))
        new = await store.rotate("app")
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"app", old.encode()))
        cred = await checker.authenticate("app", new)
        self.assertEqual(cred.name, "app")

    async def test_cache_expires(self) -> None:
        """A cached success is used within the TTL and dropped after it."""
        db = make_db(self)
        store = SQLiteCredentialStore(db, reactor)
        await db.open()
        _, secret = await store.add("app", "t")
        clock = task.Clock()
        checker = CredentialChecker(store, clock)
        await checker.authenticate("app", secret)
        self.assertEqual(len(checker._cache), 1)
        clock.advance(checker.cache_ttl + 1)
        # A wrong secret with a stale entry: refused, and the stale entry is gone.
        with self.assertRaises(UnauthorizedLogin):
            await checker.authenticate("app", "wrong")
        self.assertEqual(len(checker._cache), 0)

    async def test_requires_scope(self) -> None:
        """A credential without the smtp scope cannot log in over SMTP."""
        checker, _, secret = await self.setup_checker(scopes=("send",))
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"app", secret.encode()))
