"""Mailbox providers recognised by MX host name, and MX-site rollup (pure).

Big providers host mail for many domains on the same MX hosts, and they throttle by
sending IP across all of those domains.  So outbound shaping is keyed by *site*, not
by recipient domain: the provider name when an MX host belongs to a known provider
(``etc/providers.toml``), else a key built from the sorted MX host set, so domains
sharing MX hosts share one window and one rate.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import field, frozen

from sendarix.config.loader import parse_config
from sendarix.config.settings import ProviderConfig

# The built-in table; etc/providers.toml says the same in TOML (a test checks that
# they agree).  The major providers refuse or junk clear-text mail, hence TLS.
_DEFAULT: dict[str, dict[str, Any]] = {
    "gmail": {"mx_suffixes": ["google.com", "googlemail.com"], "max_connections": 20,
              "messages_per_connection": 100, "rate": "3000/min"},
    "outlook": {"mx_suffixes": ["outlook.com", "protection.outlook.com", "hotmail.com"],
                "max_connections": 20, "rate": "2000/min"},
    "yahoo": {"mx_suffixes": ["yahoodns.net", "yahoo.com"], "rate": "1000/min"},
    "aol": {"mx_suffixes": ["aol.com", "mx-aol.mail.gm0.yahoodns.net"], "rate": "600/min"},
    "icloud": {"mx_suffixes": ["icloud.com", "me.com"], "rate": "600/min"},
    "zoho": {"mx_suffixes": ["zoho.com", "zoho.eu", "zohomail.com"]},
    "yandex": {"mx_suffixes": ["yandex.net", "yandex.ru"]},
    "gmx": {"mx_suffixes": ["gmx.net", "gmx.com", "gmx.de", "web.de"]},
    "fastmail": {"mx_suffixes": ["messagingengine.com", "fastmail.com"]},
    "proton": {"mx_suffixes": ["protonmail.ch", "proton.me"]},
}
_SMALL = {"max_connections": 5, "messages_per_connection": 50, "rate": "300/min"}
_LARGE = {"max_connections": 10, "messages_per_connection": 50}

# Prefix of rollup keys, so a site key never equals a provider name.
SITE_PREFIX = "mx:"


def _normalize(host: str) -> str:
    return host.strip().lower().rstrip(".")


@frozen
class ProviderTable:
    """Providers by name, with a lookup from MX host name to provider."""

    providers: Mapping[str, ProviderConfig]
    # (suffix, provider) longest suffix first, so the most specific entry wins.
    _suffixes: tuple[tuple[str, str], ...] = field(init=False)

    @_suffixes.default
    def _index(self) -> tuple[tuple[str, str], ...]:
        pairs = [
            (_normalize(s).lstrip("."), name)
            for name, p in self.providers.items()
            for s in p.mx_suffixes
        ]
        return tuple(sorted(pairs, key=lambda pair: (-len(pair[0]), pair[0])))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str = ".") -> ProviderTable:
        """Build from parsed TOML holding ``[provider.NAME]`` tables (validated like
        the main configuration; raises :class:`sendarix.config.errors.ConfigError`)."""
        return cls(parse_config({"provider": dict(data.get("provider", {}))}, base_dir).providers)

    @classmethod
    def from_toml(cls, path: str) -> ProviderTable:
        """Load a provider table file such as ``etc/providers.toml``."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data, os.path.dirname(os.path.abspath(path)))

    @classmethod
    def default(cls) -> ProviderTable:
        """The built-in table of the major mailbox providers."""
        data: dict[str, dict[str, Any]] = {}
        for name, entry in _DEFAULT.items():
            base = _LARGE if "rate" in entry else _SMALL
            data[name] = {**base, **entry, "tls": "required"}
        return cls.from_dict({"provider": data})

    def merged(self, overrides: Mapping[str, ProviderConfig]) -> ProviderTable:
        """This table with ``overrides`` (such as the main config's ``[provider.NAME]``
        sections) replacing or adding providers by name."""
        return ProviderTable({**self.providers, **overrides})

    def provider_for(self, mx_host: str) -> str | None:
        """The provider whose suffix ``mx_host`` ends with at a label boundary (the
        longest suffix wins), or None."""
        host = _normalize(mx_host)
        for suffix, name in self._suffixes:
            if host == suffix or host.endswith("." + suffix):
                return name
        return None

    def get(self, name: str) -> ProviderConfig | None:
        """The provider called ``name``, or None."""
        return self.providers.get(name)

    def site_for(self, mx_hosts: Iterable[str]) -> str:
        """The shaping key of a destination with these MX hosts: the provider name
        when the hosts belong to exactly one provider, else ``mx:`` and the sorted,
        lowercased host set, so domains sharing MX hosts share a key."""
        hosts = sorted({_normalize(h) for h in mx_hosts} - {""})
        if not hosts:
            raise ValueError("no MX hosts")
        names = {self.provider_for(h) for h in hosts} - {None}
        if len(names) == 1:
            return names.pop()  # type: ignore[return-value]
        return SITE_PREFIX + ",".join(hosts)


def site_for(mx_hosts: Iterable[str], table: ProviderTable | None = None) -> str:
    """:meth:`ProviderTable.site_for` with ``table`` (default: the built-in table)."""
    return (table if table is not None else _default_table()).site_for(mx_hosts)


_cache: list[ProviderTable] = []


def _default_table() -> ProviderTable:
    # Parsing the built-in table is cheap but not free; build it once.
    if not _cache:
        _cache.append(ProviderTable.default())
    return _cache[0]
