"""Slows down, then locks out, client addresses that keep failing SMTP AUTH.

Pure in-memory bookkeeping with time passed in as ``now``: no reactor, no I/O.  The
ingress server asks ``is_locked`` before accepting AUTH (``421 4.7.0`` when locked),
waits ``delay_for`` seconds before answering a failure (``535 5.7.8``), and reports
each outcome with ``failed``/``succeeded``.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Iterable

from attrs import define, field, frozen
from zope.interface import implementer

from sendarix.interfaces import IAuthLimiter


def client_key(ip: str) -> str:
    """The address that failures are counted against.

    IPv4-mapped IPv6 addresses count as their IPv4 address; other IPv6 addresses count
    per /64, since one host usually holds a whole /64 and could otherwise rotate
    addresses to dodge the limit.  Unparseable strings count as themselves.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _in_order(times: Iterable[float]) -> tuple[float, ...]:
    return tuple(sorted(times))


@frozen
class ClientRecord:
    """What one process knows of a client address, to hand to another: its failure
    times within the window (oldest first) and when its lockout ends (0.0: none)."""

    failures: tuple[float, ...] = field(default=(), converter=_in_order)
    locked_until: float = 0.0


@define
class _State:
    """Recent failure times of one client, and when its lockout ends."""

    failures: deque[float] = field(factory=deque)
    locked_until: float = 0.0
    last_seen: float = 0.0


@implementer(IAuthLimiter)
@define
class AuthLimiter:
    """Counts AUTH failures per client address within a sliding ``window``.

    Each failure within the window doubles the delay before the next failure is
    answered (``base_delay``, capped at ``max_delay``); ``max_failures`` failures within
    ``window`` seconds lock the address out for ``lockout`` seconds.  A success forgets
    the failures (but does not lift a lockout in force: a locked client should not have
    been allowed to try).  At most ``max_tracked`` addresses are remembered; beyond
    that the least recently seen is forgotten, so memory stays bounded under a spray of
    addresses.
    """

    max_failures: int = 5
    window: float = 300.0
    lockout: float = 900.0
    base_delay: float = 1.0
    max_delay: float = 8.0
    max_tracked: int = 100_000
    # Ordered by last activity, oldest first: pruning and eviction pop from the front.
    _clients: OrderedDict[str, _State] = field(factory=OrderedDict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_failures < 1 or self.window <= 0 or self.lockout < 0 or self.max_tracked < 1:
            raise ValueError("max_failures, window, max_tracked must be positive")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")

    def __len__(self) -> int:
        """How many client addresses are tracked."""
        return len(self._clients)

    def _lookup(self, ip: str, now: float) -> _State | None:
        state = self._clients.get(client_key(ip))
        if state is not None:
            self._expire(state, now)
        return state

    def _expire(self, state: _State, now: float) -> None:
        horizon = now - self.window
        while state.failures and state.failures[0] <= horizon:
            state.failures.popleft()

    def _stale(self, state: _State, now: float) -> bool:
        return state.locked_until <= now and (
            not state.failures or state.failures[-1] <= now - self.window
        )

    def _prune(self, now: float) -> None:
        # Entries are ordered by last_seen, and a state only ever holds failures up to
        # its last_seen, so stale entries sit at the front.
        while self._clients:
            key, state = next(iter(self._clients.items()))
            if not self._stale(state, now):
                break
            del self._clients[key]

    def is_locked(self, ip: str, now: float) -> bool:
        """True while ``ip`` is locked out."""
        state = self._clients.get(client_key(ip))
        return state is not None and state.locked_until > now

    def failures(self, ip: str, now: float) -> int:
        """How many failures of ``ip`` count at ``now``."""
        state = self._lookup(ip, now)
        return len(state.failures) if state is not None else 0

    def delay_for(self, ip: str, now: float) -> float:
        """Seconds to wait before answering ``ip``'s failed AUTH: 0 with no recent
        failures, then ``base_delay`` doubling per failure, at most ``max_delay``
        (which is also the answer while locked)."""
        if self.is_locked(ip, now):
            return self.max_delay
        count = self.failures(ip, now)
        if count == 0:
            return 0.0
        # Cap the exponent: 2**n for a large n overflows a float.
        return min(self.max_delay, self.base_delay * 2.0 ** min(count - 1, 64))

    def failed(self, ip: str, now: float) -> None:
        """Record a failure of ``ip`` at ``now``; lock it once it reaches
        ``max_failures`` within the window."""
        self._prune(now)
        key = client_key(ip)
        state = self._clients.get(key)
        if state is None:
            while len(self._clients) >= self.max_tracked:
                self._clients.popitem(last=False)
            state = self._clients[key] = _State()
        else:
            self._clients.move_to_end(key)
        state.last_seen = max(state.last_seen, now)
        if state.locked_until > now:
            # Already locked: the caller should not have let it try; don't extend.
            return
        self._expire(state, now)
        state.failures.append(now)
        if len(state.failures) >= self.max_failures:
            state.locked_until = now + self.lockout
            # Start afresh when the lockout ends.
            state.failures.clear()

    def record(self, ip: str, now: float) -> ClientRecord:
        """What is counted for ``ip`` at ``now`` (an empty record when nothing is),
        for :meth:`merge` elsewhere."""
        state = self._lookup(ip, now)
        if state is None:
            return ClientRecord()
        return ClientRecord(state.failures, state.locked_until)

    def merge(self, ip: str, record: ClientRecord, now: float) -> None:
        """Take what was counted for ``ip`` elsewhere (another process): its failure
        times within the window and its lockout end.  The longer failure list and the
        later lockout win, so merging never forgets a failure counted here."""
        failures = record.failures
        if not failures and record.locked_until <= now:
            return
        key = client_key(ip)
        state = self._lookup(ip, now)
        if state is None:
            self._prune(now)
            while len(self._clients) >= self.max_tracked:
                self._clients.popitem(last=False)
            state = self._clients[key] = _State()
        else:
            self._clients.move_to_end(key)
        state.last_seen = max(state.last_seen, now, *failures)
        if len(failures) > len(state.failures):
            state.failures.clear()
            state.failures.extend(failures)
        state.locked_until = max(state.locked_until, record.locked_until)

    def succeeded(self, ip: str, now: float) -> None:
        """Record a success of ``ip``: its failures are forgotten."""
        key = client_key(ip)
        state = self._clients.get(key)
        if state is None:
            return
        if state.locked_until > now:
            state.failures.clear()
        else:
            del self._clients[key]
