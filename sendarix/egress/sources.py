"""Choosing the source address (egress IP) a delivery leaves from (pure: time and
date are passed in).

:class:`TieredSelector` implements :class:`~sendarix.interfaces.IEgressSelector` over
the configured ``[[egress.source]]`` entries:

- only sources of the requested pool; the best (lowest) tier that has a source able
  to send wins, a worse tier is used only when every source of the better ones is
  out of warmup budget;
- a warming source sends at most its warmup cap per provider per day
  (:meth:`sendarix.config.settings.WarmupConfig.cap`), whatever happens to other sources, so
  failover never pushes a cold IP past its schedule;
- after a block or rate-limit reply, :meth:`TieredSelector.penalize` marks the source
  for that provider; the mark decays exponentially (``half_life``), and while it is
  above ``threshold`` the other sources of the same tier are preferred.  A tier whose
  sources are all marked keeps its least-marked source rather than spilling to a
  worse tier.

Warmup counts come from :meth:`TieredSelector.record_send`, called once per message
actually sent; callers that choose for several messages at once must record each.
:meth:`TieredSelector.snapshot` and :meth:`TieredSelector.restore` carry today's counts
and the marks across a restart (through the routing state file).
"""

from __future__ import annotations

import datetime
import random
from itertools import groupby

from attrs import define, field, frozen
from zope.interface import implementer

from sendarix.config.settings import EgressSourceConfig
from sendarix.interfaces import IEgressSelector

Source = EgressSourceConfig


def source_name(source: Source | str) -> str:
    """The name of ``source`` (given as a source or by name)."""
    return source if isinstance(source, str) else source.name


@frozen
class Mark:
    """A deprioritization mark: ``value`` as it stood at ``since``, halving every
    ``half_life`` seconds after that."""

    value: float
    since: float

    def at(self, now: float, half_life: float) -> float:
        """The mark's value at ``now`` (as it was at ``since`` for earlier times)."""
        return float(self.value * 0.5 ** (max(0.0, now - self.since) / half_life))


