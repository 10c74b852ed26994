"""The operations endpoints, without an API key: ``/metrics`` (Prometheus text,
rendered on the reactor thread, where the metrics are updated; a worker process
answers for its whole node), ``/healthz`` (the process serves) and ``/readyz`` (the
stores answer and the listeners listen).

Bind the API to an internal address: these three answer anyone who can connect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sendarix.control.api.errors import json_bytes
from sendarix.events.metrics import Metrics

log = Logger()


class MetricsResource(Resource):
    """``GET /metrics``: the process's metrics in the Prometheus text format, or with
    ``gather`` set (a worker of several), what it fires with: the whole node's."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics
        #: Renders the exposition to serve instead of this process's registry alone
        #: (it must never fail; see sendarix.node.peermetrics).
        self.gather: Callable[[], Deferred[bytes]] | None = None

    def render_GET(self, request: Any) -> Any:  # noqa: N802 - twisted.web's name
        # prometheus-client's own Twisted resource renders in a thread pool; the
        # counters change on the reactor thread, so render here, in one go.
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        if self.gather is None:
            return generate_latest(self.metrics.registry)

        gone: list[bool] = []
        # Fails when the scraper hangs up before the node's figures are gathered.
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(body: bytes) -> None:
            if gone:
                return
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("the node's metrics could not be gathered", failure)
            answer(generate_latest(self.metrics.registry))

        self.gather().addCallbacks(answer, failed)
        return NOT_DONE_YET


class HealthResource(Resource):
    """``GET /healthz``: 200 while the process serves HTTP at all."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        return json_bytes({"status": "ok"})


class ReadyResource(Resource):
    """``GET /readyz``: 200 when ``check`` says ready, else 503 with the reasons.

    ``check`` fires with a list of what is not ready; empty means ready.
    """

    isLeaf = True

    def __init__(self, check: Callable[[], Deferred[list[str]]]) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request: Any) -> Any:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        d: Deferred[list[str]] = maybeDeferred(self.check)

        def answer(problems: list[str]) -> None:
            if getattr(request, "_disconnected", False):
                return  # the client left while the check ran
            request.setResponseCode(503 if problems else 200)
            body = {"status": "not ready", "problems": problems} if problems else {
                "status": "ready"
            }
            request.write(json_bytes(body))
            request.finish()

        def failed(failure: Any) -> None:
            answer([f"readiness check failed: {failure.getErrorMessage()}"])

        d.addCallbacks(answer, failed)
        return NOT_DONE_YET
