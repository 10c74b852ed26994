"""The complaint-rate guard: a tenant whose share of complaints over the last day's
deliveries passes its ``max_complaint_rate`` has its outgoing mail held (deferred,
never bounced) until an operator releases it (``sendarix tenants resume``).

``should_hold`` is the decision (pure); :class:`ComplaintGuard` reads the hourly
statistics, writes holds to the stores (so every node and the command line see
them) and keeps the delivery agent's set of held tenants current, also after a
release made elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
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

#: After a release, the guard leaves the tenant alone this long (seconds): the
#: complaints that caused the hold are still in the last day's figures.
GRACE_AFTER_RELEASE = 86400.0


def should_hold(delivered: int, complained: int, max_rate: float,
                min_deliveries: int = MIN_DELIVERIES) -> str | None:
    """Why the tenant's mail should be held, or None."""
    if delivered < min_deliveries:
        return None
    rate = complained / delivered
    if rate <= max_rate:
        return None
    return (f"complaint rate {rate * 100:.2f}% over the last day is above the limit "
            f"{max_rate * 100:.2f}% ({complained} complaints, {delivered} deliveries)")


@define
class ComplaintGuard:
    """Checks the tenants' complaint rates and keeps ``on_held`` told of held ones."""

    stats: IStatsStore
    holds: ITenantHolds
    clock: Any
    #: A tenant's max_complaint_rate (every tenant with deliveries is watched).
    limit_of: Callable[[str], float]
    #: Told the held tenants ({tenant: reason}) after every refresh.
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
        """Tell ``on_held`` which tenants are held now (holds and releases made by any
        node or the command line)."""
        held = await self.holds.all()
        self.on_held({tenant: reason for tenant, (reason, _) in held.items()})

    async def check(self) -> None:
        now = self.clock.seconds()
        rows = await self.stats.query(hour_of(now - 86400.0), now + 1)
        delivered: dict[str, int] = {}
        complained: dict[str, int] = {}
        for _, tenant, kind, _, n in rows:
            if kind == "delivered":
                delivered[tenant] = delivered.get(tenant, 0) + n
            elif kind == "complained":
                complained[tenant] = complained.get(tenant, 0) + n
        for tenant in sorted(delivered):
            why = should_hold(delivered[tenant], complained.get(tenant, 0),
                              self.limit_of(tenant), self.min_deliveries)
            if why is None:
                continue
            released = await self.holds.released_at(tenant)
            if released is not None and now - released < GRACE_AFTER_RELEASE:
                continue
            if await self.holds.hold(tenant, why, now):
                log.warn("tenant {tenant}'s outgoing mail is held: {why}", tenant=tenant,
                         why=why)
