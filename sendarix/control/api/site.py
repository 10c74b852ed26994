"""The API's twisted.web server: a request body limit enforced before the body is
read, and the root resource that puts ``/v1``, the operations endpoints and the
dashboard together.

twisted.web reads a whole request body before any resource sees it; a client that
announces (or streams) more than the limit gets ``413`` and the connection is closed
as soon as the limit is passed, so a 60 MB upload costs neither memory nor disk.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from sendarix.control.api.errors import error_body


def _too_large(limit: int) -> bytes:
    body = error_body("payload_too_large", f"request body larger than {limit} bytes")
    return (
        b"HTTP/1.1 413 Payload Too Large\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n\r\n" + body
    )


class LimitedRequest(Request):
    """A request whose body may not exceed the site's ``max_body`` bytes."""

    _refused = False
    _received = 0

    def _limit(self) -> int:
        channel: Any = self.channel
        return int(getattr(channel.site, "max_body", 1 << 20))

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        transport: Any = self.channel.transport
        transport.write(_too_large(self._limit()))
        transport.loseConnection()

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if length is not None and length > self._limit():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():  # chunked bodies announce no length
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)


class ApiSite(Site):
    """The API site: :class:`LimitedRequest`, no server version in answers."""

    requestFactory = LimitedRequest  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(self, resource: IResource, max_body: int, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.max_body = max_body


def root_resource(
    api: IResource, extras: Mapping[str, IResource],
    pages: IResource | None = None, page_segments: Collection[str] = (),
) -> Resource:
    """``/v1/...`` served by ``api``; each of ``extras`` (``metrics``, ``healthz``,
    ``readyz``) as its own child; paths whose first segment is one of
    ``page_segments`` (``""`` is ``/`` itself) served by ``pages`` (the dashboard)."""
    segments = frozenset(s.encode() for s in page_segments) if pages is not None else frozenset()

    class Root(Resource):
        def getChild(self, path: bytes, request: Any) -> IResource:  # noqa: N802
            # Klein routes on the whole path: put the segment back.
            request.prepath.pop()
            request.postpath.insert(0, path)
            if path in segments:
                assert pages is not None
                return pages
            return api

    root = Root()
    for name, resource in extras.items():
        root.putChild(name.encode(), resource)
    return root
