"""The webhook endpoints of a node: where each tenant's events go and with which
secrets they are signed.

A ``[[webhook]]`` endpoint's secrets come from the environment variable its
``secret_env`` names: one ``whsec_`` secret, or several separated by spaces while a
secret is rotated (every POST is then signed with each of them).  An endpoint added
at run time keeps its secrets in the stores, sealed with AES-GCM under a key derived
from the node secret (:func:`seal`, :func:`unseal`): signing needs them in the clear,
so a hash would not do, and the stores alone (a copied database file, a Redis dump)
do not give them away.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping, Sequence

from attrs import field, frozen
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sendarix.config.errors import ConfigError
from sendarix.config.settings import Config, WebhookConfig
from sendarix.events.webhooks.signature import BadSecret, parse_secret
from sendarix.model.event import Event
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE, StoredWebhook

#: The purpose the node secret's key for sealing webhook secrets is derived for.
KEY_PURPOSE = "sendarix webhook secrets v1"


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


class SealError(ValueError):
    """A sealed secret does not open with this key (another node secret, or damage)."""


def seal(key: bytes, name: str, secrets: Sequence[str]) -> str:
    """``secrets`` (``whsec_`` values) encrypted and authenticated under ``key`` (32
    bytes), bound to the endpoint ``name``: base64 of nonce and ciphertext."""
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, " ".join(secrets).encode("ascii"), name.encode())
    return base64.b64encode(nonce + sealed).decode("ascii")


def unseal(key: bytes, name: str, sealed: str) -> list[str]:
    """The secrets :func:`seal` sealed for ``name``; SealError when ``key`` is not the
    one they were sealed with."""
    try:
        raw = base64.b64decode(sealed, validate=True)
        plain = AESGCM(key).decrypt(raw[:12], raw[12:], name.encode())
    except (InvalidTag, binascii.Error, ValueError):
        raise SealError(
            f"the secret of webhook {name} does not open with this node secret"
        ) from None
    return plain.decode("ascii").split()


def endpoint_from_stored(stored: StoredWebhook, key: bytes | None) -> WebhookEndpoint:
    """A stored endpoint as the node uses it; with ``key``, its secrets are opened
    (SealError when they do not open), without, it has no keys (for listings)."""
    keys: tuple[bytes, ...] = ()
    if key is not None:
        keys = tuple(parse_secret(s) for s in unseal(key, stored.name, stored.sealed))
    return WebhookEndpoint(
        name=stored.name, tenant=stored.tenant, url=stored.url, events=stored.events,
        keys=keys, retry_schedule=stored.retry_schedule,
    )
