"""The soak's accounts: what was accepted, what the destinations received, and the
verdict for every accepted (message, recipient).  Pure: the harness reads the facts
(submissions, the destinations' records, the relay's bounce events, the spool) and
hands them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from attrs import define, field, frozen


@frozen
class Submission:
    """A message the relay answered 250 or 202: its queue id, the submitter's token
    and its recipients."""

    queue_id: str
    token: str
    recipients: tuple[str, ...]
    via: str  # "smtp" or "api"


@frozen
class Receipt:
    """One copy a destination answered 250 to, for one recipient."""

    queue_id: str | None
    token: str | None
    recipient: str
    node: str  # from the client's EHLO name
    at: float


@frozen
class Kill:
    """A node SIGKILLed at ``at``."""

    node: str
    at: float


@define
class Verdict:
    """The counts the soak prints, and the cases behind the failing ones."""

    accepted_messages: int = 0
    accepted_recipients: int = 0
    delivered: int = 0
    bounced: int = 0
    duplicated_explained: int = 0
    duplicated_unexplained: list[str] = field(factory=list)
    wrong: list[str] = field(factory=list)
    still_queued: list[str] = field(factory=list)
    lost: list[str] = field(factory=list)
    unheard: int = 0  # received, but the submitter never heard a 250/202 for it

    @property
    def failed(self) -> bool:
        return bool(self.duplicated_unexplained or self.wrong or self.still_queued or self.lost)

    def lines(self) -> list[str]:
        rows = [
            ("accepted messages (250/202)", self.accepted_messages),
            ("accepted (message, recipient)", self.accepted_recipients),
            ("delivered exactly once", self.delivered),
            ("bounced as the destination said", self.bounced),
            ("duplicated, explained (in flight on a SIGKILLed node)", self.duplicated_explained),
            ("duplicated, unexplained", len(self.duplicated_unexplained)),
            ("wrong outcome", len(self.wrong)),
            ("still queued after the drain", len(self.still_queued)),
            ("lost", len(self.lost)),
            ("received without a 250/202 heard (not counted)", self.unheard),
        ]
        width = max(len(k) for k, _ in rows)
        return [f"{k.ljust(width)}  {v}" for k, v in rows]


def explained(copies: Sequence[Receipt], kills: Iterable[Kill], in_flight: float) -> bool:
    """A repeated delivery is explained only by at-least-once delivery: an earlier copy
    went out from a node that was SIGKILLed within ``in_flight`` seconds after it (before
    it could record the outcome), and a later copy came after the kill."""
    for kill in kills:
        before = [
            c for c in copies if c.node == kill.node and kill.at - in_flight <= c.at <= kill.at
        ]
        after = [c for c in copies if c.at > kill.at]
        if before and after:
            return True
    return False


def judge(
    submissions: Mapping[str, Submission],
    receipts: Iterable[Receipt],
    bounced: set[tuple[str, str]],
    expected: Callable[[str], str],
    kills: Sequence[Kill],
    in_flight: float,
    queued: set[tuple[str, str]],
) -> Verdict:
    """The verdict for every accepted (message, recipient).

    ``bounced``: (queue id, recipient) pairs with a ``bounced`` event; ``expected(rcpt)``
    is "delivered" or "bounced" (what the destination does); ``queued``: pairs still
    active in the spool.
    """
    by_token = {s.token: s.queue_id for s in submissions.values()}
    copies: dict[tuple[str, str], list[Receipt]] = {}
    v = Verdict()
    for r in receipts:
        qid = r.queue_id
        if r.token in by_token:
            qid = by_token[r.token]
            if r.queue_id is not None and r.queue_id != qid:
                v.wrong.append(f"{r.token}: received as {r.queue_id}, accepted as {qid}")
        if qid is None or qid not in submissions:
            v.unheard += 1
            continue
        copies.setdefault((qid, r.recipient.lower()), []).append(r)
    v.accepted_messages = len(submissions)
    for s in submissions.values():
        for rcpt in s.recipients:
            key = (s.queue_id, rcpt.lower())
            v.accepted_recipients += 1
            got = sorted(copies.get(key, []), key=lambda c: c.at)
            name = f"{s.queue_id} {rcpt}"
            if expected(rcpt) == "bounced":
                if got:
                    v.wrong.append(f"{name}: delivered though the destination refuses it")
                elif key in bounced:
                    v.bounced += 1
                elif key in queued:
                    v.still_queued.append(name)
                else:
                    v.lost.append(name)
                continue
            if key in bounced:
                v.wrong.append(f"{name}: bounced though the destination accepts it")
            if len(got) == 1:
                v.delivered += 1
            elif len(got) > 1:
                if explained(got, kills, in_flight):
                    v.duplicated_explained += 1
                else:
                    v.duplicated_unexplained.append(
                        f"{name}: {len(got)} copies from "
                        + ", ".join(f"{c.node}@{c.at:.1f}" for c in got)
                    )
            elif key in queued:
                v.still_queued.append(name)
            elif key not in bounced:
                v.lost.append(name)
    return v
