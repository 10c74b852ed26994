"""The ``sendarix`` operator command: credentials, sending domains, suppressions,
queue, delivery log, configuration.

``sendarix [--config PATH] COMMAND ...`` works directly on the stores the relay uses
(SQLite in WAL mode lets both share the file), so it also works while the relay is
stopped.  ``--config`` may come before or after the command; without it
``./sendarix.toml`` is read when present, else the built-in development default.

Output contract (docs/operator-guide.md): listing commands take ``--json`` and then
print one JSON array of objects; exit status 0 on success, 1 on a user error with a
one-line reason on stderr, 2 on an internal error (with a traceback).

Commands that need the stores run their asynchronous part under ``task.react``; they
return their output instead of printing it, so all writing happens after the reactor
has stopped and a closed pipe (``| head``) cannot break a store operation halfway.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn

from attrs import frozen
from twisted.internet.task import react
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from sendarix import __version__
from sendarix.cleanup.dkimkeys import ALGORITHMS, check_selector, generate_key, record_line
from sendarix.cli.domaincheck import DNSLookupError, check_domain, make_resolver, verify_keys
from sendarix.config.secret import NodeSecret, SecretError, node_secret_from_env
from sendarix.config.settings import Config, ConfigError, describe, resolve_config
from sendarix.config.units import parse_duration
from sendarix.ingress.xoauth2 import mint_token
from sendarix.model.credential import DEFAULT_SCOPES, SCOPES, Credential
from sendarix.model.domain import DKIMKey, DomainExistsError, DomainNotFoundError, SendingDomain
from sendarix.model.event import EVENT_TYPES, MAX_LIMIT, Event, EventQuery, format_timestamp
from sendarix.model.event import parse_timestamp as parse_rfc3339
from sendarix.model.message import RecipientStatus, StoredMessage
from sendarix.model.suppression import normalize_address
from sendarix.routing.state import format_state, read_state, state_path
from sendarix.stores.backends import Stores, open_stores
from sendarix.stores.credentials import CredentialExistsError, CredentialNotFoundError
from sendarix.stores.errors import SpoolError, StoreUnavailable

__all__ = ["CommandError", "main", "parse_time", "render_table"]

PROG = "sendarix"


class CommandError(Exception):
    """A user error: the message is printed as one line on stderr and the exit is 1."""


@frozen
class Output:
    """What a command prints: ``stdout`` (text, or raw bytes for ``queue show --body``)
    and an optional ``note`` for stderr that is not an error (``next cursor: ...`` in
    JSON mode, so stdout stays one JSON array)."""

    stdout: str | bytes
    note: str | None = None


StoreCommand = Callable[[argparse.Namespace, Stores], Awaitable[Output]]
PlainCommand = Callable[[argparse.Namespace, Config], Output]


# -- formatting helpers --------------------------------------------------------------


def render_table(
    headers: Sequence[str] | None,
    rows: Iterable[Sequence[object]],
    right: Iterable[int] = (),
) -> str:
    """Rows as aligned columns two spaces apart (``right``: column indexes aligned
    right, for numbers); ``headers`` None prints the rows alone."""
    body = [[str(cell) for cell in row] for row in rows]
    lines = ([list(headers)] if headers is not None else []) + body
    if not lines:
        return ""
    width = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    align_right = set(right)
    out = []
    for line in lines:
        cells = [
            cell.rjust(width[i]) if i in align_right else cell.ljust(width[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _when(ts: float | None) -> str:
    """A timestamp to the second for tables (``-`` when unknown)."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _json(value: Any) -> str:
    return json.dumps(value, indent=2)


def _lines(*parts: str) -> Output:
    return Output("\n".join(parts) + "\n")


# -- argument types (argparse turns ArgumentTypeError into a usage error) ---------------

# Tenant names follow the config file's names, so `[tenant.NAME]` and credentials agree.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _tenant(text: str) -> str:
    if not _TENANT.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"bad tenant {text!r}: letters, digits, '.', '_' and '-', at most 64"
        )
    return text


