"""The event sink in front of the delivery log: an event some webhook subscribed to is
logged and queued in the webhook outbox in one transaction; any other event is only
logged.  Subscriptions are asked per event, so a directory that changes while the
node runs (:class:`~sendarix.events.webhooks.directory.WebhookDirectory`) is
followed at once."""

from __future__ import annotations

from typing import Any, Protocol

from attrs import define
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from sendarix.interfaces import IEventLog, IEventSink, IWebhookOutbox
from sendarix.model.event import Event


class Matcher(Protocol):
    """Which endpoints an event goes to (``Subscriptions``, ``WebhookDirectory``)."""

    def match(self, event: Event) -> list[str]: ...


@implementer(IEventSink)
@define
class OutboxSink:
    """Takes the delivery log's place among the event sinks (it writes the log too)."""

    log: IEventLog
    outbox: IWebhookOutbox
    subscriptions: Matcher

    def emit(self, event: Event) -> Deferred[Any]:
        """Log ``event``, and queue it for the endpoints subscribed to it."""
        endpoints = self.subscriptions.match(event)
        if endpoints:
            return maybeDeferred(self.outbox.add, event, endpoints)
        return maybeDeferred(self.log.emit, event)
