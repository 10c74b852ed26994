"""The simulator: what a destination would answer, decided by the recipient's local
part, for mail to the simulator domain (or routed ``via = "simulator"``) and all mail
of sandbox credentials.  Nothing leaves the node (docs/delivery.md, "The simulator").

Pure: :func:`simulate_delivery` turns one leased delivery into the attempts the
delivery agent records, the recipients it records as suppressed, and the accepted
recipients that then complain.
"""

from __future__ import annotations

from attrs import frozen

from sendarix.model.message import LeasedDelivery, RecipientRecord, Reply
from sendarix.scheduler.outcome import Attempt

#: The ``mx`` of events for simulated deliveries.
SIMULATOR_MX = "simulator"


def _kind(local_part: str) -> str:
    return local_part.lower().split("+", 1)[0]


def simulate(local_part: str, attempt: int) -> Reply | None:
    """The reply to a recipient's ``attempt``-th attempt (1-based), by local part;
    None means the recipient is suppressed."""
    kind = _kind(local_part)
    if kind == "suppressed":
        return None
    if kind == "bounce":
        return Reply(550, "5.1.1", "simulated bounce: no such user")
    if kind == "defer" and attempt <= 1:
        return Reply(421, "4.7.0", "simulated deferral: try again later")
    if kind == "greylist" and attempt <= 1:
        return Reply(450, "4.2.0", "simulated greylisting: greylisted, try again later")
    if kind == "timeout":
        return Reply(451, "4.4.2", "simulated timeout waiting for the server")
    return Reply(250, "2.0.0", "simulated delivery: OK")


@frozen
class SimulatedSession:
    """What the simulator did for one delivery."""

    attempts: tuple[Attempt, ...]
    suppressed: tuple[RecipientRecord, ...]
    #: Accepted recipients whose local part asks for a complaint afterwards.
    complaints: tuple[Attempt, ...]


def simulate_delivery(delivery: LeasedDelivery) -> SimulatedSession:
    """Answer every recipient of ``delivery`` as the simulator does."""
    attempts: list[Attempt] = []
    suppressed: list[RecipientRecord] = []
    for record in delivery.recipients:
        reply = simulate(record.address.rsplit("@", 1)[0], record.attempts + 1)
        if reply is None:
            suppressed.append(record)
        else:
            attempts.append(Attempt(record, reply, mx=SIMULATOR_MX))
    complaints = tuple(
        a for a in attempts
        if _kind(a.record.address.rsplit("@", 1)[0]) == "complaint" and a.reply.code // 100 == 2
    )
    return SimulatedSession(tuple(attempts), tuple(suppressed), complaints)
