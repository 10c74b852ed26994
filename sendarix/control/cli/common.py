"""What every command group shares: output, argument types, the parser class and
the node secret."""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn

from attrs import frozen

from sendarix.config.errors import ConfigError
from sendarix.config.secret import NodeSecret, SecretError, node_secret_from_env
from sendarix.config.settings import Config
from sendarix.config.units import parse_duration
from sendarix.model.credential import SCOPES
from sendarix.model.event import parse_timestamp as parse_rfc3339
from sendarix.model.suppression import normalize_address
from sendarix.stores.backends import Stores

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


def format_when(ts: float | None) -> str:
    """A timestamp to the second for tables (``-`` when unknown)."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2)


def text_lines(*parts: str) -> Output:
    return Output("\n".join(parts) + "\n")


# -- argument types (argparse turns ArgumentTypeError into a usage error) ---------------

# Tenant names follow the config file's names, so `[tenant.NAME]` and credentials agree.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def tenant_arg(text: str) -> str:
    if not TENANT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"bad tenant {text!r}: letters, digits, '.', '_' and '-', at most 64"
        )
    return text


def domain_arg(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    labels = domain.split(".")
    if not domain or len(domain) > 253 or not all(DNS_LABEL.fullmatch(x) for x in labels):
        raise argparse.ArgumentTypeError(f"bad domain {text!r}: expected one like example.com")
    return domain


def network_arg(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad network {text!r}: expected an address or a CIDR like 10.0.0.0/8"
        ) from None


def scopes_arg(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip().lower() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - SCOPES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scope {', '.join(unknown)} (choose from {', '.join(sorted(SCOPES))})"
        )
    if not scopes:
        raise argparse.ArgumentTypeError("name at least one scope")
    return scopes


def address_arg(text: str) -> str:
    try:
        return normalize_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


NUMBER = re.compile(r"\s*\d+(\.\d*)?\s*")


def parse_time(text: str, now: float) -> float:
    """POSIX seconds from an RFC 3339 time, POSIX seconds, or a duration with a unit
    (``"1h"``, ``"30m"``, ``"2d"``) meaning that long before ``now``.  ValueError when
    it is none of them."""
    if NUMBER.fullmatch(text):
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


def duration_arg(text: str) -> float:
    try:
        return parse_duration(text, "--ttl")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def time_arg(text: str) -> float:
    try:
        return parse_time(text, time.time())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def node_secret(config: Config) -> NodeSecret:
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




class UsageError(Exception):
    """A command line argparse refused."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def reply_text(reply: Any) -> str:
    """A reply as one line (``-`` for none)."""
    if reply is None:
        return "-"
    return " ".join(str(p) for p in (reply.code, reply.enhanced, reply.text) if p)
