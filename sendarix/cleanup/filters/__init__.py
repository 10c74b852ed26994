"""Content filters (docs/filtering.md): the ``pass`` filter, the rspamd client, and the
ordered chain each message goes through, chosen by its tenant, else its listener, else
the node's default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import field, frozen

from sendarix.cleanup.filters.passthrough import PassFilter
from sendarix.cleanup.filters.rspamd import RspamdFilter
from sendarix.config.settings import Config
from sendarix.interfaces import IContentFilter

#: The names ``filters = [...]`` may list.
FILTER_NAMES = ("pass", "rspamd")


@frozen
class FilterChains:
    """Which filters, in which order, a message goes through.

    The first of these that is set decides: its tenant's ``filters``, its listener's
    ``filters``, ``default``.  Names map to the node's filter objects in ``filters``.
    """

    filters: Mapping[str, IContentFilter] = field(factory=dict)
    tenants: Mapping[str, Sequence[str]] = field(factory=dict)
    listeners: Mapping[str, Sequence[str]] = field(factory=dict)
    default: Sequence[str] = ()

    def chain(self, tenant: str, listener: str) -> tuple[IContentFilter, ...]:
        """The filters for mail of ``tenant`` taken in through ``listener``, in order."""
        names = self.tenants.get(tenant)
        if names is None:
            names = self.listeners.get(listener)
        if names is None:
            names = self.default
        return tuple(self.filters[name] for name in names)


def filter_chains(config: Config, reactor: Any) -> FilterChains | None:
    """The node's chains from ``[filtering]``, ``[[listener]] filters`` and
    ``[tenant.NAME] filters`` (None when no message is filtered); only the filters
    some chain names are made."""
    tenants = {n: t.filters for n, t in config.tenants.items() if t.filters is not None}
    listeners = {x.name: x.filters for x in config.listeners if x.filters is not None}
    default = config.filtering.filters
    named = {*default, *(n for c in tenants.values() for n in c),
             *(n for c in listeners.values() for n in c)}
    if not named:
        return None
    filters: dict[str, IContentFilter] = {}
    if "pass" in named:
        filters["pass"] = PassFilter()
    if "rspamd" in named:
        rs = config.rspamd
        filters["rspamd"] = RspamdFilter(rs.url, reactor, rs.timeout, rs.on_error)
    return FilterChains(filters, tenants, listeners, default)
