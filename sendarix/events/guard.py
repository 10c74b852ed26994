"""The complaint-rate guard: a tenant whose share of complaints over the last day's
deliveries passes its ``max_complaint_rate`` has its outgoing mail held (deferred,
never bounced) until an operator releases it (``sendarix tenants resume``).

The rate is watched per tenant and per tenant and provider: over the limit on the
whole, all the tenant's mail is held; over it at one provider only (its complaints
come from one mailbox provider's users), only its mail to that provider is held.
A hold is kept under a key: the tenant's name, or ``tenant/provider``
(:func:`hold_key`; tenant names never contain ``/``).

``should_hold`` and ``holds_due`` are the decision (pure); :class:`ComplaintGuard`
reads the hourly statistics, writes holds to the stores (so every node and the
command line see them) and keeps the delivery agent's set of holds current, also
after a release made elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sendarix.events.stats import hour_of
from sendarix.interfaces import IStatsStore, ITenantHolds
from sendarix.stores.errors import StoreUnavailable

log = Logger()

#: Fewer deliveries than this in a day say nothing about a rate (1 of 3 is not 33 %).
MIN_DELIVERIES = 100

#: The provider name of deliveries to hosts of no known provider (never held alone).
OTHER_PROVIDER = "other"

#: After a release, the guard leaves the tenant alone this long (seconds): the
#: complaints that caused the hold are still in the last day's figures.
GRACE_AFTER_RELEASE = 86400.0


def should_hold(delivered: int, complained: int, max_rate: float,
                min_deliveries: int = MIN_DELIVERIES, provider: str | None = None) -> str | None:
    """Why the tenant's mail (to ``provider``, when named) should be held, or None."""
    if delivered < min_deliveries:
        return None
    rate = complained / delivered
    if rate <= max_rate:
        return None
    at = f" at {provider}" if provider is not None else ""
    return (f"complaint rate {rate * 100:.2f}%{at} over the last day is above the limit "
            f"{max_rate * 100:.2f}% ({complained} complaints, {delivered} deliveries)")


def hold_key(tenant: str, provider: str | None = None) -> str:
    """The key of a hold of all ``tenant``'s mail, or of its mail to ``provider``."""
    return tenant if provider is None else f"{tenant}/{provider}"


def split_hold_key(key: str) -> tuple[str, str | None]:
    """(tenant, provider or None) of a hold key."""
    tenant, _, provider = key.partition("/")
    return tenant, provider or None


def holds_due(figures: Mapping[tuple[str, str], tuple[int, int]],
              limit_of: Callable[[str], float],
              min_deliveries: int = MIN_DELIVERIES) -> dict[str, str]:
    """The holds the last day's ``figures`` call for, ``{hold key: reason}``.

    ``figures`` maps (tenant, provider) to (deliveries, complaints).  A tenant over
    its limit on the whole is held entirely (no provider holds besides); otherwise
    each named provider (not ``other``) at which its own figures are over the limit
    holds the tenant's mail to that provider.
    """
    totals: dict[str, tuple[int, int]] = {}
    for (tenant, _), (delivered, complained) in figures.items():
        d, c = totals.get(tenant, (0, 0))
        totals[tenant] = (d + delivered, c + complained)
    due: dict[str, str] = {}
    for tenant in sorted(totals):
        limit = limit_of(tenant)
        why = should_hold(*totals[tenant], limit, min_deliveries)
        if why is not None:
            due[hold_key(tenant)] = why
            continue
        for (t, provider), (delivered, complained) in sorted(figures.items()):
            if t != tenant or provider == OTHER_PROVIDER:
                continue
            why = should_hold(delivered, complained, limit, min_deliveries, provider)
            if why is not None:
                due[hold_key(tenant, provider)] = why
    return due


@define
class ComplaintGuard:
    """Checks the tenants' complaint rates and keeps ``on_held`` told of held ones."""

    stats: IStatsStore
    holds: ITenantHolds
    clock: Any
    #: A tenant's max_complaint_rate (every tenant with deliveries is watched).
    limit_of: Callable[[str], float]
    #: Told the holds ({hold key: reason}) after every refresh.
    on_held: Callable[[dict[str, str]], None]
    interval: float = 10.0
    check_every: int = 6  # rates are checked every 6th refresh (a minute)
    min_deliveries: int = MIN_DELIVERIES
    _loop: LoopingCall | None = field(default=None, init=False)
    _runs: int = field(default=0, init=False)

    def start(self) -> None:
        self._loop = LoopingCall(self.run)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("the complaint guard stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def run(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._run())

        def failed(failure: Any) -> None:
            if failure.check(StoreUnavailable):
                log.warn("complaint guard skipped a run: {why}", why=failure.getErrorMessage())
            else:
                log.failure("complaint guard run failed", failure)

        return d.addErrback(failed)

    async def _run(self) -> None:
        if self._runs % self.check_every == 0:
            await self.check()
        self._runs += 1
        await self.refresh()

    def check_now(self) -> Deferred[None]:
        """Check every tenant's rate, then refresh the held set, at once."""
        async def go() -> None:
            await self.check()
            await self.refresh()

        return Deferred.fromCoroutine(go())

    async def refresh(self) -> None:
        """Tell ``on_held`` which holds are in force now, ``{hold key: reason}`` (holds
        and releases made by any node or the command line)."""
        held = await self.holds.all()
        self.on_held({tenant: reason for tenant, (reason, _) in held.items()})

    async def check(self) -> None:
        now = self.clock.seconds()
        rows = await self.stats.query(hour_of(now - 86400.0), now + 1)
        figures: dict[tuple[str, str], tuple[int, int]] = {}
        for _, tenant, kind, provider, n in rows:
            if kind not in ("delivered", "complained"):
                continue
            pair = (tenant, provider or OTHER_PROVIDER)
            delivered, complained = figures.get(pair, (0, 0))
            figures[pair] = ((delivered + n, complained) if kind == "delivered"
                            else (delivered, complained + n))
        for key, why in holds_due(figures, self.limit_of, self.min_deliveries).items():
            released = await self.holds.released_at(key)
            if released is not None and now - released < GRACE_AFTER_RELEASE:
                continue
            if await self.holds.hold(key, why, now):
                tenant, provider = split_hold_key(key)
                log.warn("tenant {tenant}'s outgoing mail{to} is held: {why}", tenant=tenant,
                         to=f" to {provider}" if provider else "", why=why)
