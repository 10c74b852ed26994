"""``sendarix credentials``: SMTP credentials and API keys, and XOAUTH2 tokens."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from sendarix.control.cli.common import (
    CommandError,
    Output,
    domain_arg,
    duration_arg,
    format_when,
    network_arg,
    node_secret,
    render_table,
    scopes_arg,
    tenant_arg,
    text_lines,
    to_json,
)
from sendarix.ingress.xoauth2 import mint_token
from sendarix.model.credential import DEFAULT_SCOPES, Credential
from sendarix.stores.backends import Stores
from sendarix.stores.credentials import CredentialExistsError, CredentialNotFoundError

# -- credentials ---------------------------------------------------------------------


def _rate(cred: Credential) -> str:
    return f"{cred.rate_per_minute}/min" if cred.rate_per_minute is not None else "-"


async def _credentials_add(args: argparse.Namespace, stores: Stores) -> Output:
    try:
        cred, secret = await stores.credentials.add(
            args.name,
            args.tenant,
            args.domain,
            args.allow_ip,
            args.scope,
            args.rate,
            args.sandbox,
        )
    except (CredentialExistsError, ValueError) as e:
        raise CommandError(str(e)) from None
    if args.json:
        return text_lines(to_json({"username": cred.name, "secret": secret, **cred.to_dict()}))
    return text_lines(f"username: {cred.name}", f"secret: {secret}")


async def _credentials_list(args: argparse.Namespace, stores: Stores) -> Output:
    # ICredentialStore.list() takes no tenant: filter here, the lists are short.
    creds = [c for c in await stores.credentials.list() if args.tenant in (None, c.tenant)]
    if args.json:
        return text_lines(to_json([c.to_dict() for c in creds]))
    if not creds:
        return text_lines("no credentials")
    rows = [
        (
            c.name,
            c.tenant,
            ",".join(sorted(c.scopes)),
            ",".join(c.domains) or "any",
            ",".join(str(n) for n in c.networks) or "any",
            _rate(c),
            "yes" if c.sandbox else "no",
            "active" if c.active else "revoked",
            format_when(c.created_at),
        )
        for c in creds
    ]
    headers = (
        "NAME",
        "TENANT",
        "SCOPES",
        "DOMAINS",
        "NETWORKS",
        "RATE",
        "SANDBOX",
        "STATE",
        "CREATED",
    )
    return text_lines(render_table(headers, rows))


async def _credentials_revoke(args: argparse.Namespace, stores: Stores) -> Output:
    cred = await stores.credentials.get(args.name)
    if cred is None:
        raise CommandError(f"no credential {args.name!r}")
    if not cred.active:
        when = format_when(cred.revoked_at)
        return text_lines(f"credential {args.name} was already revoked at {when}")
    await stores.credentials.revoke(args.name)
    return text_lines(f"credential {args.name} revoked")


async def _credentials_rotate(args: argparse.Namespace, stores: Stores) -> Output:
    cred = await stores.credentials.get(args.name)
    if cred is None:
        raise CommandError(f"no credential {args.name!r}")
    if not cred.active:
        raise CommandError(f"credential {args.name!r} is revoked: add a new one instead")
    try:
        secret = await stores.credentials.rotate(args.name)
    except CredentialNotFoundError as e:  # revoked in the meantime
        raise CommandError(str(e)) from None
    if args.json:
        return text_lines(to_json({"username": args.name, "secret": secret}))
    return text_lines(f"secret: {secret}")


async def _credentials_token(args: argparse.Namespace, stores: Stores) -> Output:
    secret = node_secret(stores.config)
    cred = await stores.credentials.get(args.name)
    if cred is None or not cred.active:
        raise CommandError(f"no active credential {args.name!r}")
    if not cred.has_scope("smtp"):
        raise CommandError(f"credential {args.name!r} has no smtp scope")
    expires = time.time() + args.ttl
    token = mint_token(secret, cred, expires)
    if args.json:
        return text_lines(to_json({"username": cred.name, "token": token, "expires": expires}))
    return text_lines(
        f"username: {cred.name}", f"token: {token}", f"expires: {format_when(expires)}"
    )


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``credentials`` commands."""
    creds = group("credentials", "SMTP credentials and API keys")
    p = creds.add_parser("add", parents=listing, help="create a credential; prints its secret once")
    p.add_argument("name", metavar="NAME", help="SMTP AUTH user name")
    p.add_argument(
        "--tenant", type=tenant_arg, required=True, help="tenant the credential sends for"
    )
    p.add_argument(
        "--domain",
        type=domain_arg,
        action="append",
        default=[],
        help="allowed sender domain (repeat; default: any)",
    )
    p.add_argument(
        "--allow-ip",
        type=network_arg,
        action="append",
        default=[],
        metavar="CIDR",
        help="allowed client network (repeat; default: any)",
    )
    p.add_argument(
        "--scope",
        type=scopes_arg,
        default=DEFAULT_SCOPES,
        metavar="SCOPES",
        help="comma-separated from smtp,send,read,admin (default: smtp,send)",
    )
    p.add_argument("--rate", metavar="N/min", help="message rate limit (N/s, N/min or N/h)")
    p.add_argument("--sandbox", action="store_true", help="deliver to the simulator only")
    p.set_defaults(store=_credentials_add)
    p = creds.add_parser("list", parents=listing, help="list credentials (never their secrets)")
    p.add_argument("--tenant", help="only this tenant's")
    p.set_defaults(store=_credentials_list)
    p = creds.add_parser("revoke", parents=common, help="revoke a credential at once")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(store=_credentials_revoke)
    p = creds.add_parser("rotate", parents=listing, help="replace a credential's secret")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(store=_credentials_rotate)

    p = creds.add_parser(
        "token", parents=listing,
        help="mint an XOAUTH2 bearer token (void once the credential is rotated or revoked)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--ttl", type=duration_arg, default=3600.0, metavar="DURATION",
                   help="how long the token is valid (default 1h)")
    p.set_defaults(store=_credentials_token)