def _domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    labels = domain.split(".")
    if not domain or len(domain) > 253 or not all(_LABEL.fullmatch(x) for x in labels):
        raise argparse.ArgumentTypeError(f"bad domain {text!r}: expected one like example.com")
    return domain


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad network {text!r}: expected an address or a CIDR like 10.0.0.0/8"
        ) from None


def _scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip().lower() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - SCOPES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scope {', '.join(unknown)} (choose from {', '.join(sorted(SCOPES))})"
        )
    if not scopes:
        raise argparse.ArgumentTypeError("name at least one scope")
    return scopes


def _address(text: str) -> str:
    try:
        return normalize_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_NUMBER = re.compile(r"\s*\d+(\.\d*)?\s*")


def parse_time(text: str, now: float) -> float:
    """POSIX seconds from an RFC 3339 time, POSIX seconds, or a duration with a unit
    (``"1h"``, ``"30m"``, ``"2d"``) meaning that long before ``now``.  ValueError when
    it is none of them."""
    if _NUMBER.fullmatch(text):
        return float(text)
    try:
        return parse_rfc3339(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text, "time")
    except ConfigError:
        raise ValueError(
            f"expected an RFC 3339 time, POSIX seconds or a duration like 1h, got {text!r}"
        ) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "--ttl")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _time(text: str) -> float:
    try:
        return parse_time(text, time.time())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- config ------------------------------------------------------------------------


def _config_check(args: argparse.Namespace, config: Config) -> Output:
    """Loading already validated the file (errors exit before any command runs)."""
    return _lines(describe(config), "configuration OK")


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
        return _lines(_json({"username": cred.name, "secret": secret, **cred.to_dict()}))
    return _lines(f"username: {cred.name}", f"secret: {secret}")


async def _credentials_list(args: argparse.Namespace, stores: Stores) -> Output:
    # ICredentialStore.list() takes no tenant: filter here, the lists are short.
    creds = [c for c in await stores.credentials.list() if args.tenant in (None, c.tenant)]
    if args.json:
        return _lines(_json([c.to_dict() for c in creds]))
    if not creds:
        return _lines("no credentials")
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
            _when(c.created_at),
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
    return _lines(render_table(headers, rows))


async def _credentials_revoke(args: argparse.Namespace, stores: Stores) -> Output:
    cred = await stores.credentials.get(args.name)
    if cred is None:
        raise CommandError(f"no credential {args.name!r}")
    if not cred.active:
        return _lines(f"credential {args.name} was already revoked at {_when(cred.revoked_at)}")
    await stores.credentials.revoke(args.name)
    return _lines(f"credential {args.name} revoked")


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
        return _lines(_json({"username": args.name, "secret": secret}))
    return _lines(f"secret: {secret}")


# -- sending domains -------------------------------------------------------------------


def _node_secret(config: Config) -> NodeSecret:
    env = config.node.secret_key_env
    try:
        secret = node_secret_from_env(env)
    except SecretError as e:
        raise CommandError(str(e)) from None
    if secret is None:
        raise CommandError(
            f"${env} is not set: the node secret encrypts DKIM private keys; export it "
            "(the same value the relay uses) and try again"
        )
    return secret


