"""What DNS says about a sending domain: DKIM key records (``domains verify``) and
SPF, DKIM and DMARC together (``domains check``).

Lookups use dnspython's blocking resolver, honouring ``[dns] nameservers``; callers
run these functions in a thread (``deferToThread``), never on the reactor thread.
Every finding is a :obj:`Finding` whose ``advice`` says what to publish or change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.resolver
from attrs import frozen

from sendarix.cleanup.dkimkeys import check_record, dns_name, parse_tags, record_line
from sendarix.config.settings import Config
from sendarix.model.domain import SendingDomain
from sendarix.routing.mx import dnspython_resolver

__all__ = ["DNSLookupError", "Finding", "check_domain", "make_resolver", "txt_records",
           "verify_keys"]


class DNSLookupError(Exception):
    """The DNS did not answer (timeout, SERVFAIL): nothing can be concluded."""


def make_resolver(config: Config) -> dns.resolver.Resolver:
    """A dnspython resolver for ``[dns]``: its nameservers (with ports), or the
    system's when none are configured."""
    return dnspython_resolver(config.dns.addresses(), config.dns.timeout)


def txt_records(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """The TXT records at ``name``, each as the joined text of its strings; [] when
    the name or the type does not exist.  Blocking."""
    try:
        answer = resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
        raise DNSLookupError(f"no answer for {name} TXT: {e}") from None
    out = []
    for rdata in answer:
        out.append(b"".join(rdata.strings).decode("utf-8", "replace"))
    return out


@frozen
class Finding:
    """One check: ``kind`` (SPF, DKIM, DMARC), ``status`` (ok, missing, wrong,
    warning), what was ``found`` and the ``advice`` to act on (empty when ok)."""

    kind: str
    status: str
    name: str
    found: str
    advice: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "status": self.status, "name": self.name,
                "found": self.found, "advice": self.advice}


def verify_keys(
    resolver: dns.resolver.Resolver, sd: SendingDomain
) -> list[tuple[str, str | None]]:
    """For each key of ``sd``: (its DNS name, None when the published record matches
    it, else why not).  Blocking; DNSLookupError when the DNS does not answer."""
    results = []
    for key in sd.keys:
        name = dns_name(key.selector, sd.domain)
        results.append((name, check_record(txt_records(resolver, name), key.key_type,
                                           key.public_b64)))
    return results


def _dkim_findings(resolver: dns.resolver.Resolver, domain: str,
                   sd: SendingDomain | None) -> list[Finding]:
    if sd is None or not sd.keys:
        return [Finding("DKIM", "missing", f"*._domainkey.{domain}", "no key in Sendarix",
                        f"run: sendarix domains add {domain}, publish the records it "
                        f"prints, then: sendarix domains verify {domain}")]
    out = []
    for name, reason in verify_keys(resolver, sd):
        key = next(k for k in sd.keys if dns_name(k.selector, domain) == name)
        line = record_line(key.selector, domain, key.key_type, key.public_b64)
        if reason is None:
            state = "verified" if key.verified else "published, not verified yet"
            advice = "" if key.verified else f"run: sendarix domains verify {domain}"
            out.append(Finding("DKIM", "ok" if key.verified else "warning", name,
                               f"{key.key_type} key {state}", advice))
        else:
            status = "missing" if reason.startswith("no TXT") else "wrong"
            out.append(Finding("DKIM", status, name, reason, f"publish {line[len('record: '):]}"))
    return out


