"""A sending domain and its DKIM keys (one per selector).

Private keys are held encrypted with the node secret (Fernet tokens); a key is
*verified* once its record was found published in DNS, and only verified keys sign.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen


class DomainExistsError(ValueError):
    """The domain (or one of the selectors) is already there."""


class DomainNotFoundError(LookupError):
    """No such sending domain."""


@frozen
class DKIMKey:
    """One DKIM key of a domain: selector, key type (``rsa``/``ed25519``), the
    public key as published (``p=``), the private key as a Fernet token, and when
    its DNS record was last found matching (None: not verified)."""

    selector: str
    key_type: str
    public_b64: str
    private_encrypted: str = field(repr=False)
    created_at: float
    verified_at: float | None = None

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    def to_dict(self) -> dict[str, Any]:
        """Public facts only (never the private key)."""
        return {
            "selector": self.selector,
            "key_type": self.key_type,
            "public_key": self.public_b64,
            "created_at": self.created_at,
            "verified": self.verified,
            "verified_at": self.verified_at,
        }


@frozen
class SendingDomain:
    """A sending domain: its tenant (None = any) and its keys."""

    domain: str
    tenant: str | None
    created_at: float
    keys: tuple[DKIMKey, ...]

    @property
    def verified(self) -> bool:
        """Every key is published and verified."""
        return bool(self.keys) and all(k.verified for k in self.keys)

    @property
    def usable(self) -> bool:
        """At least one key is verified: mail from the domain is signed (and allowed
        when verified domains are required)."""
        return any(k.verified for k in self.keys)

    @property
    def verified_at(self) -> float | None:
        """When the domain became verified (its keys' latest verification), or None."""
        return max(k.verified_at for k in self.keys if k.verified_at) if self.verified else None

    @property
    def state(self) -> str:
        """``verified``, ``unverified``, or ``partly verified`` (some keys pending)."""
        if self.verified:
            return "verified"
        return "partly verified" if self.usable else "unverified"

    def key(self, selector: str) -> DKIMKey | None:
        return next((k for k in self.keys if k.selector == selector), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "tenant": self.tenant,
            "created_at": self.created_at,
            "verified": self.verified,
            "state": self.state,
            "verified_at": self.verified_at,
            "keys": [k.to_dict() for k in self.keys],
        }
