"""The webhook endpoints of a node, from ``[[webhook]]``: where each tenant's events go
and with which secrets they are signed.

An endpoint's secrets come from the environment variable its ``secret_env`` names:
one ``whsec_`` secret, or several separated by spaces while a secret is rotated (every
POST is then signed with each of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from attrs import field, frozen

from sendarix.config.errors import ConfigError
from sendarix.config.settings import Config, WebhookConfig
from sendarix.events.webhooks.signature import BadSecret, parse_secret
from sendarix.model.event import Event
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE


def _frozen_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


def _endpoints(values: Iterable[WebhookEndpoint]) -> tuple[WebhookEndpoint, ...]:
    return tuple(values)


@frozen
class WebhookEndpoint:
    """One endpoint: its name (the outbox's key), tenant, URL, event types, signing keys
    and retry schedule."""

    name: str
    tenant: str
    url: str
    events: frozenset[str] = field(converter=_frozen_set)
    keys: tuple[bytes, ...] = ()
    retry_schedule: tuple[float, ...] = STANDARD_RETRY_SCHEDULE

    def wants(self, event: Event) -> bool:
        """True when ``event`` is of this endpoint's tenant and of a type it subscribed to."""
        return event.tenant == self.tenant and event.type in self.events


def keys_from(value: str, key: str) -> tuple[bytes, ...]:
    """The keys of a space-separated list of ``whsec_`` secrets; ConfigError naming
    ``key`` when one is bad or there is none."""
    secrets = value.split()
    if not secrets:
        raise ConfigError(key, "the environment variable holds no webhook secret")
    try:
        return tuple(parse_secret(s) for s in secrets)
    except BadSecret as e:
        raise ConfigError(key, str(e)) from e


def endpoint_from_config(
    webhook: WebhookConfig, index: int, environ: Mapping[str, str] | None
) -> WebhookEndpoint:
    """``[[webhook]]`` number ``index`` as an endpoint; with ``environ``, its secrets are
    read from it (ConfigError when they are missing or bad)."""
    keys: tuple[bytes, ...] = ()
    if environ is not None:
        path = f"webhook[{index}].secret_env"
        if webhook.secret_env is None:
            raise ConfigError(path, "a webhook needs a signing secret: name its variable")
        value = environ.get(webhook.secret_env)
        if value is None:
            raise ConfigError(path, f"the environment variable {webhook.secret_env} is not set")
        keys = keys_from(value, path)
    return WebhookEndpoint(
        name=webhook.endpoint_name,
        tenant=webhook.tenant,
        url=webhook.url,
        events=webhook.events,
        keys=keys,
        retry_schedule=webhook.retry_schedule,
    )


def endpoints_from_config(
    config: Config, environ: Mapping[str, str] | None
) -> tuple[WebhookEndpoint, ...]:
    """Every ``[[webhook]]`` of ``config`` (see :func:`endpoint_from_config`)."""
    return tuple(endpoint_from_config(w, i, environ) for i, w in enumerate(config.webhooks))


@frozen
class Subscriptions:
    """Which endpoints an event goes to."""

    endpoints: tuple[WebhookEndpoint, ...] = field(converter=_endpoints)

    def match(self, event: Event) -> list[str]:
        """The names of the endpoints subscribed to ``event``."""
        return [e.name for e in self.endpoints if e.wants(event)]

    @classmethod
    def of(cls, endpoints: Sequence[WebhookEndpoint]) -> Subscriptions:
        return cls(tuple(endpoints))
