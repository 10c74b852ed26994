"""A port the node opens once its stores are ready: the SMTP listeners and the HTTP
listener share this life cycle.

A listener must not accept a client before the stores that answer it are open, so
:class:`PortService` waits for ``ready()`` before it listens (on an endpoint string,
optionally under TLS, optionally on a port shared by the worker processes), and on
stop closes the port before the stores close.  Its connections send what they
write at once when they can (:mod:`sendarix.node.transport`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from sendarix.node.sharedports import listen_shared
from sendarix.node.transport import send_eagerly

log = Logger()


class PortService(Service):
    """Listens on ``endpoint`` with ``factory`` once ``ready()`` fires.

    :param tls: server TLS options that wrap every connection (implicit TLS), or None.
    :param shared: listen on the socket the worker processes share.
    :param describe: the log line's text once listening, given the host and port.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        factory: Any,
        ready: Callable[[], Deferred[Any]],
        describe: Callable[[str, str], str],
        tls: Any = None,
        shared: bool = False,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self.factory = factory
        self._ready = ready
        self._describe = describe
        self._tls = tls
        self._shared = shared
        self.port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        d = self._ready()
        d.addCallback(lambda _: self._listen())
        d.addErrback(lambda f: log.failure("{name} not started", f, name=self.name))
        self._listening = d

    def _listen(self) -> Deferred[IListeningPort]:
        factory: Any = self.factory
        if self._tls is not None:
            factory = TLSMemoryBIOFactory(self._tls, False, self.factory)

        def listening(port: IListeningPort) -> IListeningPort:
            send_eagerly(port)
            self.port = port
            address = port.getHost()
            log.info("{what}", what=self._describe(
                str(getattr(address, "host", address)), str(getattr(address, "port", ""))
            ))
            return port

        if self._shared:
            return listen_shared(self._reactor, self._endpoint, factory).addCallback(listening)
        d: Deferred[IListeningPort] = endpoints.serverFromString(
            self._reactor, self._endpoint
        ).listen(factory)
        return d.addCallback(listening)

    def listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port (tests learn port 0's number from it)."""
        assert self._listening is not None
        out: Deferred[IListeningPort] = Deferred()

        def relay(result: Any) -> Any:
            if self.port is not None:
                out.callback(self.port)
            else:
                out.errback(RuntimeError(f"{self.name} is not listening"))
            return result

        self._listening.addBoth(relay)
        return out

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        if self.port is None:
            return succeed(None)
        return maybeDeferred(self.port.stopListening)
