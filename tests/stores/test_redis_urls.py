"""Every ``[spool] url`` form against a real redis-server: ``redis://`` with an ACL user
and ``password_env``, ``rediss://`` (TLS, certificate verified against a test CA),
``unix://`` and ``redis+sentinel://`` (a real ``redis-server --sentinel``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.stores.redis.connection import RedisTarget, RedisUnavailable, connect, parse_redis_url
from sendarix.stores.redis.spool import RedisSpool
from tests.support.redisserver import _answers_ping, _free_port, start_redis
from tests.support.spool_contract import sample_message
from tests.support.tlsca import TestCA


class ParseRedisURLTests(SynchronousTestCase):
    """parse_redis_url reads every form and refuses a password in the URL."""

    def test_forms(self) -> None:
        """Host, port, database, user, TLS, unix path and Sentinel hosts."""
        self.assertEqual(
            parse_redis_url("redis://app@10.0.0.5:6380/2"),
            RedisTarget("tcp", host="10.0.0.5", port=6380, db=2, username="app"),
        )
        self.assertEqual(parse_redis_url("rediss://r.example").tls, True)
        self.assertEqual(parse_redis_url("rediss://r.example").port, 6379)
        self.assertEqual(
            parse_redis_url("unix:///run/redis.sock?db=3"),
            RedisTarget("unix", path="/run/redis.sock", db=3),
        )
        self.assertEqual(
            parse_redis_url("redis+sentinel://s1:26379,s2/mymaster/1"),
            RedisTarget("sentinel", sentinels=(("s1", 26379), ("s2", 26379)),
                        master="mymaster", db=1),
        )

    def test_refused(self) -> None:
        """A password in the URL, a bad database, no host or no master: ValueError."""
        for bad in ("redis://u:pw@h/0", "redis://h/x", "redis:///0", "redis+sentinel://s1/",
                    "http://h/0", "unix://"):
            self.assertRaises(ValueError, parse_redis_url, bad)


async def spool_works(test: TestCase, url: str, **kw: Any) -> RedisSpool:
    """Connect to ``url``, start a spool on it and round-trip one message."""
    client = connect(url, **kw)
    test.addCleanup(client.disconnect)
    await client.wait_connected(reactor, 15.0)
    spool = RedisSpool(client, clock=reactor)
    await spool.start()
    await spool.enqueue(sample_message("0000000000URLFORM001"))
    test.assertEqual((await spool.stats()).messages, 1)
    return spool


class RedisURLTests(TestCase):
    """Each URL form connects and the spool works over it."""

    timeout = 60

    async def test_acl_user_and_password_env(self) -> None:
        """redis://user@host with the password from [spool] password_env logs in as
        that ACL user."""
        port, stop = start_redis(
            os.path.abspath(self.mktemp()), extra=["--user", "relay", "on", ">s3cret", "~*",
                                                   "&*", "+@all"],
        )
        self.addCleanup(stop)
        os.environ["SENDARIX_TEST_REDIS_PW"] = "s3cret"
        self.addCleanup(os.environ.pop, "SENDARIX_TEST_REDIS_PW", None)
        url = f"redis://relay@127.0.0.1:{port}/1"
        client = connect(url, password_env="SENDARIX_TEST_REDIS_PW")
        self.addCleanup(client.disconnect)
        await client.wait_connected(reactor, 10.0)
        self.assertEqual(await client.execute_command("ACL", "WHOAMI"), "relay")
        await spool_works(self, url, password_env="SENDARIX_TEST_REDIS_PW")
        self.assertRaises(ValueError, connect, url, password_env="SENDARIX_TEST_UNSET_PW")

    async def test_handshake_failure_retried(self) -> None:
        """A connection whose setup fails (here SELECT, refused by the ACL; the same
        path as a connection lost during setup while Redis restarts) is retried: the
        pool connects once the cause is gone.  (txredisapi alone stops for good.)"""
        port, stop = start_redis(
            os.path.abspath(self.mktemp()),
            extra=["--user", "relay", "on", ">pw", "~*", "&*", "+@all", "-select"],
        )
        self.addCleanup(stop)
        os.environ["SENDARIX_TEST_REDIS_PW"] = "pw"
        self.addCleanup(os.environ.pop, "SENDARIX_TEST_REDIS_PW", None)
        client = connect(f"redis://relay@127.0.0.1:{port}/3",
                         password_env="SENDARIX_TEST_REDIS_PW", poolsize=2)
        self.addCleanup(client.disconnect)
        with self.assertRaises(RedisUnavailable):
            await client.wait_connected(reactor, 1.0)
        admin = connect(f"redis://127.0.0.1:{port}", poolsize=1)
        self.addCleanup(admin.disconnect)
        await admin.wait_connected(reactor, 10.0)
        await admin.execute_command("ACL", "SETUSER", "relay", "+select")
        await client.wait_connected(reactor, 15.0)
        self.assertIn(" db=3 ", await client.execute_command("CLIENT", "INFO"))

    async def test_tls_verified(self) -> None:
        """rediss:// connects over TLS when the server's certificate verifies against
        [spool] ca_file, and never connects to one that does not."""
        folder = os.path.abspath(self.mktemp())
        ca = TestCA(os.path.join(folder, "ca"))
        cert, key = ca.issue("redis.test")
        tls_port = _free_port()
        _, stop = start_redis(
            os.path.join(folder, "redis"),
            extra=["--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                   "--tls-ca-cert-file", ca.ca_path, "--tls-auth-clients", "no"],
        )
        self.addCleanup(stop)
        await spool_works(self, f"rediss://127.0.0.1:{tls_port}/0", ca_file=ca.ca_path)
        other = TestCA(os.path.join(folder, "other"))
        untrusted = connect(f"rediss://127.0.0.1:{tls_port}/0", ca_file=other.ca_path)
        self.addCleanup(untrusted.disconnect)
        with self.assertRaises(RedisUnavailable):
            await untrusted.wait_connected(reactor, 2.0)

    async def test_unix_socket(self) -> None:
        """unix:///path.sock?db=N reaches a server on its unix socket."""
        folder = os.path.abspath(self.mktemp())
        # A socket path must be short (108 bytes), so not in trial's deep folders.
        short = tempfile.mkdtemp(prefix="sxr")
        self.addCleanup(shutil.rmtree, short, True)
        sock = os.path.join(short, "redis.sock")
        _, stop = start_redis(folder, extra=["--unixsocket", sock, "--unixsocketperm", "700"])
        self.addCleanup(stop)
        await spool_works(self, f"unix://{sock}?db=2")

    async def test_sentinel(self) -> None:
        """redis+sentinel://host:port/master finds the master through a real Sentinel."""
        folder = os.path.abspath(self.mktemp())
        master_port, stop = start_redis(os.path.join(folder, "master"))
        self.addCleanup(stop)
        sentinel_port = start_sentinel(self, os.path.join(folder, "sentinel"), master_port)
        await spool_works(self, f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0")

    async def test_sentinel_failover(self) -> None:
        """After a Sentinel failover the pool finds the new master by itself, and the
        mail spooled before the failover is there."""
        folder = os.path.abspath(self.mktemp())
        master_port, stop = start_redis(os.path.join(folder, "master"))
        self.addCleanup(stop)
        replica_port, stop_replica = start_redis(
            os.path.join(folder, "replica"), extra=["--replicaof", "127.0.0.1", str(master_port)]
        )
        self.addCleanup(stop_replica)
        sentinel_port = start_sentinel(self, os.path.join(folder, "sentinel"), master_port)
        spool = await spool_works(
            self, f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
        )
        sentinel = connect(f"redis://127.0.0.1:{sentinel_port}", poolsize=1)
        self.addCleanup(sentinel.disconnect)
        await sentinel.wait_connected(reactor, 10.0)
        for _ in range(100):  # the Sentinel must have seen the replica first
            replicas = await sentinel.execute_command("SENTINEL", "REPLICAS", "mymaster")
            if replicas:
                break
            await deferLater(reactor, 0.1, lambda: None)
        await sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
        for _ in range(150):
            address = await sentinel.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"
            )
            if str(address[1]) == str(replica_port):
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(str(address[1]), str(replica_port))
        for _ in range(150):  # until the pool writes to the new master
            try:
                await spool.enqueue(sample_message("0000000000URLFORM002"))
                break
            except Exception:
                await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((await spool.stats()).messages, 2)


def start_sentinel(test: TestCase, directory: str, master_port: int) -> int:
    """Run ``redis-server --sentinel`` watching the master on ``master_port`` as
    ``mymaster``; its port.  Killed at the test's cleanup."""
    binary = shutil.which("redis-server")
    assert binary is not None  # start_redis already skipped or failed otherwise
    os.makedirs(directory, exist_ok=True)
    port = _free_port()
    conf = os.path.join(directory, "sentinel.conf")
    with open(conf, "w") as f:
        f.write(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile sentinel.log\n"
            f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        )
    process = subprocess.Popen(
        [binary, conf, "--sentinel"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        process.kill()
        process.wait(timeout=10)

    test.addCleanup(stop)
    deadline = time.monotonic() + 10
    while not _answers_ping(port):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"redis sentinel did not start; see {directory}/sentinel.log")
        time.sleep(0.02)
    return port
