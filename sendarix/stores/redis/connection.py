"""One txredisapi connection pool per process, built from the ``[spool] url``.

URL forms (docs/configuration.md and docs/scaling.md; the password never appears in the URL, it
comes from the environment variable ``[spool] password_env`` names):

- ``redis://[user@]host:port/db``
- ``rediss://[user@]host:port/db``: TLS, the server certificate verified against the
  system's trust store or ``[spool] ca_file`` (``optionsForClientTLS``; never
  txredisapi's ``ssl_context_factory=True``, which verifies nothing);
- ``unix:///path/to/redis.sock[?db=N]``;
- ``redis+sentinel://[user@]h1:26379,h2:26379/master[/db]``: the master named
  ``master``, as the Sentinels report it (txredisapi follows a failover by asking them
  again when the connection drops).

:class:`RedisClient` wraps the pool so that a command fails at once with
:class:`RedisUnavailable` while no connection is up, instead of waiting in
txredisapi's queue until Redis comes back: an SMTP client then hears ``451 4.3.0``
within a moment, and nothing it did not hear ``250`` for is written later.  A reply
that does not come within ``reply_timeout`` seconds aborts its connection
(txredisapi's ``replyTimeout``); the pool reconnects by itself, backing off up to
``max_retry_delay`` seconds.  Nothing here sends blocking commands (BLPOP, WAIT...):
on a pool they would stall the commands queued behind them on the same connection.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from attrs import frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sendarix.stores.errors import StoreUnavailable

log = Logger()

__all__ = [
    "RedisClient", "RedisTarget", "RedisUnavailable", "connect", "hash_pairs",
    "parse_redis_url",
]


class RedisUnavailable(txredisapi.ConnectionError, StoreUnavailable):
    """No connection to Redis is up (Redis is down, restarting or unreachable): the
    command was not sent."""


class RedisConnectionLost(txredisapi.ConnectionError, StoreUnavailable):
    """The connection failed or timed out while a command was under way: the command
    may or may not have run (the spool's compare-and-set outcomes tell which)."""


def _as_store_outage(failure: Failure) -> Failure:
    # Callers outside this backend only know StoreUnavailable; the spool still sees a
    # txredisapi.ConnectionError, and RedisUnavailable keeps meaning "never sent".
    if failure.check(txredisapi.ConnectionError) and not failure.check(StoreUnavailable):
        return Failure(RedisConnectionLost(failure.getErrorMessage()))
    return failure


@frozen
class RedisTarget:
    """Where a Redis URL points (without the password)."""

    kind: str  # "tcp", "unix" or "sentinel"
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int | None = None
    username: str | None = None
    tls: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""

    def describe(self) -> str:
        """A short, password-free description for logs and error messages."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "sentinel":
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel {hosts} master {self.master}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"


def hash_pairs(reply: Any) -> list[tuple[str, str]]:
    """An HGETALL reply (a flat list, or None for a missing key) as (field, value)
    pairs of strings."""
    items = [str(v) for v in reply or []]
    return list(zip(items[::2], items[1::2], strict=True))


def _host_port(text: str, default: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return host, int(port) if port else default


def _db(text: str) -> int | None:
    text = text.strip("/")
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"database must be a number, got {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisTarget:
    """The :obj:`RedisTarget` of a spool URL; ValueError for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.password:
        raise ValueError("put no password in a Redis URL (use [spool] password_env)")
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path in {url!r}")
        db = parse_qs(parts.query).get("db", [""])[0]
        return RedisTarget("unix", path=unquote(parts.path), db=_db(db))
    user_part, at, hosts = parts.netloc.rpartition("@")
    username = unquote(user_part) if at and user_part else None
    if scheme == "redis+sentinel":
        sentinels = tuple(_host_port(h, 26379) for h in hosts.split(",") if h)
        names = [p for p in parts.path.split("/") if p]
        if not sentinels or not names:
            raise ValueError(f"expected redis+sentinel://host:26379,.../master[/db], got {url!r}")
        return RedisTarget(
            "sentinel", sentinels=sentinels, master=names[0],
            db=_db(names[1]) if len(names) > 1 else None, username=username,
        )
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return RedisTarget(
        "tcp", host=parts.hostname, port=parts.port or 6379, db=_db(parts.path),
        username=username, tls=scheme == "rediss",
    )


class RedisClient:
    """A txredisapi pool handler that refuses commands at once while disconnected.

    Every txredisapi command method is available (``eval``, ``execute_command``...);
    each returns a Deferred that fails with :obj:`RedisUnavailable` when no connection of
    the pool is up.  ``describe`` names the server in messages.
    """

    def __init__(self, handler: Any, describe: str, owned: Any = ()) -> None:
        self._handler = handler
        self._factory = handler._factory
        self.describe = describe
        self._owned = tuple(owned)  # further handlers to disconnect (Sentinels)

    @property
    def connected(self) -> bool:
        """True while at least one connection of the pool is up."""
        return any(getattr(c, "connected", 0) for c in self._factory.pool)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._handler, name)

        def call(*args: Any, **kwargs: Any) -> Deferred[Any]:
            if not self.connected:
                return fail(RedisUnavailable(f"Redis ({self.describe}) is unreachable"))
            d: Deferred[Any] = method(*args, **kwargs)
            return d.addErrback(_as_store_outage)

        return call

    def wait_connected(self, clock: IReactorTime, timeout: float | None) -> Deferred[None]:
        """Fires once a connection is up; fails with :obj:`RedisUnavailable` after
        ``timeout`` seconds (None: wait for ever, logging every 10 seconds)."""
        return Deferred.fromCoroutine(self._wait(clock, timeout))

    async def _wait(self, clock: IReactorTime, timeout: float | None) -> None:
        step = 0.05
        steps = 0
        while not self.connected:
            if self._factory.disconnectCalled:
                raise RedisUnavailable(f"connection to Redis ({self.describe}) closed")
            if timeout is not None and steps * step >= timeout:
                raise RedisUnavailable(f"cannot connect to Redis ({self.describe})")
            if steps and steps % 200 == 0:  # every 10 s
                log.warn("still waiting for Redis ({where})", where=self.describe)
            d: Deferred[None] = Deferred()
            clock.callLater(step, d.callback, None)
            await d
            steps += 1

    def disconnect(self) -> Deferred[Any]:
        """Close every connection and stop reconnecting."""
        from twisted.internet.defer import gatherResults

        handlers = (self._handler, *self._owned)
        return gatherResults([h.disconnect() for h in handlers], consumeErrors=True)


