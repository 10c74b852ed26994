"""The webhook directory: every endpoint a node sends to, those of ``[[webhook]]`` and
those added at run time, kept current while the node runs.

Endpoints added or removed by the API, by ``sendarix webhooks`` on the same stores or
by another node sharing them are seen within ``interval`` seconds: the directory reads
the endpoint store again on the node's clock and tells its listeners which names came
and went.  The sink in front of the delivery log matches events through it and the
dispatcher looks endpoints up in it, so neither needs a restart.  A stored endpoint
whose secret does not open (no node secret, or another one) is left out, with one
warning, rather than sent unsigned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sendarix.events.webhooks.endpoints import (
    SealError,
    WebhookEndpoint,
    endpoint_from_stored,
)
from sendarix.events.webhooks.signature import BadSecret
from sendarix.interfaces import IWebhookEndpointStore
from sendarix.model.event import Event
from sendarix.model.webhook import StoredWebhook

log = Logger()

#: Told ``(added, removed)``: the endpoint names that appeared and disappeared.
Listener = Callable[[set[str], set[str]], None]


class WebhookDirectory:
    """The endpoints of ``[[webhook]]`` (fixed) and of ``store`` (read every
    ``interval`` seconds once started); a configured name wins over a stored one."""

    #: Seconds between reads of the endpoint store.
    interval = 2.0

    def __init__(
        self,
        configured: Sequence[WebhookEndpoint] = (),
        clock: Any = None,
        store: IWebhookEndpointStore | None = None,
        key: bytes | None = None,
        interval: float | None = None,
    ) -> None:
        self.configured = {e.name: e for e in configured}
        self.clock = clock
        #: Where run-time endpoints are read from (None: configured ones only).
        self.store = store
        #: The key that opens stored secrets (None: stored endpoints cannot be used).
        self.key = key
        if interval is not None:
            self.interval = interval
        self.listeners: list[Listener] = []
        self._stored: dict[str, tuple[StoredWebhook, WebhookEndpoint]] = {}
        self._all: dict[str, WebhookEndpoint] = dict(self.configured)
        self._warned: set[str] = set()
        self._loop: LoopingCall | None = None
        self._reading: Deferred[None] | None = None
        self._failing = False

    # -- lookups ---------------------------------------------------------------------

    def get(self, name: str) -> WebhookEndpoint | None:
        return self._all.get(name)

    def names(self) -> list[str]:
        return sorted(self._all)

    def __iter__(self) -> Any:
        return iter(list(self._all.values()))

    def __len__(self) -> int:
        return len(self._all)

    def match(self, event: Event) -> list[str]:
        """The names of the endpoints subscribed to ``event``."""
        return [e.name for e in self._all.values() if e.wants(event)]

    # -- keeping current ---------------------------------------------------------------

    @property
    def reading(self) -> Deferred[None] | None:
        """The read of the store under way (None when none is)."""
        return self._reading

    def start(self) -> None:
        """Read the store every ``interval`` seconds (the first read after one
        interval: call :meth:`refresh` first to have them at once)."""
        if self.store is None or self._loop is not None:
            return
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("webhook directory stopped", f)
        )

    def stop(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        reading, self._reading = self._reading, None
        return reading if reading is not None else succeed(None)

    def refresh(self) -> Deferred[None]:
        """Read the store and apply what changed (a read failing keeps what is known)."""
        if self.store is None:
            return succeed(None)
        if self._reading is not None:
            return succeed(None)
        d: Deferred[Any] = self.store.list(None)
        d.addCallback(self._read)
        d.addErrback(self._read_failed)

        finished = False

        def done(result: object) -> None:
            nonlocal finished
            finished = True
            self._reading = None

        d.addBoth(done)
        if not finished:  # a store that answers at once leaves nothing under way
            self._reading = d
        return d

    def _read(self, stored: Iterable[StoredWebhook]) -> None:
        if self._failing:
            self._failing = False
            log.info("webhook endpoints read again")
        self.apply(stored)

    def _read_failed(self, failure: Any) -> None:
        # Once per outage: the stores' own users report it too.
        if not self._failing:
            self._failing = True
            log.warn("could not read the webhook endpoints (keeping the ones known): {why}",
                     why=failure.getErrorMessage())

    def apply(self, stored: Iterable[StoredWebhook]) -> None:
        """Make the stored endpoints ``stored``, and tell the listeners what changed."""
        before = set(self._all)
        kept: dict[str, tuple[StoredWebhook, WebhookEndpoint]] = {}
        for value in stored:
            if value.name in self.configured:
                continue
            known = self._stored.get(value.name)
            if known is not None and known[0] == value:
                kept[value.name] = known
                continue
            endpoint = self._open(value)
            if endpoint is not None:
                kept[value.name] = (value, endpoint)
        self._stored = kept
        self._all = {**{n: e for n, (_, e) in kept.items()}, **self.configured}
        after = set(self._all)
        added, removed = after - before, before - after
        if added or removed:
            log.info("webhook endpoints: {added} added, {removed} removed",
                     added=sorted(added), removed=sorted(removed))
            for listener in list(self.listeners):
                listener(added, removed)

    def _open(self, value: StoredWebhook) -> WebhookEndpoint | None:
        if self.key is None:
            why = "the node secret is not set, so its signing secret cannot be opened"
        else:
            try:
                return endpoint_from_stored(value, self.key)
            except (SealError, BadSecret) as e:
                why = str(e)
        if value.name not in self._warned:
            self._warned.add(value.name)
            log.warn("webhook endpoint {name} left out: {why}", name=value.name, why=why)
        return None
