"""Sending-domain operations, one implementation for the command line and the API:
add a domain (or new keys for it) and verify its published DKIM records.

Failures are :obj:`DomainOpError` with a sentence for a person; the callers turn it
into an exit status or an HTTP answer.
"""

from __future__ import annotations

import time

from twisted.internet.threads import deferToThread

from sendarix.cleanup.dkimkeys import ALGORITHMS, check_selector, generate_key, record_line
from sendarix.config.secret import NodeSecret, SecretError
from sendarix.control.domaincheck import (
    DNSLookupError,
    Finding,
    check_domain,
    make_resolver,
    verify_keys,
)
from sendarix.model.domain import DKIMKey, DomainExistsError, DomainNotFoundError, SendingDomain
from sendarix.stores.backends import Stores


class DomainOpError(Exception):
    """An operation on a sending domain that cannot be done; ``kind`` is ``conflict``,
    ``not_found`` or ``invalid``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def key_names(selector: str | None, algorithm: str, now: float) -> list[tuple[str, str]]:
    """(selector, key type) for each key to create.

    A selector the operator names is used exactly, for the RSA key (it is the name in
    their runbooks and DNS forms); its Ed25519 companion is ``<selector>-ed25519``.
    Without one, the names are ``sxYYYYMM-rsa`` and ``sxYYYYMM-ed25519`` (or plain
    ``sxYYYYMM`` for a single key).
    """
    if algorithm not in ALGORITHMS:
        raise DomainOpError("invalid", f"unknown algorithm {algorithm!r}")
    types = ALGORITHMS[algorithm]
    try:
        base = check_selector(selector or time.strftime("sx%Y%m", time.gmtime(now)))
        if len(types) == 1:
            return [(base, types[0])]
        if selector is not None:
            return [(base if t == "rsa" else check_selector(f"{base}-ed25519"), t)
                    for t in types]
        return [(check_selector(f"{base}-{t}"), t) for t in types]
    except ValueError as e:
        raise DomainOpError("invalid", str(e)) from None


def record_lines(sd: SendingDomain) -> list[str]:
    """The DNS records to publish for ``sd``'s keys."""
    return [record_line(k.selector, sd.domain, k.key_type, k.public_b64) for k in sd.keys]


async def add_domain(
    stores: Stores, secret: NodeSecret, domain: str, tenant: str | None,
    selector: str | None, algorithm: str, now: float,
) -> SendingDomain:
    """Add ``domain`` with new keys (or, with a new ``selector``, new keys to a domain
    already there: a rotation); the domain with only the new keys."""
    existing = await stores.domains.get(domain)
    if existing is not None:
        if selector is None:
            raise DomainOpError(
                "conflict", f"domain {domain} was already added; to rotate its keys, add new "
                "ones with a new selector"
            )
        if tenant is not None and tenant != existing.tenant:
            raise DomainOpError("conflict", f"domain {domain} belongs to tenant "
                                f"{existing.tenant or 'any'}; the tenant cannot change")
    # Every stored key must open with the one node secret the relay has.
    stored = [k for d in await stores.domains.list() for k in d.keys]
    if stored:
        try:
            secret.decrypt(stored[0].private_encrypted)
        except SecretError as e:
            raise DomainOpError("invalid", f"{e}; use the secret the relay uses") from None
    keys = []
    for name, key_type in key_names(selector, algorithm, now):
        if existing is not None and existing.key(name) is not None:
            raise DomainOpError("conflict", f"selector {name} of {domain} already exists")
        pair = await deferToThread(generate_key, key_type)  # RSA takes ~0.1 s
        keys.append(DKIMKey(name, key_type, pair.public_b64, secret.encrypt(pair.private_pem),
                            now))
    try:
        if existing is None:
            sd = await stores.domains.add(domain, tenant, keys, now)
        else:
            sd = await stores.domains.add_keys(domain, keys)
    except (DomainExistsError, DomainNotFoundError) as e:
        raise DomainOpError("conflict", str(e)) from None
    added = {k.selector for k in keys}
    return SendingDomain(sd.domain, sd.tenant, sd.created_at,
                         tuple(k for k in sd.keys if k.selector in added))


async def verify_domain(
    stores: Stores, domain: str, now: float
) -> tuple[SendingDomain, list[tuple[str, str | None]]]:
    """Look up each key's DKIM record and mark the keys that match as verified; the
    domain and, per key, (DNS name, None when it matches, else why not)."""
    sd = await stores.domains.get(domain)
    if sd is None:
        raise DomainOpError("not_found", f"no domain {domain}: add it first")
    if not sd.keys:
        raise DomainOpError("invalid", f"{domain} has no keys: add one with a new selector")
    resolver = make_resolver(stores.config)
    try:
        results = await deferToThread(verify_keys, resolver, sd)
    except DNSLookupError as e:
        raise DomainOpError("invalid", f"{domain} not verified: {e} (nothing changed)") from None
    for key, (_, reason) in zip(sd.keys, results, strict=True):
        await stores.domains.set_verified(domain, now if reason is None else None, key.selector)
    return sd, results


async def check_dns(stores: Stores, domain: str) -> list[Finding]:
    """What DNS says of ``domain``'s SPF (against the egress addresses), DKIM keys
    and DMARC."""
    sd = await stores.domains.get(domain)
    resolver = make_resolver(stores.config)
    egress = [s.address for s in stores.config.egress_sources]
    try:
        findings: list[Finding] = await deferToThread(check_domain, resolver, domain, sd,
                                                      egress)
    except DNSLookupError as e:
        raise DomainOpError("invalid", f"cannot check {domain}: {e}") from None
    return findings