def _selectors(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(selector, key type) for each key ``domains add`` creates."""
    types = ALGORITHMS[args.algorithm]
    try:
        base = check_selector(args.selector or time.strftime("sx%Y%m", time.gmtime()))
    except ValueError as e:
        raise CommandError(str(e)) from None
    if len(types) == 1:
        return [(base, types[0])]
    return [(f"{base}-{'rsa' if t == 'rsa' else 'ed25519'}", t) for t in types]


def _record_lines(sd: SendingDomain) -> list[str]:
    return [record_line(k.selector, sd.domain, k.key_type, k.public_b64) for k in sd.keys]


async def _domains_add(args: argparse.Namespace, stores: Stores) -> Output:
    secret = _node_secret(stores.config)
    existing_domain = await stores.domains.get(args.domain)
    if existing_domain is not None:
        if args.selector is None:
            raise CommandError(
                f"domain {args.domain} was already added; to rotate its keys, add new ones "
                "with --selector NEW (see: sendarix domains list)"
            )
        if args.tenant is not None and args.tenant != existing_domain.tenant:
            raise CommandError(f"domain {args.domain} belongs to tenant "
                               f"{existing_domain.tenant or 'any'}; --tenant cannot change it")
    # Every stored key must open with the one node secret the relay will have.
    existing = [k for d in await stores.domains.list() for k in d.keys]
    if existing:
        try:
            secret.decrypt(existing[0].private_encrypted)
        except SecretError as e:
            raise CommandError(f"{e}; use the secret the relay uses") from None
    now = time.time()
    keys = []
    for selector, key_type in _selectors(args):
        if existing_domain is not None and existing_domain.key(selector) is not None:
            raise CommandError(f"selector {selector} of {args.domain} already exists")
        pair = await deferToThread(generate_key, key_type)  # RSA takes ~0.1 s
        keys.append(DKIMKey(selector, key_type, pair.public_b64,
                            secret.encrypt(pair.private_pem), now))
    try:
        if existing_domain is None:
            sd = await stores.domains.add(args.domain, args.tenant, keys, now)
        else:
            sd = await stores.domains.add_keys(args.domain, keys)
    except (DomainExistsError, DomainNotFoundError) as e:
        raise CommandError(str(e)) from None
    added = [k.selector for k in keys]
    new = SendingDomain(sd.domain, sd.tenant, sd.created_at,
                        tuple(k for k in sd.keys if k.selector in added))
    if args.json:
        return _lines(_json({**new.to_dict(), "records": _record_lines(new)}))
    return _lines(*_record_lines(new))


async def _domains_verify(args: argparse.Namespace, stores: Stores) -> Output:
    sd = await stores.domains.get(args.domain)
    if sd is None:
        raise CommandError(f"no domain {args.domain}: add it first with sendarix domains add")
    if not sd.keys:
        raise CommandError(f"{args.domain} has no keys: add one with sendarix domains add "
                           f"{args.domain} --selector NAME")
    resolver = make_resolver(stores.config)
    try:
        results = await deferToThread(verify_keys, resolver, sd)
    except DNSLookupError as e:
        raise CommandError(f"{args.domain} not verified: {e} (nothing changed)") from None
    now = time.time()
    for key, (_, reason) in zip(sd.keys, results, strict=True):
        await stores.domains.set_verified(args.domain, now if reason is None else None,
                                          key.selector)
    failed = [f"{name}: {reason}" for name, reason in results if reason is not None]
    if failed:
        signing = [k.selector for k, (_, r) in zip(sd.keys, results, strict=True) if r is None]
        still = f"; still signing with {', '.join(signing)}" if signing else ""
        raise CommandError(f"{args.domain} not verified: " + "; ".join(failed) + still)
    names = ", ".join(name for name, _ in results)
    return _lines(f"{args.domain} verified: {names} match; mail from it is now DKIM-signed")


async def _domains_remove(args: argparse.Namespace, stores: Stores) -> Output:
    sd = await stores.domains.get(args.domain)
    if sd is None:
        raise CommandError(f"no domain {args.domain}")
    if args.selector is None:
        await stores.domains.remove(args.domain)
        return _lines(f"removed {args.domain} and its {len(sd.keys)} key(s); mail from it "
                      "is no longer signed (remove its DKIM records from DNS later)")
    key = sd.key(args.selector)
    if key is None:
        raise CommandError(f"{args.domain} has no selector {args.selector}")
    others = [k for k in sd.keys if k.selector != args.selector and k.verified]
    if key.verified and not others and not args.force:
        raise CommandError(f"{args.selector} is the last verified key of {args.domain}: mail "
                           "would go out unsigned; verify a new key first (or use --force)")
    await stores.domains.remove(args.domain, args.selector)
    return _lines(f"removed key {args.selector} of {args.domain}; keep its DNS record a few "
                  "days for mail still in transit, then delete it")


async def _domains_list(args: argparse.Namespace, stores: Stores) -> Output:
    domains = await stores.domains.list()
    if args.json:
        return _lines(_json([d.to_dict() for d in domains]))
    if not domains:
        return _lines("no sending domains")
    rows = [
        (d.domain, d.tenant or "any", d.state,
         ",".join(f"{k.selector}({k.key_type}{'' if k.verified else ', pending'})"
                  for k in d.keys),
         _when(d.created_at), _when(d.verified_at))
        for d in domains
    ]
    return _lines(render_table(("DOMAIN", "TENANT", "STATE", "KEYS", "ADDED", "VERIFIED"), rows))


async def _domains_check(args: argparse.Namespace, stores: Stores) -> Output:
    sd = await stores.domains.get(args.domain)
    resolver = make_resolver(stores.config)
    egress = [s.address for s in stores.config.egress_sources]
    try:
        findings = await deferToThread(check_domain, resolver, args.domain, sd, egress)
    except DNSLookupError as e:
        raise CommandError(f"cannot check {args.domain}: {e}") from None
    if args.json:
        return _lines(_json([f.to_dict() for f in findings]))
    rows: list[tuple[str, ...]] = []
    for f in findings:
        rows.append((f.kind, f.status.upper(), f.name, f.found))
        if f.advice:
            rows.append(("", "", "->", f.advice))
    problems = sum(1 for f in findings if f.status in ("missing", "wrong"))
    summary = "all good" if not problems else f"{problems} problem(s) to fix"
    return _lines(render_table(("CHECK", "STATUS", "NAME", "FOUND"), rows),
                  f"{args.domain}: {summary}")


async def _credentials_token(args: argparse.Namespace, stores: Stores) -> Output:
    secret = _node_secret(stores.config)
    cred = await stores.credentials.get(args.name)
    if cred is None or not cred.active:
        raise CommandError(f"no active credential {args.name!r}")
    if not cred.has_scope("smtp"):
        raise CommandError(f"credential {args.name!r} has no smtp scope")
    expires = time.time() + args.ttl
    token = mint_token(secret, cred, expires)
    if args.json:
        return _lines(_json({"username": cred.name, "token": token, "expires": expires}))
    return _lines(f"username: {cred.name}", f"token: {token}", f"expires: {_when(expires)}")


# -- suppressions ----------------------------------------------------------------------


async def _suppressions_add(args: argparse.Namespace, stores: Stores) -> Output:
    now = time.time()
    added = await stores.suppressions.add(args.tenant, args.address, args.reason, "manual", now)
    if added:
        return _lines(f"suppressed {args.address} for tenant {args.tenant}")
    return _lines(f"{args.address} was already suppressed for tenant {args.tenant}")


async def _suppressions_list(args: argparse.Namespace, stores: Stores) -> Output:
    if args.after is not None and args.tenant is None:
        raise CommandError("--after needs --tenant")
    entries = await stores.suppressions.list(tenant=args.tenant, limit=args.limit, after=args.after)
    if args.json:
        return _lines(_json([e.to_dict() for e in entries]))
    if not entries:
        return _lines("no suppressions")
    rows = [(e.tenant, e.address, e.source, _when(e.created_at), e.reason or "-") for e in entries]
    text = [render_table(("TENANT", "ADDRESS", "SOURCE", "CREATED", "REASON"), rows)]
    if len(entries) == args.limit and args.tenant is not None:
        text.append(f"more may follow: --after {entries[-1].address}")
    return _lines(*text)


async def _suppressions_remove(args: argparse.Namespace, stores: Stores) -> Output:
    if not await stores.suppressions.remove(args.tenant, args.address):
        raise CommandError(f"{args.address} is not suppressed for tenant {args.tenant}")
    return _lines(f"removed {args.address} from tenant {args.tenant}'s suppressions")


# -- queue ---------------------------------------------------------------------------


def _status_summary(message: StoredMessage) -> str:
    counts: dict[str, int] = {}
    for r in message.recipients:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    return ", ".join(f"{s.value} {counts[s.value]}" for s in RecipientStatus if s.value in counts)


def _next_attempt(message: StoredMessage) -> float | None:
    due = [
        r.next_attempt
        for r in message.recipients
        if not r.status.final and r.next_attempt is not None
    ]
    return min(due) if due else None


async def _queue_list(args: argparse.Namespace, stores: Stores) -> Output:
    messages = await stores.spool.list_messages(
        status=args.status, domain=args.domain, limit=args.limit, after=args.after
    )
    if args.json:
        return _lines(_json([m.to_dict() for m in messages]))
    if not messages:
        return _lines("no messages")
    rows = [
        (
            m.queue_id,
            _when(m.meta.received_at),
            m.size,
            m.meta.tenant,
            f"<{m.envelope.sender}>",
            len(m.recipients),
            _status_summary(m),
            _when(_next_attempt(m)),
        )
        for m in messages
    ]
    headers = ("QUEUE ID", "RECEIVED", "SIZE", "TENANT", "SENDER", "RCPTS", "STATUS", "NEXT")
    text = [render_table(headers, rows, right=(2, 5))]
    if len(messages) == args.limit:
        text.append(f"more may follow: --after {messages[-1].queue_id}")
    return _lines(*text)


def _reply_text(reply: Any) -> str:
    if reply is None:
        return "-"
    return " ".join(str(p) for p in (reply.code, reply.enhanced, reply.text) if p)


async def _queue_show(args: argparse.Namespace, stores: Stores) -> Output:
    message = await stores.spool.get(args.queue_id)
    if message is None:
        raise CommandError(f"no message {args.queue_id!r} in the queue")
    if args.body:
        body = await stores.spool.body(args.queue_id)
        if body is None:
            raise CommandError(f"message {args.queue_id!r} left the queue")
        return Output(body)
    if args.json:
        return _lines(_json(message.to_dict()))
    meta, env = message.meta, message.envelope
    client = meta.client_ip or "-"
    if meta.helo:
        client += f" (helo {meta.helo})"
    if meta.listener:
        client += f" on listener {meta.listener}"
    fields = [
        ("queue id", message.queue_id),
        ("received", format_timestamp(meta.received_at)),
        ("tenant", meta.tenant),
        ("credential", meta.credential or "-"),
        ("client", client),
        ("tls", f"{meta.tls.version} {meta.tls.cipher}" if meta.tls else "-"),
        ("sender", f"<{env.sender}>"),
        ("message-id", meta.message_id or "-"),
        ("size", f"{message.size} bytes"),
        ("tags", ", ".join(meta.tags) or "-"),
        ("node", meta.node or "-"),
    ]
    rows = [
        (
            r.address,
            r.status.value,
            r.attempts,
            _when(r.next_attempt) if not r.status.final else "-",
            _reply_text(r.last_reply),
        )
        for r in message.recipients
    ]
    return _lines(
        render_table(None, [(f"{k}:", v) for k, v in fields]),
        "",
        render_table(("RECIPIENT", "STATUS", "ATTEMPTS", "NEXT", "LAST REPLY"), rows, right=(2,)),
    )


async def _queue_stats(args: argparse.Namespace, stores: Stores) -> Output:
    stats = await stores.spool.stats()
    # What the running node last wrote about sites, endpoints and egress sources.
    routing = read_state(state_path(stores.config))
    if args.json:
        data = stats.to_dict()
        if routing is not None:
            data["routing"] = routing
        return _lines(_json(data))
    statuses = [s.value for s in RecipientStatus if s.value in stats.by_status]
    total = sum(stats.by_status.values())
    summary = ", ".join(f"{s} {stats.by_status[s]}" for s in statuses)
    text = [
        f"messages: {stats.messages}",
        f"recipients: {total}" + (f" ({summary})" if summary else ""),
    ]
    if stats.by_domain:
        rows = [
            (domain, *(counts.get(s, 0) for s in statuses))
            for domain, counts in sorted(stats.by_domain.items())
        ]
        headers = ("DOMAIN", *(s.upper() for s in statuses))
        text += ["", render_table(headers, rows, right=range(1, len(headers)))]
    if routing is not None:
        text += ["", *format_state(routing, time.time())]
    return _lines(*text)


async def _queue_retry(args: argparse.Namespace, stores: Stores) -> Output:
    # retry() answers 0 both for an unknown id and for a message whose recipients are
    # all final: look the message up first so the two read differently.
    if await stores.spool.get(args.queue_id) is None:
        raise CommandError(f"no message {args.queue_id!r} in the queue")
    count = await stores.spool.retry(args.queue_id, time.time())
    noun = "recipient" if count == 1 else "recipients"
    return _lines(f"{count} {noun} of {args.queue_id} due now")


async def _queue_delete(args: argparse.Namespace, stores: Stores) -> Output:
    if not await stores.spool.delete(args.queue_id):
        raise CommandError(f"no message {args.queue_id!r} in the queue")
    return _lines(f"deleted {args.queue_id}")


# -- log -------------------------------------------------------------------------------


def _event_row(event: Event) -> tuple[str, ...]:
    return (
        format_timestamp(event.timestamp),
        event.type,
        event.queue_id or "-",
        ",".join(event.all_recipients()) or "-",
        _reply_text(event.response),
    )


async def _log_search(args: argparse.Namespace, stores: Stores) -> Output:
    query = EventQuery(
        recipient=args.recipient,
        sender=args.sender,
        queue_id=args.queue_id,
        message_id=args.message_id,
        type=args.type,
        tenant=args.tenant,
        tag=args.tag,
        since=args.since,
        until=args.until,
        limit=args.limit,
        cursor=args.cursor,
    )
    try:
        page = await stores.eventlog.search(query)
    except ValueError as e:  # a cursor that is not one of ours
        raise CommandError(str(e)) from None
    cursor = f"next cursor: {page.next_cursor}" if page.next_cursor else None
    if args.json:
        return Output(_json([e.to_json() for e in page.events]) + "\n", note=cursor)
    if not page.events:
        return _lines("no events")
    text = [render_table(None, [_event_row(e) for e in page.events])]
    if cursor:
        text.append(cursor)
    return _lines(*text)


# -- the parser --------------------------------------------------------------------------


class _UsageError(Exception):
    """A command line argparse refused."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _build_parser() -> argparse.ArgumentParser:
    # Sub-parsers get --config with a SUPPRESS default so they only set it when it is
    # given after the command; given before, the top-level parser's value stays.
    config_opt = _Parser(add_help=False)
    config_opt.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML configuration file"
    )
    json_opt = _Parser(add_help=False)
    json_opt.add_argument("--json", action="store_true", help="print JSON")
    common = [config_opt]
    listing = [config_opt, json_opt]

    parser = _Parser(
        prog=PROG,
        description="Operate a Sendarix relay: credentials, queue, delivery log, configuration.",
        epilog="Without --config, ./sendarix.toml is read when present, else the built-in "
        "development default.  'sendarix sink --help' describes the test sink.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="TOML configuration file (also accepted after the command)",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> Any:
        p = commands.add_parser(name, parents=common, help=help, description=help)
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    # config
    config_cmds = group("config", "check the configuration")
    p = config_cmds.add_parser(
        "check", parents=common, help="validate and summarise the configuration"
    )
    p.set_defaults(plain=_config_check)

    # credentials
    creds = group("credentials", "SMTP credentials and API keys")
    p = creds.add_parser("add", parents=listing, help="create a credential; prints its secret once")
    p.add_argument("name", metavar="NAME", help="SMTP AUTH user name")
    p.add_argument("--tenant", type=_tenant, required=True, help="tenant the credential sends for")
    p.add_argument(
        "--domain",
        type=_domain,
        action="append",
        default=[],
        help="allowed sender domain (repeat; default: any)",
    )
    p.add_argument(
        "--allow-ip",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="allowed client network (repeat; default: any)",
    )
    p.add_argument(
        "--scope",
        type=_scopes,
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
    p.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION",
                   help="how long the token is valid (default 1h)")
    p.set_defaults(store=_credentials_token)

    # domains
    doms = group("domains", "sending domains and their DKIM keys")
    p = doms.add_parser(
        "add", parents=listing, help="generate DKIM keys; prints the DNS records to publish",
        epilog="Default: --algorithm dual (an RSA and an ed25519 key, selectors "
        "S-rsa and S-ed25519) with S = sxYYYYMM.  On a domain already added, "
        "--selector NEW adds new keys (rotation): they sign once verified.",
    )
    p.add_argument("domain", metavar="DOMAIN", type=_domain)
    p.add_argument("--selector", metavar="S", help="DKIM selector (default: sxYYYYMM)")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="dual",
                   help="key type(s) (default: dual = rsa-2048 and ed25519)")
    p.add_argument("--tenant", type=_tenant, help="tenant the domain belongs to (default: any)")
    p.set_defaults(store=_domains_add)
    p = doms.add_parser("verify", parents=common,
                        help="check the published DKIM records; exit 0 when all match")
    p.add_argument("domain", metavar="DOMAIN", type=_domain)
    p.set_defaults(store=_domains_verify)
    p = doms.add_parser("remove", parents=common,
                        help="remove a key (--selector) or the whole domain")
    p.add_argument("domain", metavar="DOMAIN", type=_domain)
    p.add_argument("--selector", metavar="S", help="remove only this key (key rotation)")
    p.add_argument("--force", action="store_true",
                   help="remove the last verified key even though mail then goes unsigned")
    p.set_defaults(store=_domains_remove)
    p = doms.add_parser("list", parents=listing, help="list sending domains")
    p.set_defaults(store=_domains_list)
    p = doms.add_parser("check", parents=listing,
                        help="report SPF, DKIM and DMARC for a domain as found in DNS")
    p.add_argument("domain", metavar="DOMAIN", type=_domain)
    p.set_defaults(store=_domains_check)

    # suppressions
    supp = group("suppressions", "each tenant's suppressed recipients")
    p = supp.add_parser("add", parents=common, help="suppress a recipient for a tenant")
    p.add_argument("address", metavar="ADDRESS", type=_address)
    p.add_argument("--tenant", type=_tenant, required=True)
    p.add_argument("--reason", default="", help="a note kept with the entry")
    p.set_defaults(store=_suppressions_add)
    p = supp.add_parser("list", parents=listing, help="list suppressed recipients")
    p.add_argument("--tenant", type=_tenant, help="only this tenant's")
    p.add_argument("--limit", type=_positive, default=100, help="at most N entries (100)")
    p.add_argument("--after", metavar="ADDRESS", help="start after this address (with --tenant)")
    p.set_defaults(store=_suppressions_list)
    p = supp.add_parser("remove", parents=common, help="lift a suppression")
    p.add_argument("address", metavar="ADDRESS", type=_address)
    p.add_argument("--tenant", type=_tenant, required=True)
    p.set_defaults(store=_suppressions_remove)

    # queue
    queue = group("queue", "messages in the spool")
    p = queue.add_parser("list", parents=listing, help="list spooled messages")
    p.add_argument(
        "--status",
        choices=[s.value for s in RecipientStatus],
        help="only messages with a recipient in this state",
    )
    p.add_argument("--domain", help="only messages with a recipient at this domain")
    p.add_argument("--limit", type=_positive, default=100, help="at most N messages (100)")
    p.add_argument("--after", metavar="QUEUE_ID", help="start after this queue id")
    p.set_defaults(store=_queue_list)
    p = queue.add_parser("show", parents=common, help="one message's envelope and recipients")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print JSON")
    shown.add_argument("--body", action="store_true", help="write the raw message to stdout")
    p.set_defaults(store=_queue_show)
    p = queue.add_parser("stats", parents=listing, help="queue depth by status and domain")
    p.set_defaults(store=_queue_stats)
    p = queue.add_parser("retry", parents=common, help="make a message's recipients due now")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.set_defaults(store=_queue_retry)
    p = queue.add_parser(
        "delete", parents=common, help="remove a message and its body from the queue"
    )
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.set_defaults(store=_queue_delete)

    # log
    log = group("log", "the delivery log")
    p = log.add_parser(
        "search",
        parents=listing,
        help="search events, newest first",
        epilog="TIME: RFC 3339 (2026-01-31T12:00:00Z), POSIX seconds, or a "
        "duration such as 1h or 2d meaning that long ago.",
    )
    p.add_argument("--recipient", metavar="ADDRESS")
    p.add_argument("--sender", metavar="ADDRESS")
    p.add_argument("--queue-id", metavar="QUEUE_ID")
    p.add_argument("--message-id", metavar="MESSAGE_ID")
    p.add_argument("--type", choices=sorted(EVENT_TYPES))
    p.add_argument("--tenant")
    p.add_argument("--tag")
    p.add_argument("--since", type=_time, metavar="TIME", help="events at or after TIME")
    p.add_argument("--until", type=_time, metavar="TIME", help="events before TIME")
    p.add_argument(
        "--limit", type=_positive, default=50, help=f"at most N events (50, up to {MAX_LIMIT})"
    )
    p.add_argument("--cursor", help="the 'next cursor' of a previous search")
    p.set_defaults(store=_log_search)

    # sink: dispatched before parsing (see main); listed here for --help.
    commands.add_parser(
        "sink", help="run the test SMTP sink (see 'sendarix sink --help')", add_help=False
    )
    return parser


