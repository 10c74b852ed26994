"""Per-site ready queues of leased deliveries (pure bookkeeping: no I/O, time passed in).

The delivery agent keeps the deliveries it has leased and routed in memory, one bounded
queue per *site* (shaping key), and sends from each queue as fast as the site's
throttle admits (the shape of Postfix's active queue and KumoMTA's ready queues).  The
lease poll asks the spool only for mail of sites with room, so a slow site's backlog
stays in the spool, untouched, instead of being leased and handed back again and
again, while every other site keeps moving.

**Fair split.**  The node holds at most ``window`` deliveries at once (queued plus in
flight).  A ``reserve`` (a tenth of the window by default) is kept for sites that hold
nothing yet; the rest is shared evenly among the sites holding mail: each may hold
``(window - reserve) // active`` (at least one).  So one site alone can use nine tenths
of the window, two busy sites half of that each, and mail to a new destination is
always leased at once.  A site above its share (others became active) takes no more
until it has drained below it.

**The lease poll.**  A site is left out of the poll (:meth:`ReadyQueues.skip_domains`)
until it has room for a quarter of its share, and a poll never takes more than any site
left in has room for (:meth:`ReadyQueues.poll_limit`): a slow site is topped up in
chunks, and the polls between serve everyone else.

**First contact.**  The poll cannot know the site of mail it has never routed; mail
of a site met for the first time is taken even beyond its share (within the window),
and the site is then left out of the polls until it has drained below its share.

**Parking.**  A spool that cannot skip domains may still hand over mail of a full site;
:meth:`ReadyQueues.park_until` gives each such delivery a time to keep its lease until
(spread at the site's pace behind what the site already holds), so it comes back once,
when the site can take it, rather than at every poll.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from attrs import define, field

__all__ = ["ReadyQueues"]

T = TypeVar("T")

#: The shortest and longest time a parked delivery keeps its lease.
MIN_PARK = 1.0
MAX_PARK = 900.0


@define
class ReadyQueues(Generic[T]):
    """Bounded per-site queues of ``(lane, item)`` entries and the fair split of the
    window among sites.  A *lane* is what a batch shares (one connection carries items
    of one lane only); items taken for sending stay counted (*busy*) until
    :meth:`done` or :meth:`put_back`."""

    window: int
    reserve: int | None = None
    #: Most domains remembered (for the lease poll's skip list).
    max_domains: int = 10_000
    #: Room promised per site to fresh mail whose commit is under way (the
    #: scheduler's reservations): the lease poll leaves it to that mail.
    promised: Mapping[str, int] = field(factory=dict)
    _queues: dict[str, deque[tuple[Hashable, T]]] = field(factory=dict, init=False)
    _busy: dict[str, int] = field(factory=dict, init=False)
    _domains: dict[str, str] = field(factory=dict, init=False)
    _park_next: dict[str, float] = field(factory=dict, init=False)
    _seen: dict[str, int] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")
        if self.reserve is None:
            self.reserve = max(1, self.window // 10) if self.window > 1 else 0
        if not 0 <= self.reserve < self.window:
            raise ValueError("reserve must be below the window")

    # -- counts -------------------------------------------------------------------

    def queued(self, site: str) -> int:
        """Entries of ``site`` waiting to be sent."""
        q = self._queues.get(site)
        return len(q) if q else 0

    def held(self, site: str) -> int:
        """Entries of ``site`` queued or being sent."""
        return self.queued(site) + self._busy.get(site, 0)

    def total(self) -> int:
        """Entries held over all sites."""
        return sum(len(q) for q in self._queues.values()) + sum(self._busy.values())

    def sites(self) -> list[str]:
        """Sites holding anything, sorted."""
        return sorted(self._holding())

    def _holding(self) -> Iterator[str]:
        return (s for s in set(self._queues) | set(self._busy) if self.held(s))

    def share(self, site: str) -> int:
        """How many entries ``site`` may hold now (the fair split)."""
        # Counted without sorting them as sites() does: this runs per offer.
        active = sum(1 for _ in self._holding())
        if self.held(site) == 0:
            active += 1
        assert self.reserve is not None
        return max(1, (self.window - self.reserve) // max(1, active))

    def room(self, site: str) -> int:
        """How many more entries ``site`` may take now."""
        return max(0, min(self.share(site) - self.held(site), self.window - self.total()))

    def open_room(self, site: str) -> int:
        """``site``'s room not promised to fresh mail (:attr:`promised`): what a lease
        poll may fill.  A poll that took the promised room too would leave that mail,
        once committed, no room but parking (a second or more before it is sent)."""
        return self.room(site) - self.promised.get(site, 0)

    # -- entries ------------------------------------------------------------------

    def offer(self, site: str, lane: Hashable, item: T, force: bool = False) -> bool:
        """Queue ``item`` for ``site`` when it has room (with ``force``: whenever the
        window has); False (nothing queued) when not."""
        if self.room(site) <= 0 and not (force and self.total() < self.window):
            return False
        self._queues.setdefault(site, deque()).append((lane, item))
        return True

    def take(self, site: str, limit: int) -> list[T]:
        """Up to ``limit`` queued items of ``site`` sharing the lane of the first one,
        in queue order; they count as busy until :meth:`done` or :meth:`put_back`."""
        q = self._queues.get(site)
        if not q or limit < 1:
            return []
        lane = q[0][0]
        taken: list[T] = []
        kept: deque[tuple[Hashable, T]] = deque()
        while q and len(taken) < limit:
            entry = q.popleft()
            if entry[0] == lane:
                taken.append(entry[1])
            else:
                kept.append(entry)
        kept.extend(q)
        self._set_queue(site, kept)
        self._busy[site] = self._busy.get(site, 0) + len(taken)
        return taken

    def put_back(self, site: str, lane: Hashable, items: list[T]) -> None:
        """Busy ``items`` were not sent after all: queue them again, first in line."""
        if not items:
            return
        self._unbusy(site, len(items))
        q = self._queues.setdefault(site, deque())
        q.extendleft((lane, item) for item in reversed(items))

    def done(self, site: str, count: int = 1) -> None:
        """``count`` busy items of ``site`` are settled."""
        self._unbusy(site, count)

    def drain(self, site: str) -> list[T]:
        """Remove and return every queued (not busy) item of ``site``."""
        q = self._queues.pop(site, None)
        return [item for _, item in q] if q else []

    def drain_all(self) -> list[T]:
        """Remove and return every queued item of every site."""
        return [item for site in list(self._queues) for item in self.drain(site)]

    def items(self) -> Iterator[T]:
        """Every queued item (busy ones are the sender's to track)."""
        for q in self._queues.values():
            for _, item in q:
                yield item

    def _set_queue(self, site: str, q: deque[tuple[Hashable, T]]) -> None:
        if q:
            self._queues[site] = q
        else:
            self._queues.pop(site, None)

    def _unbusy(self, site: str, count: int) -> None:
        left = self._busy.get(site, 0) - count
        if left < 0:
            raise ValueError(f"{site}: more items settled than were taken")
        if left:
            self._busy[site] = left
        else:
            self._busy.pop(site, None)

    # -- the lease poll -----------------------------------------------------------

    def note_domain(self, domain: str, site: str, poll: int = 0) -> None:
        """``domain``'s mail goes to ``site`` (remembered for :meth:`skip_domains`), as
        learnt from mail of lease poll number ``poll``."""
        domain = domain.lower()
        self._domains.pop(domain, None)
        self._domains[domain] = site
        while len(self._domains) > self.max_domains:
            self._domains.pop(next(iter(self._domains)))
        first = self._seen.pop(site, poll)
        self._seen[site] = first
        while len(self._seen) > self.max_domains:
            self._seen.pop(next(iter(self._seen)))

    def site_of(self, domain: str) -> str | None:
        """The site ``domain``'s mail was last routed to, if it is remembered."""
        return self._domains.get(domain.lower())

    def knew(self, site: str, poll: int) -> bool:
        """True when ``site`` was known before lease poll number ``poll`` (which then
        accounted for it); mail of a site first met in a poll may have come in larger
        than the site's share."""
        first = self._seen.get(site)
        return first is not None and first < poll

    def hungry(self, site: str) -> bool:
        """True when ``site`` may take a useful amount more: a quarter of its share
        (so a slow site is topped up in chunks, between which the lease polls serve
        the other sites)."""
        return self.open_room(site) >= max(1, self.share(site) // 4)

    def full_sites(self) -> set[str]:
        """Sites holding mail that the lease poll should leave out now."""
        return {site for site in self.sites() if not self.hungry(site)}

    def poll_limit(self, free: int) -> int:
        """How many deliveries the next lease poll may take, at most ``free``: no more
        than any site left in the poll has room for, so mail of one site is never
        leased beyond its share (the spool hands out mail oldest first, whatever the
        site).  The delivery agent polls again at once after a full poll."""
        limit = free
        active = self.sites()
        for site in active:
            if self.hungry(site):
                limit = min(limit, self.open_room(site))
        # A site seen before that holds nothing now may come back with a backlog.
        busy = set(active)
        if any(site not in busy for site in self._domains.values()):
            assert self.reserve is not None
            limit = min(limit, max(1, (self.window - self.reserve) // (len(active) + 1)))
        return max(0, limit)

    def skip_domains(self, limit: int = 500, resting: Iterable[str] = ()) -> list[str]:
        """Domains of the sites the poll should leave out (:meth:`full_sites`, and the
        ``resting`` sites; the most recently seen ``limit``), for a spool that can leave
        them in place."""
        full = self.full_sites() | set(resting)
        if not full:
            return []
        out: list[str] = []
        for domain in reversed(self._domains):
            if self._domains[domain] in full:
                out.append(domain)
                if len(out) >= limit:
                    break
        return out

    def park_until(self, site: str, now: float, interval: float) -> float:
        """When a delivery of full ``site`` should come due again: behind what the site
        holds and the deliveries parked before it, one ``interval`` (the site's time
        per message) apart, between ``MIN_PARK`` and ``MAX_PARK`` seconds from now."""
        interval = max(interval, 0.0)
        start = now + self.held(site) * interval
        at = max(self._park_next.get(site, start), start, now + MIN_PARK)
        at = min(at, now + MAX_PARK)
        self._park_next[site] = at + interval
        return at
