"""A credential: the name a client authenticates with, its tenant and what it may do.

The same value serves SMTP AUTH and (with the same secret) the HTTP API.  Stores keep
it with a hash of its secret; nothing here hashes, stores or checks a secret.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from attrs import field, frozen

IPNetwork = IPv4Network | IPv6Network

#: Every scope a credential can hold: SMTP submission, HTTP send, read access to the
#: log/queue/stats, and administration (credentials, domains, webhooks).
SCOPES = frozenset({"smtp", "send", "read", "admin"})

DEFAULT_SCOPES = frozenset({"smtp", "send"})

NAME_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")

#: The prefix of a secret that also serves as an API key (see :func:`api_key_name`).
API_KEY_PREFIX = "sx1"


def api_key(name: str, random_part: str) -> str:
    """The secret of credential ``name``: ``sx1.<name, base64url>.<random>``.

    The name travels inside the secret so the HTTP API finds the credential from the
    key alone and checks it against the one stored hash; the random part is what
    makes it secret.  The whole string is also the SMTP AUTH password.
    """
    encoded = base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii").rstrip("=")
    return f"{API_KEY_PREFIX}.{encoded}.{random_part}"


def api_key_name(key: str) -> str | None:
    """The credential name inside an API key, or None when ``key`` is not one (secrets
    made before keys carried a name work for SMTP AUTH only; rotate to get a key)."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    try:
        name = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return name if NAME_PATTERN.fullmatch(name) else None


# unit -> (multiply, divide) to turn a count per unit into a count per minute.
_RATE_UNITS = {
    "s": (60, 1), "sec": (60, 1), "second": (60, 1),
    "m": (1, 1), "min": (1, 1), "minute": (1, 1),
    "h": (1, 60), "hr": (1, 60), "hour": (1, 60),
}  # fmt: skip


def parse_rate(text: str) -> int:
    """Messages per minute from ``"N/s"``, ``"N/min"`` or ``"N/h"`` (also ``"N"``, per minute).

    Per-hour rates that are not a whole number per minute are rounded up (``"90/h"`` is
    2/min): a credential is never limited below what was asked for.
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*([A-Za-z]+))?\s*", text)
    if m is None:
        raise ValueError(f"bad rate {text!r}: expected N/s, N/min or N/h")
    count = int(m.group(1))
    unit = (m.group(2) or "min").lower()
    if len(unit) > 2 and unit.endswith("s"):  # plurals ("mins", "hours"), but not "ms"
        unit = unit[:-1]
    if unit not in _RATE_UNITS:
        raise ValueError(f"bad rate unit in {text!r}: expected s, min or h")
    if count <= 0:
        raise ValueError(f"bad rate {text!r}: must be positive")
    mul, div = _RATE_UNITS[unit]
    return -(-count * mul // div)


def _domains(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({d.strip().lower().rstrip(".") for d in value if d.strip()}))


def _networks(value: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    # strict=False: "10.1.2.3/8" means 10.0.0.0/8; a bare address means just that host.
    nets = {ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v for v in value}
    return tuple(sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def _scopes(value: Iterable[str]) -> frozenset[str]:
    scopes = frozenset(s.strip().lower() for s in value if s.strip())
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(sorted(unknown))}")
    return scopes


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid credential name, else raise ValueError."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"bad credential name {name!r}: 1-128 characters of A-Z a-z 0-9 . _ @ + -")
    return name


@frozen
class Credential:
    """An SMTP credential / API key and what it may do.

    ``domains`` restricts the sender domains (exact, case-insensitive match: a listed
    ``example.com`` does not cover ``mail.example.com``; list each one); ``networks``
    restricts client addresses.  Empty means unrestricted.  ``rate_per_minute`` is a
    message rate limit (None: none).  A ``sandbox`` credential's mail goes to the
    simulator.
    """

    name: str
    tenant: str
    domains: tuple[str, ...] = field(default=(), converter=_domains)
    networks: tuple[IPNetwork, ...] = field(default=(), converter=_networks)
    scopes: frozenset[str] = field(default=DEFAULT_SCOPES, converter=_scopes)
    rate_per_minute: int | None = None
    sandbox: bool = False
    created_at: float = 0.0
    revoked_at: float | None = None
    secret_hash: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        """False once revoked."""
        return self.revoked_at is None

    def allows_ip(self, ip: str) -> bool:
        """True when a client at ``ip`` may use this credential."""
        if not self.networks:
            return True
        addr = _parse_ip(ip)
        return addr is not None and any(addr in net for net in self.networks)

    def allows_sender_domain(self, domain: str) -> bool:
        """True when mail from ``domain`` is allowed (exact match, no subdomains)."""
        if not self.domains:
            return True
        return domain.strip().lower().rstrip(".") in self.domains

    def has_scope(self, scope: str) -> bool:
        """True when the credential holds ``scope``."""
        return scope in self.scopes

    def to_dict(self, include_secret_hash: bool = False) -> dict[str, Any]:
        """A JSON-able dict; the secret hash only when asked for (for stores)."""
        d: dict[str, Any] = {
            "name": self.name,
            "tenant": self.tenant,
            "domains": list(self.domains),
            "networks": [str(n) for n in self.networks],
            "scopes": sorted(self.scopes),
            "rate_per_minute": self.rate_per_minute,
            "sandbox": self.sandbox,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "active": self.active,
        }
        if include_secret_hash:
            d["secret_hash"] = self.secret_hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Credential:
        """The inverse of :obj:`to_dict`."""
        return cls(
            name=d["name"],
            tenant=d["tenant"],
            domains=d.get("domains", ()),
            networks=d.get("networks", ()),
            scopes=d.get("scopes", DEFAULT_SCOPES),
            rate_per_minute=d.get("rate_per_minute"),
            sandbox=bool(d.get("sandbox", False)),
            created_at=float(d.get("created_at", 0.0)),
            revoked_at=d.get("revoked_at"),
            secret_hash=d.get("secret_hash", ""),
        )


def draft_credential(
    name: str,
    tenant: str,
    domains: Iterable[str],
    networks: Iterable[str | IPNetwork],
    scopes: Iterable[str],
    rate: int | str | None,
    sandbox: bool,
    created_at: float,
) -> Credential:
    """A new credential, validated but without a secret hash yet.

    Raises ValueError for a bad name, tenant, scope, network or rate, so a store
    checks everything before paying for a hash.
    """
    check_name(name)
    if not tenant:
        raise ValueError("a credential needs a tenant")
    if isinstance(rate, str):
        rate = parse_rate(rate)
    elif rate is not None and rate <= 0:
        raise ValueError(f"bad rate {rate!r}: must be positive")
    return Credential(
        name=name,
        tenant=tenant,
        domains=domains,
        networks=networks,
        scopes=scopes,
        rate_per_minute=rate,
        sandbox=sandbox,
        created_at=created_at,
    )
