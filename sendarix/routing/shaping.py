"""Per-site outbound shaping state (pure: time is passed in).

A *site* is the shaping key of a destination (:mod:`sendarix.routing.providers`): a provider
name such as ``gmail``, an ``mx:`` rollup of an MX host set, or ``pool:NAME`` for a
smarthost pool.  :class:`SiteShape` holds what one site allows (connections, messages
per connection, TLS policy, message rate) and what it has told us lately: its
concurrency window (:class:`~sendarix.scheduler.window.DestinationWindow`), its adaptive rate
(:class:`~sendarix.routing.throttle.AdaptiveRate`: halved by each 421 or 4.7.x rate-limit
reply, recovered additively by successes) and a suspension after a site refused every
connection with 421 ``suspend_after`` sessions in a row.  :class:`Shaping` builds them
on first use from the provider table and ``[delivery]``.

The shared counters (connections open, GCRA schedule) live behind
:class:`~sendarix.interfaces.IThrottle`; this module only decides the numbers.
"""

from __future__ import annotations

from attrs import define, field

from sendarix.config.settings import DeliveryConfig
from sendarix.routing.providers import ProviderTable
from sendarix.routing.throttle import AdaptiveRate
from sendarix.scheduler.window import DestinationWindow

__all__ = ["POOL_PREFIX", "Shaping", "SiteShape", "strictest_tls"]

#: Prefix of the site key of a smarthost pool.
POOL_PREFIX = "pool:"

_TLS_ORDER = {"may": 0, "encrypt": 1, "verify": 2}


def strictest_tls(*policies: str | None) -> str:
    """The strictest of the given egress TLS policies (None entries ignored)."""
    given = [p for p in policies if p is not None]
    return max(given, key=lambda p: _TLS_ORDER.get(p, 0)) if given else "may"


@define
class SiteShape:
    """The limits and recent history of one site."""

    site: str
    max_connections: int
    messages_per_connection: int
    tls: str
    window: DestinationWindow
    rate: AdaptiveRate | None = None
    period: float = 60.0
    suspend_for: float = 60.0
    suspend_after: int = 3
    #: Connections open at once from one egress source (None: only the site's cap).
    max_connections_per_source: int | None = None
    suspended_until: float | None = field(default=None, init=False)
    throttled_count: int = field(default=0, init=False)
    refusals: int = field(default=0, init=False)

    def is_suspended(self, now: float) -> bool:
        """True while the site is paused after refusing every connection."""
        if self.suspended_until is not None and now >= self.suspended_until:
            self.suspended_until = None
        return self.suspended_until is not None

    def throttled(self, now: float, refused: bool = False) -> None:
        """A rate-limit signal: halve the rate.  ``refused`` means every host of the
        site answered 421; after ``suspend_after`` such sessions in a row the site is
        paused for ``suspend_for`` seconds."""
        self.throttled_count += 1
        if self.rate is not None:
            self.rate.throttled(now)
        if refused:
            self.refusals += 1
            if self.refusals >= self.suspend_after:
                self.refusals = 0
                until = now + self.suspend_for
                if self.suspended_until is None or until > self.suspended_until:
                    self.suspended_until = until

    def held_session(self) -> None:
        """A session took place: the run of refusals is over."""
        self.refusals = 0

    def delivered(self) -> None:
        """A message was accepted: recover some rate."""
        if self.rate is not None:
            self.rate.success()

    @property
    def current_rate(self) -> float | None:
        """Messages per ``period`` allowed now, or None when unpaced."""
        return self.rate.rate if self.rate is not None else None

    def describe(self, now: float) -> dict[str, object]:
        """A JSON-able summary (for logs and state files)."""
        return {
            "site": self.site,
            "max_connections": self.max_connections,
            "max_connections_per_source": self.max_connections_per_source,
            "window": self.window.limit,
            "active": self.window.active,
            "rate": self.current_rate,
            "period": self.period,
            "suspended_until": self.suspended_until if self.is_suspended(now) else None,
            "throttled": self.throttled_count,
        }


@define
class Shaping:
    """The :class:`SiteShape` of every site seen, built on first use."""

    providers: ProviderTable
    delivery: DeliveryConfig
    sites: dict[str, SiteShape] = field(factory=dict, init=False)

    def get(self, site: str) -> SiteShape:
        """The shape of ``site`` (a provider name, an ``mx:`` or ``pool:`` key)."""
        shape = self.sites.get(site)
        if shape is None:
            shape = self.sites[site] = self._build(site)
        return shape

    def _build(self, site: str) -> SiteShape:
        dc = self.delivery
        provider = self.providers.get(site)
        max_connections = dc.concurrency
        per_connection = dc.max_messages_per_connection
        tls = dc.tls
        rate: AdaptiveRate | None = None
        period = 60.0
        per_source: int | None = None
        if provider is not None:
            max_connections = min(max_connections, provider.max_connections)
            if provider.max_connections_per_source is not None:
                per_source = min(max_connections, provider.max_connections_per_source)
            per_connection = min(per_connection, provider.messages_per_connection)
            tls = strictest_tls(tls, provider.tls)
            limit = provider.rate_limit
            if limit is not None:
                count, period = limit
                rate = AdaptiveRate(base_rate=count, floor=max(count / 20.0, 1e-6))
        window = DestinationWindow(
            initial=min(5, max_connections), maximum=max_connections,
            suspend_for=dc.dead_site_suspension,
        )
        return SiteShape(
            site=site,
            max_connections=max_connections,
            messages_per_connection=per_connection,
            tls=tls,
            window=window,
            rate=rate,
            period=period,
            suspend_for=dc.rate_limit_pause,
            max_connections_per_source=per_source,
        )
