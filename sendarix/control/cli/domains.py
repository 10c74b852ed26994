"""``sendarix domains``: sending domains, their DKIM keys and DNS records."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from sendarix.cleanup.dkimkeys import ALGORITHMS
from sendarix.control.cli.common import (
    CommandError,
    Output,
    domain_arg,
    format_when,
    node_secret,
    render_table,
    tenant_arg,
    text_lines,
    to_json,
)
from sendarix.control.domainops import (
    DomainOpError,
    add_domain,
    check_dns,
    record_lines,
    verify_domain,
)
from sendarix.model.domain import SendingDomain
from sendarix.stores.backends import Stores

# -- sending domains -------------------------------------------------------------------


def _record_lines(sd: SendingDomain) -> list[str]:
    return record_lines(sd)


async def _domains_add(args: argparse.Namespace, stores: Stores) -> Output:
    secret = node_secret(stores.config)
    try:
        new = await add_domain(stores, secret, args.domain, args.tenant, args.selector,
                               args.algorithm, time.time())
    except DomainOpError as e:
        raise CommandError(_cli_words(str(e))) from None
    if args.json:
        return text_lines(to_json({**new.to_dict(), "records": record_lines(new)}))
    return text_lines(*record_lines(new))


def _cli_words(message: str) -> str:
    """An operation's message in the command line's terms."""
    return (message.replace("with a new selector", "with --selector NEW (see: sendarix "
                            "domains list)")
            .replace("add it first", "add it first with sendarix domains add"))


async def _domains_verify(args: argparse.Namespace, stores: Stores) -> Output:
    try:
        sd, results = await verify_domain(stores, args.domain, time.time())
    except DomainOpError as e:
        raise CommandError(_cli_words(str(e))) from None
    failed = [f"{name}: {reason}" for name, reason in results if reason is not None]
    if failed:
        signing = [k.selector for k, (_, r) in zip(sd.keys, results, strict=True) if r is None]
        still = f"; still signing with {', '.join(signing)}" if signing else ""
        raise CommandError(f"{args.domain} not verified: " + "; ".join(failed) + still)
    names = ", ".join(name for name, _ in results)
    return text_lines(f"{args.domain} verified: {names} match; mail from it is now DKIM-signed")


async def _domains_remove(args: argparse.Namespace, stores: Stores) -> Output:
    sd = await stores.domains.get(args.domain)
    if sd is None:
        raise CommandError(f"no domain {args.domain}")
    if args.selector is None:
        await stores.domains.remove(args.domain)
        return text_lines(f"removed {args.domain} and its {len(sd.keys)} key(s); mail from it "
                      "is no longer signed (remove its DKIM records from DNS later)")
    key = sd.key(args.selector)
    if key is None:
        raise CommandError(f"{args.domain} has no selector {args.selector}")
    others = [k for k in sd.keys if k.selector != args.selector and k.verified]
    if key.verified and not others and not args.force:
        raise CommandError(f"{args.selector} is the last verified key of {args.domain}: mail "
                           "would go out unsigned; verify a new key first (or use --force)")
    await stores.domains.remove(args.domain, args.selector)
    return text_lines(f"removed key {args.selector} of {args.domain}; keep its DNS record a few "
                  "days for mail still in transit, then delete it")


async def _domains_list(args: argparse.Namespace, stores: Stores) -> Output:
    domains = await stores.domains.list()
    if args.json:
        return text_lines(to_json([d.to_dict() for d in domains]))
    if not domains:
        return text_lines("no sending domains")
    rows = [
        (d.domain, d.tenant or "any", d.state,
         ",".join(f"{k.selector}({k.key_type}{'' if k.verified else ', pending'})"
                  for k in d.keys),
         format_when(d.created_at), format_when(d.verified_at))
        for d in domains
    ]
    header = ("DOMAIN", "TENANT", "STATE", "KEYS", "ADDED", "VERIFIED")
    return text_lines(render_table(header, rows))


async def _domains_check(args: argparse.Namespace, stores: Stores) -> Output:
    try:
        findings = await check_dns(stores, args.domain)
    except DomainOpError as e:
        raise CommandError(str(e)) from None
    if args.json:
        return text_lines(to_json([f.to_dict() for f in findings]))
    rows: list[tuple[str, ...]] = []
    for f in findings:
        rows.append((f.kind, f.status.upper(), f.name, f.found))
        if f.advice:
            rows.append(("", "", "->", f.advice))
    problems = sum(1 for f in findings if f.status in ("missing", "wrong"))
    summary = "all good" if not problems else f"{problems} problem(s) to fix"
    return text_lines(render_table(("CHECK", "STATUS", "NAME", "FOUND"), rows),
                  f"{args.domain}: {summary}")


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``domains`` commands."""
    doms = group("domains", "sending domains and their DKIM keys")
    p = doms.add_parser(
        "add", parents=listing, help="generate DKIM keys; prints the DNS records to publish",
        epilog="Default: --algorithm dual (an RSA and an ed25519 key, selectors "
        "S-rsa and S-ed25519) with S = sxYYYYMM.  On a domain already added, "
        "--selector NEW adds new keys (rotation): they sign once verified.",
    )
    p.add_argument("domain", metavar="DOMAIN", type=domain_arg)
    p.add_argument("--selector", metavar="S", help="DKIM selector (default: sxYYYYMM)")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="dual",
                   help="key type(s) (default: dual = rsa-2048 and ed25519)")
    p.add_argument("--tenant", type=tenant_arg, help="tenant the domain belongs to (default: any)")
    p.set_defaults(store=_domains_add)
    p = doms.add_parser("verify", parents=common,
                        help="check the published DKIM records; exit 0 when all match")
    p.add_argument("domain", metavar="DOMAIN", type=domain_arg)
    p.set_defaults(store=_domains_verify)
    p = doms.add_parser("remove", parents=common,
                        help="remove a key (--selector) or the whole domain")
    p.add_argument("domain", metavar="DOMAIN", type=domain_arg)
    p.add_argument("--selector", metavar="S", help="remove only this key (key rotation)")
    p.add_argument("--force", action="store_true",
                   help="remove the last verified key even though mail then goes unsigned")
    p.set_defaults(store=_domains_remove)
    p = doms.add_parser("list", parents=listing, help="list sending domains")
    p.set_defaults(store=_domains_list)
    p = doms.add_parser("check", parents=listing,
                        help="report SPF, DKIM and DMARC for a domain as found in DNS")
    p.add_argument("domain", metavar="DOMAIN", type=domain_arg)
    p.set_defaults(store=_domains_check)