class _SentinelProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
    """txredisapi's Sentinel-aware protocol, whose ROLE check on a new connection
    leaves its failure unhandled when the connection drops meanwhile (as it does
    during a failover): the error would be logged as unhandled later."""

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        if isinstance(d, Deferred):
            d.addErrback(lambda f: log.info("Redis role check failed: {why}",
                                            why=f.getErrorMessage()))
        return d


class _SentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    protocol = _SentinelProtocol


def _tls_options(host: str, ca_file: str | None) -> Any:
    from twisted.internet import ssl

    if ca_file:
        with open(ca_file, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(host, trustRoot=trust)
    return ssl.optionsForClientTLS(host)


def connect(
    url: str,
    *,
    password_env: str | None = None,
    ca_file: str | None = None,
    poolsize: int = 8,
    reply_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    max_retry_delay: float = 2.0,
) -> RedisClient:
    """A lazy pool (it connects in the background) for ``url``, wrapped in a
    :obj:`RedisClient`.  Replies come back as text (UTF-8) and numbers are not converted.
    """
    target = parse_redis_url(url)
    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise ValueError(f"spool.password_env: environment variable {password_env} is not set")
    common: dict[str, Any] = {
        "dbid": target.db, "poolsize": poolsize, "password": password,
        "connectTimeout": connect_timeout, "replyTimeout": reply_timeout,
        "convertNumbers": False,
    }
    if target.username:
        common["username"] = target.username
    owned: list[Any] = []
    if target.kind == "unix":
        handler = txredisapi.lazyUnixConnectionPool(target.path, **common)
    elif target.kind == "sentinel":
        sentinel = txredisapi.Sentinel(list(target.sentinels))
        owned.append(sentinel)
        common.pop("connectTimeout")
        handler = sentinel.master_for(target.master, factory_class=_SentinelFactory, **common)
    else:
        tls = _tls_options(target.host, ca_file) if target.tls else False
        handler = txredisapi.lazyConnectionPool(
            target.host, target.port, ssl_context_factory=tls, **common
        )
    describe = target.describe()
    factory = handler._factory
    factory.maxDelay = max_retry_delay
    # txredisapi stops reconnecting for good when AUTH or SELECT fails on a new
    # connection, also when that connection merely dropped during the handshake (Redis
    # restarting): the pool would stay down until the relay restarts.  Keep trying
    # instead (with the usual backoff), and consume the error it reports.
    factory.stopTrying = lambda: _keep_trying(describe)
    if factory.deferred is not None:
        factory.deferred.addErrback(lambda f: log.warn(
            "Redis ({where}): {why}; retrying", where=describe, why=f.getErrorMessage()
        ))
    return RedisClient(handler, describe, owned)


def _keep_trying(describe: str) -> Deferred[None]:
    from twisted.internet.defer import succeed

    log.warn("Redis ({where}): connection setup failed; retrying", where=describe)
    return succeed(None)