@implementer(IEgressSelector)
@define
class TieredSelector:
    """Tiered, warmup-capped, penalty-aware choice among egress sources."""

    sources: tuple[Source, ...]
    half_life: float = 3600.0
    threshold: float = 0.1
    rng: random.Random = field(factory=random.Random)
    #: This process's part of each warmup cap (1/N for one of N worker processes
    #: that count on their own), so that together they stay within it.
    share: float = 1.0
    # (source, provider) -> its mark, as of when it was last updated
    _penalties: dict[tuple[str, str], Mark] = field(factory=dict, init=False)
    # date -> (source, provider) -> messages sent that day
    _sent: dict[datetime.date, dict[tuple[str, str], int]] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.half_life <= 0:
            raise ValueError("half_life must be positive")
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError("egress source names must be unique")

    def choose(
        self, pool: str, provider: str, now: float, today: datetime.date
    ) -> Source | None:
        """The source of ``pool`` to send to ``provider`` from, or None when every
        source is out of its warmup budget for today."""
        usable = [
            s for s in self.sources if s.pool == pool and self._has_budget(s, provider, today)
        ]
        usable.sort(key=lambda s: s.tier)
        for _tier, group in groupby(usable, key=lambda s: s.tier):
            scored = [(self.penalty(s, provider, now), s) for s in group]
            clean = [(p, s) for p, s in scored if p <= self.threshold]
            if clean:
                # Traffic shared evenly among unmarked sources, a little less to those
                # with a fading mark.
                weights = [1.0 / (1.0 + p) for p, _ in clean]
                return self.rng.choices([s for _, s in clean], weights=weights)[0]
            return min(scored, key=lambda ps: (ps[0], ps[1].name))[1]
        return None

    def record_send(self, source: Source | str, provider: str, today: datetime.date) -> None:
        """Count one message from ``source`` to ``provider`` on ``today``."""
        for day in [d for d in self._sent if d < today - datetime.timedelta(days=1)]:
            del self._sent[day]
        counts = self._sent.setdefault(today, {})
        key = (source_name(source), provider)
        counts[key] = counts.get(key, 0) + 1

    def sent(self, source: Source | str, provider: str, today: datetime.date) -> int:
        """Messages recorded from ``source`` to ``provider`` on ``today``."""
        return self._sent.get(today, {}).get((source_name(source), provider), 0)

    def remaining(self, source: Source, provider: str, today: datetime.date) -> int | None:
        """Messages ``source`` may still send to ``provider`` today; None when warm."""
        cap = source.warmup.cap(today) if source.warmup is not None else None
        if cap is None:
            return None
        if self.share < 1.0:
            cap = int(cap * self.share)
        return max(0, cap - self.sent(source, provider, today))

    def penalize(self, source: Source | str, provider: str, now: float) -> None:
        """``provider`` rate-limited or blocked ``source``: add one to its mark."""
        key = (source_name(source), provider)
        self._penalties[key] = Mark(self._decayed(key, now) + 1.0, now)

    def penalty(self, source: Source | str, provider: str, now: float) -> float:
        """The current (decayed) mark of ``source`` for ``provider``; 0 when none."""
        key = (source_name(source), provider)
        value = self._decayed(key, now)
        if key in self._penalties and value < self.threshold / 1000:
            del self._penalties[key]  # faded out: forget it
        return value

    def mark(self, source: Source | str, provider: str) -> Mark | None:
        """The mark of ``source`` for ``provider`` as last updated (None: none), for
        :meth:`merge_mark` elsewhere."""
        return self._penalties.get((source_name(source), provider))

    def _decayed(self, key: tuple[str, str], now: float) -> float:
        mark = self._penalties.get(key)
        return 0.0 if mark is None else mark.at(now, self.half_life)

    def snapshot(self, now: float, today: datetime.date) -> list[dict[str, object]]:
        """Each source's warmup cap, sends today and current marks (for the routing
        state file)."""
        out: list[dict[str, object]] = []
        for source in self.sources:
            sent = {
                provider: n
                for (name, provider), n in self._sent.get(today, {}).items()
                if name == source.name
            }
            penalties = {
                provider: round(self.penalty(source, provider, now), 4)
                for (name, provider) in list(self._penalties)
                if name == source.name
            }
            out.append({
                "name": source.name,
                "address": source.address,
                "tier": source.tier,
                "pool": source.pool,
                "warmup_cap": source.warmup.cap(today) if source.warmup is not None else None,
                "sent_today": sent,
                "penalties": {k: v for k, v in penalties.items() if v > 0},
            })
        return out

    def restore(
        self, entries: list[dict[str, object]], written_at: float, today: datetime.date
    ) -> int:
        """Take back today's sends and the marks from a :meth:`snapshot` written at
        ``written_at`` (a node restarting): counts of another day are ignored, marks
        go on decaying from ``written_at``.  Sources no longer configured are skipped;
        a count or mark already higher here is kept.  Returns the entries taken."""
        known = {source.name for source in self.sources}
        same_day = datetime.datetime.fromtimestamp(written_at, datetime.UTC).date() == today
        taken = 0
        for entry in entries:
            name = entry.get("name")
            if name not in known or not isinstance(name, str):
                continue
            sent = entry.get("sent_today")
            if same_day and isinstance(sent, dict):
                counts = self._sent.setdefault(today, {})
                for provider, n in sent.items():
                    if isinstance(n, int) and n > counts.get((name, provider), 0):
                        counts[(name, provider)] = n
                        taken += 1
            penalties = entry.get("penalties")
            if isinstance(penalties, dict):
                for provider, value in penalties.items():
                    if not isinstance(value, (int, float)) or value <= 0:
                        continue
                    key = (name, provider)
                    if float(value) > self._decayed(key, written_at):
                        self._penalties[key] = Mark(float(value), written_at)
                        taken += 1
        return taken

    def merge_sent(self, name: str, provider: str, today: datetime.date, count: int) -> None:
        """Take a count of today's sends made elsewhere (another node): the larger of
        the two counts stays."""
        counts = self._sent.setdefault(today, {})
        counts[(name, provider)] = max(counts.get((name, provider), 0), count)

    def merge_mark(self, name: str, provider: str, mark: Mark, now: float) -> None:
        """Take a deprioritization mark set elsewhere: it replaces ours when it is the
        higher one now."""
        if mark.at(now, self.half_life) > self._decayed((name, provider), now):
            self._penalties[(name, provider)] = mark

    def _has_budget(self, source: Source, provider: str, today: datetime.date) -> bool:
        left = self.remaining(source, provider, today)
        return left is None or left > 0
