"""The simulator's rule: what a recipient's local part asks it to do.

The local part before any ``+tag``, lower-cased, names the outcome: ``bounce``,
``defer``, ``greylist``, ``timeout``, ``complaint`` or ``suppressed``; any other local
part is delivered.  The listeners refuse a ``suppressed`` recipient at RCPT, as they
refuse an address on a suppression list, and the simulator transport answers the
others: both read the local part through this one rule.
"""

from __future__ import annotations

__all__ = ["COMPLAINT", "SUPPRESSED", "local_part", "simulated_kind"]

#: The local part of an address the simulator keeps on every suppression list.
SUPPRESSED = "suppressed"
#: The local part of an address that accepts mail and then complains about it.
COMPLAINT = "complaint"


def local_part(address: str) -> str:
    """The local part of ``address`` (all of it when it has no ``@``)."""
    return address.rsplit("@", 1)[0]


def simulated_kind(local: str) -> str:
    """The outcome a local part names: its lower-cased part before any ``+tag``."""
    return local.lower().split("+", 1)[0]