def _spf_findings(resolver: dns.resolver.Resolver, domain: str,
                  egress: Sequence[str]) -> list[Finding]:
    spf = [t for t in txt_records(resolver, domain) if t.lower().startswith("v=spf1")]
    mechanisms = " ".join(f"ip{ipaddress.ip_address(a).version}:{a}" for a in egress)
    suggestion = f'"v=spf1 {mechanisms or "ip4:<your sending address>"} ~all"'
    if not spf:
        return [Finding("SPF", "missing", domain, "no v=spf1 record",
                        f"publish {domain} TXT {suggestion} (list every address "
                        "Sendarix sends from, plus any other services sending as this domain)")]
    if len(spf) > 1:
        return [Finding("SPF", "wrong", domain, f"{len(spf)} v=spf1 records",
                        "receivers treat several SPF records as an error (permerror): "
                        "merge them into one")]
    record = spf[0]
    terms = record.split()[1:]
    lowered = [t.lower() for t in terms]
    if "+all" in lowered or "all" in lowered:
        return [Finding("SPF", "wrong", domain, record,
                        "'+all' lets anyone send as this domain: end with ~all or -all")]
    listed = {t.split(":", 1)[1].split("/")[0] for t in lowered
              if t.startswith(("ip4:", "ip6:")) and ":" in t}
    not_listed = [a for a in egress if a.lower() not in listed]
    indirect = any(t.startswith(("include:", "a", "mx", "redirect=")) for t in lowered)
    if not_listed and not indirect:
        return [Finding("SPF", "wrong", domain, record,
                        f"sending address(es) {', '.join(not_listed)} not authorized: add "
                        + " ".join(f"ip{ipaddress.ip_address(a).version}:{a}"
                                   for a in not_listed))]
    if not_listed:
        return [Finding("SPF", "warning", domain, record,
                        f"sending address(es) {', '.join(not_listed)} not listed directly; "
                        "make sure an include:, a or mx term covers them")]
    if not any(t.endswith("all") for t in lowered):
        return [Finding("SPF", "warning", domain, record,
                        "no 'all' term at the end: add ~all (or -all once you are sure)")]
    return [Finding("SPF", "ok", domain, record, "")]


def _dmarc_findings(resolver: dns.resolver.Resolver, domain: str) -> list[Finding]:
    name = f"_dmarc.{domain}"
    records = [t for t in txt_records(resolver, name) if t.lower().startswith("v=dmarc1")]
    parent = domain.split(".", 1)[1] if domain.count(".") >= 2 else None
    if not records and parent:
        # A subdomain falls under its organisational domain's policy (an approximation:
        # the parent, not the public-suffix list).
        inherited = [t for t in txt_records(resolver, f"_dmarc.{parent}")
                     if t.lower().startswith("v=dmarc1")]
        if inherited:
            name, records = f"_dmarc.{parent}", inherited
    if not records:
        return [Finding("DMARC", "missing", f"_dmarc.{domain}", "no v=DMARC1 record",
                        f'publish _dmarc.{domain} TXT "v=DMARC1; p=none; '
                        f'rua=mailto:dmarc-reports@{domain}" to start monitoring, then '
                        "move to p=quarantine or p=reject")]
    if len(records) > 1:
        return [Finding("DMARC", "wrong", name, f"{len(records)} v=DMARC1 records",
                        "receivers ignore DMARC when there are several records: keep one")]
    try:
        tags = parse_tags(records[0])
    except ValueError as e:
        return [Finding("DMARC", "wrong", name, records[0], f"malformed record ({e})")]
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return [Finding("DMARC", "wrong", name, records[0],
                        "p= must be none, quarantine or reject")]
    notes = []
    if tags.get("adkim", "r").lower() == "s" and name != f"_dmarc.{domain}":
        notes.append("adkim=s: signatures from this subdomain do not align with the parent")
    if policy == "none":
        notes.append("p=none only monitors: move to quarantine or reject once reports "
                     "show all your mail passes")
    if not tags.get("rua"):
        notes.append("no rua=: add rua=mailto:... to receive aggregate reports")
    status = "warning" if notes else "ok"
    return [Finding("DMARC", status, name, records[0], "; ".join(notes))]


def check_domain(
    resolver: dns.resolver.Resolver, domain: str, sd: SendingDomain | None,
    egress: Sequence[str] = (),
) -> list[Finding]:
    """SPF, DKIM and DMARC findings for ``domain`` (``egress``: the node's sending
    addresses, checked against SPF).  Blocking."""
    findings = _spf_findings(resolver, domain, egress)
    findings += _dkim_findings(resolver, domain, sd)
    findings += _dmarc_findings(resolver, domain)
    return findings