# -- running --------------------------------------------------------------------------


def _sink_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``sink`` when the command is ``sink`` (``--config`` may come
    first and is ignored: the sink has no configuration file), else None."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            i += 2
        elif arg.startswith("--config="):
            i += 1
        else:
            return argv[i + 1 :] if arg == "sink" else None
    return None


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


#: Seconds the command waits for an unreachable Redis before giving up.
REDIS_WAIT = 5.0


def _run_with_stores(config: Config, command: StoreCommand, args: argparse.Namespace) -> Output:
    """Open the stores, run ``command``, close the stores (always); the command's output.

    Raises CommandError for user errors; anything else unexpected comes back as the
    Failure it was, re-raised here.
    """
    result: list[Output | BaseException | Failure] = []

    async def work(reactor: Any) -> None:
        try:
            stores = open_stores(config, reactor, json_log=False)
        except (NotImplementedError, ValueError) as e:  # e.g. an unset password_env
            result.append(CommandError(str(e)))
            return
        where = stores.location
        failures = tuple(stores.backend.errors)
        try:
            await stores.open(wait=REDIS_WAIT)
        except StoreUnavailable as e:
            result.append(CommandError(str(e)))  # it names the store
            await stores.close()
            return
        try:
            result.append(await command(args, stores))
        except CommandError as e:
            result.append(e)
        except (SpoolError, StoreUnavailable, *failures) as e:
            result.append(CommandError(f"{where}: {e}"))
        except BaseException:
            result.append(Failure())
        finally:
            await stores.close()

    try:
        react(work)
    except SystemExit as e:
        if e.code not in (0, None) and not result:
            # react logged the failure already (closing the stores failed).
            raise CommandError("the stores did not close cleanly") from None
    if not result:  # interrupted (SIGINT/SIGTERM) before the command finished
        raise CommandError("interrupted")
    outcome = result[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _write(output: Output) -> None:
    if output.note:
        sys.stderr.write(output.note + "\n")
        sys.stderr.flush()
    if isinstance(output.stdout, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(output.stdout)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(output.stdout)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``sendarix`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    sink_args = _sink_arguments(arguments)
    if sink_args is not None:
        from sendarix.cli import sink

        return sink.main(sink_args)

    parser = _build_parser()
    try:
        args = parser.parse_args(arguments)
    except _UsageError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    except SystemExit as e:  # --help and --version print and exit 0
        return e.code if isinstance(e.code, int) else 0
    try:
        config = resolve_config(args.config)
    except ConfigError as e:
        _error(f"configuration error: {e}")
        return 1
    try:
        if hasattr(args, "plain"):
            output = args.plain(args, config)
        else:
            output = _run_with_stores(config, args.store, args)
        _write(output)
    except CommandError as e:
        _error(str(e))
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): not worth a traceback.  Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception:
        Failure().printTraceback(sys.stderr)
        _error("internal error (traceback above)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
