"""A suppressed recipient of one tenant: mail to it is refused at RCPT, and why."""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

#: Where a suppression came from.
SOURCES = frozenset({"bounce", "expired", "complaint", "manual", "api"})


#: The longest address accepted (RFC 5321: a path is at most 256 octets with <>).
MAX_ADDRESS = 254


def normalize_address(address: str) -> str:
    """``address`` stripped and lowercased; ValueError unless it is
    ``local@domain`` with exactly one ``@`` and both parts present."""
    text = address.strip().lower()
    local, at, domain = text.partition("@")
    if (
        not at
        or not local
        or not domain
        or "@" in domain
        or len(text) > MAX_ADDRESS
        or any(c.isspace() or c in "<>" for c in text)
    ):
        raise ValueError(f"bad address {address!r}: expected one like user@example.com")
    return text


def _source(value: str) -> str:
    if value not in SOURCES:
        raise ValueError(f"unknown suppression source {value!r}")
    return value


@frozen
class Suppression:
    """One suppressed recipient of one tenant."""

    tenant: str
    address: str = field(converter=normalize_address)
    reason: str
    source: str = field(converter=_source)
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``created_at`` in POSIX seconds)."""
        return {
            "tenant": self.tenant,
            "address": self.address,
            "reason": self.reason,
            "source": self.source,
            "created_at": self.created_at,
        }
