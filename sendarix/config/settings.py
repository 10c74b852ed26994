"""Sendarix configuration: a TOML file read into frozen attrs values.

The value classes below are also the validation table: every setting is an attrs field
whose metadata names the parser for its TOML value (see :func:`_setting`).  One generic
builder walks a TOML table against a class, so unknown keys, missing keys and bad values
all fail the same way, with a :class:`ConfigError` naming the full dotted key
(``listener[0].tls``, ``pool.relay.endpoints[1].port``).  Checks that involve several keys
of one value run after it is built (``_CHECKS``); references between sections (a route
naming a pool) are checked last, on the whole :class:`Config`.

Relative paths (SQLite spool, certificates, CA file, ``ssl:``/``unix:`` endpoint files)
are resolved against the folder of the configuration file at parse time, so the values
hold absolute paths.  Secrets never appear in values: ``*_env`` keys name environment
variables that hold them.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from attrs import NOTHING, field, frozen

from sendarix.config.errors import ConfigError
from sendarix.config.units import (
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)
from sendarix.model.event import EVENT_TYPES

__all__ = [
    "APIConfig",
    "Config",
    "ConfigError",
    "DNSConfig",
    "DeliveryConfig",
    "DomainsConfig",
    "EgressSourceConfig",
    "EndpointConfig",
    "EventsConfig",
    "EVENT_TYPES",
    "LimitsConfig",
    "ListenerConfig",
    "NodeConfig",
    "PoolConfig",
    "ProviderConfig",
    "RouteConfig",
    "SimulatorConfig",
    "SpoolConfig",
    "TLSConfig",
    "TenantConfig",
    "WarmupConfig",
    "WebhookConfig",
    "default_config",
    "describe",
    "endpoint_type",
    "load_config",
    "parse_config",
    "resolve_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


#: Egress TLS policies; "required" is accepted as another word for "encrypt".
EGRESS_TLS = ("may", "encrypt", "verify")

DEFAULT_SUBMISSION: dict[str, Any] = {
    "name": "submission",
    "endpoint": "tcp:2525:interface=127.0.0.1",
    "tls": "starttls",
    "auth": "required",
}


# -- parsers ------------------------------------------------------------------------
#
# A parser turns one raw TOML value into its config value or raises ConfigError for
# ``key``.  ``_Context`` carries what some parsers need besides the value.


@frozen
class _Context:
    base_dir: str


Parser = Callable[[Any, str, _Context], Any]

_PARSE = "sendarix.config.settings.parse"
_TOML_KEY = "sendarix.config.settings.toml_key"
_ABSENT = "sendarix.config.settings.absent"


def _setting(
    parse: Parser,
    default: Any = NOTHING,
    *,
    factory: Callable[[], Any] | None = None,
    toml_key: str | None = None,
    absent: Any = NOTHING,
) -> Any:
    """An attrs field read from TOML with ``parse``.

    ``toml_key`` is the TOML name when it differs from the attribute; when the key is
    missing from the file, ``absent`` (if given) is parsed in its place, so defaults that
    hold relative paths get resolved like values from the file."""
    metadata = {_PARSE: parse, _TOML_KEY: toml_key, _ABSENT: absent}
    if factory is not None:
        return field(factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _type_name(value: object) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _string(value: Any, key: str, ctx: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _boolean(value: Any, key: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _integer(low: int, high: int | None = None) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(key, f"must be {allowed}, got {value}")
        return value

    return parse


def _duration(positive: bool = True) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> float:
        seconds = parse_duration(value, key)
        if positive and seconds <= 0:
            raise ConfigError(key, f"must be greater than zero, got {value!r}")
        return seconds

    return parse


def _size(low: int) -> Parser:
    def parse(value: Any, key: str, ctx: _Context) -> int:
        size = parse_size(value, key)
        if size < low:
            raise ConfigError(key, f"must be at least {format_size(low)}, got {value!r}")
        return size

    return parse


def _choice(*allowed: str, aliases: Mapping[str, str] | None = None) -> Parser:
    aliases = dict(aliases or {})

    def parse(value: Any, key: str, ctx: _Context) -> str:
        # `min_version = 1.3` (a TOML float) is an easy slip; compare its text.
        text = str(value) if isinstance(value, int | float) else value
        if isinstance(text, str):
            text = aliases.get(text.strip().lower(), text.strip().lower())
            if text in allowed:
                return text
        choices = ", ".join(f'"{a}"' for a in allowed)
        raise ConfigError(key, f"expected one of {choices}, got {value!r}")

    return parse


def _list(item: Parser, *, nonempty: bool = False, single: bool = False) -> Parser:
    """A TOML list parsed item by item (``key[i]``) into a tuple; ``single`` also takes
    one bare value as a list of one."""

    def parse(value: Any, key: str, ctx: _Context) -> tuple[Any, ...]:
        if single and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_type_name(value)}")
        if nonempty and not value:
            raise ConfigError(key, "must not be empty")
        return tuple(item(v, f"{key}[{i}]", ctx) for i, v in enumerate(value))

    return parse


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _name(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    if not _NAME.fullmatch(text):
        raise ConfigError(
            key, f"expected a name of letters, digits, '.', '_' and '-', got {value!r}"
        )
    return text


def _env_name(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    if not _ENV_NAME.fullmatch(text):
        raise ConfigError(
            key, f"expected the name of an environment variable (not its value), got {value!r}"
        )
    return text


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _hostname(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    if not _is_hostname(text):
        raise ConfigError(key, f"expected a host name like mail.example.com, got {value!r}")
    return text


def _host(value: Any, key: str, ctx: _Context) -> str:
    """A host name or an IP address (smarthost endpoints)."""
    text = _string(value, key, ctx)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return _hostname(text, key, ctx)


def _domain(value: Any, key: str, ctx: _Context) -> str:
    return _hostname(value, key, ctx).lower().rstrip(".")


def _suffix(value: Any, key: str, ctx: _Context) -> str:
    # "google.com" and ".google.com" mean the same: match at a label boundary.
    text = value.strip().lstrip(".") if isinstance(value, str) else value
    return _domain(text, key, ctx)


def _ip(value: Any, key: str, ctx: _Context) -> str:
    try:
        return str(ipaddress.ip_address(_string(value, key, ctx)))
    except ValueError:
        raise ConfigError(key, f"expected an IPv4 or IPv6 address, got {value!r}") from None


def _network(value: Any, key: str, ctx: _Context) -> IPNetwork:
    try:
        return ipaddress.ip_network(_string(value, key, ctx))
    except ValueError as e:
        raise ConfigError(
            key, f"expected a network like 10.0.0.0/8 or 2001:db8::/32, got {value!r} ({e})"
        ) from None


def _path(value: Any, key: str, ctx: _Context) -> str:
    return _resolve(ctx.base_dir, _string(value, key, ctx))


def _resolve(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _rate(value: Any, key: str, ctx: _Context) -> str:
    parse_rate(value, key)
    return str(value).strip()


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _enhanced_code(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    if not _ENHANCED.fullmatch(text):
        raise ConfigError(key, f'expected an enhanced status code like "5.2.2", got {value!r}')
    return text


def _date(value: Any, key: str, ctx: _Context) -> datetime.date:
    # TOML has a date type (start = 2025-01-31); a quoted string is fine too.
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ConfigError(key, f"expected a date like 2025-01-31, got {value!r}")


def _http_url(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL, got {value!r}")
    return text


def _event_type(value: Any, key: str, ctx: _Context) -> str:
    return _choice(*EVENT_TYPES, "*")(value, key, ctx)


def _events(value: Any, key: str, ctx: _Context) -> tuple[str, ...]:
    names = _list(_event_type, nonempty=True, single=True)(value, key, ctx)
    if "*" in names:
        return EVENT_TYPES
    return tuple(dict.fromkeys(names))


def _host_port(text: str, key: str, default_port: int | None) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(key, f"bad port in {text!r}: expected 1-65535")
    return host, int(port) if port is not None else default_port


def _nameserver(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    host, _ = _host_port(text, key, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            key,
            f'expected an IP address with optional port ("127.0.0.1:5353", "[::1]:53"), '
            f"got {value!r}",
        ) from None
    return text


def _table(cls: type, **given: Any) -> Parser:
    """A nested TOML table built into ``cls``."""

    def parse(value: Any, key: str, ctx: _Context) -> Any:
        return _build(cls, value, key, ctx, **given)

    return parse


def _tables(cls: type) -> Parser:
    """A TOML array of tables (``[[listener]]``) built into a tuple of ``cls``."""

    def parse(value: Any, key: str, ctx: _Context) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ConfigError(
                key, f"expected an array of tables ([[{key}]]), got {_type_name(value)}"
            )
        return tuple(_build(cls, v, f"{key}[{i}]", ctx) for i, v in enumerate(value))

    return parse


def _named_tables(cls: type) -> Parser:
    """``[section.NAME]`` tables built into ``{NAME: cls(name=NAME, ...)}``."""

    def parse(value: Any, key: str, ctx: _Context) -> dict[str, Any]:
        table = _expect_table(value, key)
        out = {}
        for name, sub in table.items():
            _name(name, f"{key}.{name}", ctx)
            out[name] = _build(cls, sub, f"{key}.{name}", ctx, name=name)
        return out

    return parse


# -- server endpoint descriptions ---------------------------------------------------


@frozen
class _EndpointSyntax:
    """What one endpoint type takes: arguments in Twisted's positional order."""

    params: tuple[str, ...]
    required: tuple[str, ...]
    ints: Mapping[str, tuple[int, int]] = field(factory=dict)
    paths: frozenset[str] = frozenset()


_ENDPOINTS: dict[str, _EndpointSyntax] = {
    "tcp": _EndpointSyntax(
        ("port", "interface", "backlog"), ("port",), {"port": (0, 65535), "backlog": (1, 65535)}
    ),
    "tcp6": _EndpointSyntax(
        ("port", "backlog", "interface"), ("port",), {"port": (0, 65535), "backlog": (1, 65535)}
    ),
    "ssl": _EndpointSyntax(
        ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog",
         "extraCertChain", "dhParameters"),
        ("port", "privateKey"),
        {"port": (0, 65535), "backlog": (1, 65535)},
        frozenset({"privateKey", "certKey", "extraCertChain", "dhParameters"}),
    ),
    "unix": _EndpointSyntax(
        ("address", "mode", "backlog", "lockfile"), ("address",),
        {"backlog": (1, 65535), "lockfile": (0, 1)}, frozenset({"address"}),
    ),
    "systemd": _EndpointSyntax(
        ("domain", "index", "name"), ("domain",), {"index": (0, 1023)}
    ),
}  # fmt: skip


def _split_endpoint(text: str) -> list[str]:
    """Split a description at unescaped colons, keeping escapes (Twisted's syntax)."""
    parts, current, escaped = [], "", False
    for c in text:
        if escaped:
            current += "\\" + c
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts.append(current)
            current = ""
        else:
            current += c
    parts.append(current + ("\\" if escaped else ""))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _escape(text: str) -> str:
    return re.sub(r"([\\:=])", r"\\\1", text)


def _server_endpoint(value: Any, key: str, ctx: _Context) -> str:
    """Check a Twisted server endpoint description without touching files or sockets
    (Twisted's own parser reads ``ssl:`` key files and systemd's environment), and make
    relative ``ssl:``/``unix:`` file names absolute."""
    text = _string(value, key, ctx)
    kinds = ", ".join(_ENDPOINTS)
    first, *rest = _split_endpoint(text)
    syntax = _ENDPOINTS.get(first.lower())
    if syntax is None:
        raise ConfigError(
            key,
            f"unknown endpoint type {first!r} in {text!r}: expected one of {kinds} "
            '(like "tcp:587" or "tcp:2525:interface=127.0.0.1")',
        )
    args: dict[str, str] = {}
    positional = True
    for i, part in enumerate(rest):
        name, eq, raw = re.fullmatch(r"((?:[^\\=]|\\.)*)(=?)(.*)", part).groups()  # type: ignore[union-attr]
        if eq:
            positional = False
            name = _unescape(name)
            if name not in syntax.params:
                raise ConfigError(
                    key,
                    f"{first} endpoint has no option {name!r} (options: "
                    f"{', '.join(syntax.params)})",
                )
        else:
            if not positional or i >= len(syntax.params):
                raise ConfigError(key, f"unexpected argument {part!r} in {text!r}")
            name, raw = syntax.params[i], part
        if name in args:
            raise ConfigError(key, f"{name!r} given twice in {text!r}")
        args[name] = _unescape(raw)
    for name in syntax.required:
        if name not in args:
            raise ConfigError(key, f"{first} endpoint needs {name!r}, got {text!r}")
    for name, (low, high) in syntax.ints.items():
        if name in args and not (args[name].isdigit() and low <= int(args[name]) <= high):
            raise ConfigError(key, f"{name} must be an integer {low}-{high}, got {args[name]!r}")
    if first == "unix" and "mode" in args and not re.fullmatch(r"[0-7]{3,4}", args["mode"]):
        raise ConfigError(key, f"mode must be octal like 660, got {args['mode']!r}")
    if first == "systemd":
        if args["domain"] not in ("INET", "INET6", "UNIX"):
            raise ConfigError(key, f"domain must be INET, INET6 or UNIX, got {args['domain']!r}")
        if ("index" in args) == ("name" in args):
            raise ConfigError(key, f"systemd endpoint needs exactly one of index or name: {text!r}")
    changed = {
        name: _resolve(ctx.base_dir, args[name])
        for name in syntax.paths
        if name in args and _resolve(ctx.base_dir, args[name]) != args[name]
    }
    if not changed:
        return text
    args.update(changed)
    return ":".join([first] + [f"{_escape(k)}={_escape(v)}" for k, v in args.items()])


def endpoint_type(description: str) -> str:
    """The type prefix of a server endpoint description: tcp, tcp6, ssl, unix, systemd."""
    return _split_endpoint(description)[0].lower()


# -- spool URLs -----------------------------------------------------------------------

_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


def _spool_url(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    expected = (
        'expected "sqlite:PATH", "redis://host:port/db", "rediss://...", '
        '"unix:///path/redis.sock" or "redis+sentinel://host:port,.../master"'
    )
    if text.startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if not path or path.startswith("//") or path == ":memory:":
            raise ConfigError(
                key,
                f'{expected}; for SQLite write "sqlite:relative/or/absolute/path.db", got {text!r}',
            )
        return "sqlite:" + _resolve(ctx.base_dir, path)
    parts = urlsplit(text)
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(key, f"{expected}, got {text!r}")
    if parts.password:
        raise ConfigError(
            key,
            "put no password in the URL: name the environment variable that holds it "
            "in spool.password_env",
        )
    try:
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("no socket path")
        elif parts.scheme == "redis+sentinel":
            hosts = parts.netloc.rpartition("@")[2]
            for host in hosts.split(","):
                name, _ = _host_port(host, key, 26379)
                if not name:
                    raise ValueError("empty sentinel host")
            if not parts.path.strip("/"):
                raise ValueError("no master name (redis+sentinel://host:26379/mymaster)")
        else:
            if not parts.hostname:
                raise ValueError("no host")
            parts.port  # noqa: B018 - raises ValueError on a bad port
            db = parts.path.strip("/")
            if db and not db.isdigit():
                raise ValueError(f"database must be a number, got {db!r}")
    except (ValueError, ConfigError) as e:
        detail = e.message if isinstance(e, ConfigError) else str(e)
        raise ConfigError(key, f"bad Redis URL {text!r}: {detail}") from None
    return text


# -- the values ---------------------------------------------------------------------


@functools.cache
def _fqdn() -> str:
    # getfqdn may do a DNS round trip; ask once per process.
    return socket.getfqdn()


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "sendarix"


@frozen
class NodeConfig:
    """This node: its name (lease owner, event ``node``), banner/EHLO hostname, the
    environment variable holding the node secret, and the number of worker processes."""

    name: str = _setting(_name, factory=_short_hostname)
    hostname: str = _setting(_hostname, factory=_fqdn)
    secret_key_env: str = _setting(_env_name, "SENDARIX_SECRET_KEY")
    workers: int = _setting(_integer(1, 256), 1)


@frozen
class SpoolConfig:
    """Where messages are kept: ``sqlite:/abs/path.db`` or a Redis URL."""

    url: str = _setting(_spool_url, "sqlite:var/spool.db", absent="sqlite:var/spool.db")
    allow_volatile: bool = _setting(_boolean, False)
    lease_time: float = _setting(_duration(), 300.0)
    password_env: str | None = _setting(_env_name, None)
    ca_file: str | None = _setting(_path, None)
    wait_replicas: int = _setting(_integer(0, 16), 0)
    wait_timeout: float = _setting(_duration(), 2.0)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"redis"``."""
        return "sqlite" if self.url.startswith("sqlite:") else "redis"

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite database file (absolute), or None for a Redis spool."""
        if self.backend != "sqlite":
            return None
        return os.path.abspath(self.url[len("sqlite:") :])


@frozen
class ListenerConfig:
    """One SMTP listener: a Twisted server endpoint and its TLS and AUTH policy."""

    name: str = field(metadata={_PARSE: _name})
    endpoint: str = field(metadata={_PARSE: _server_endpoint})
    tls: str = _setting(_choice("none", "starttls", "implicit"), "starttls")
    auth: str = _setting(_choice("required", "optional", "none"), "required")
    trusted_networks: tuple[IPNetwork, ...] = _setting(_list(_network, single=True), ())
    max_connections_per_ip: int = _setting(_integer(1), 20)
    max_connections: int = _setting(_integer(1), 1000)
    tenant: str = _setting(_name, "default")
    #: New connections per client address (e.g. "120/min"); None: no rate limit.
    connection_rate_per_ip: str | None = _setting(_rate, None)

    @property
    def connection_rate(self) -> tuple[float, float] | None:
        """``(count, period_seconds)`` from ``connection_rate_per_ip``, or None."""
        rate = self.connection_rate_per_ip
        return parse_rate(rate, f"listener.{self.name}.connection_rate_per_ip") if rate else None

    @property
    def endpoint_type(self) -> str:
        """tcp, tcp6, ssl, unix or systemd."""
        return endpoint_type(self.endpoint)

    @property
    def wrap_tls(self) -> bool:
        """True when we must wrap the endpoint in TLS ourselves (implicit TLS on a plain
        socket); ``ssl:`` endpoints are TLS already."""
        return self.tls == "implicit" and self.endpoint_type != "ssl"


@frozen
class TLSConfig:
    """Server certificate for STARTTLS and implicit TLS on plain endpoints; None for
    both means a self-signed pair generated on first start."""

    certificate: str | None = _setting(_path, None)
    key: str | None = _setting(_path, None)
    min_version: str = _setting(_choice("1.2", "1.3"), "1.2")


@frozen
class LimitsConfig:
    """Ingress limits; the minimums are those RFC 5321 requires a server to accept."""

    max_message_size: int = _setting(_size(1024), 52428800)
    max_recipients: int = _setting(_integer(1), 1000)
    command_timeout: float = _setting(_duration(), 300.0)
    data_timeout: float = _setting(_duration(), 600.0)
    max_line_length: int = _setting(_integer(1000), 1000)
    max_command_length: int = _setting(_integer(512), 512)
    auth_max_failures: int = _setting(_integer(1), 5)
    auth_failure_window: float = _setting(_duration(), 300.0)
    auth_lockout: float = _setting(_duration(), 900.0)
    #: Recipients per authenticated credential (e.g. "1000/min"); None: no cap.
    credential_recipient_rate: str | None = _setting(_rate, None)

    @property
    def recipient_rate(self) -> tuple[float, float] | None:
        """``(count, period_seconds)`` from ``credential_recipient_rate``, or None."""
        rate = self.credential_recipient_rate
        return parse_rate(rate, "limits.credential_recipient_rate") if rate else None


_EGRESS_TLS = _choice(*EGRESS_TLS, aliases={"required": "encrypt"})


@frozen
class DeliveryConfig:
    """Egress behaviour: retry timing, MX port, timeouts, TLS policy, bounce handling."""

    retry_schedule: tuple[float, ...] = _setting(
        _list(_duration(), nonempty=True), (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    )
    max_lifetime: float = _setting(_duration(), 5 * 86400.0)
    greylist_retry: float = _setting(_duration(), 300.0)
    mx_port: int = _setting(_integer(1, 65535), 25)
    connect_timeout: float = _setting(_duration(), 5.0)
    command_timeout: float = _setting(_duration(), 300.0)
    max_messages_per_connection: int = _setting(_integer(1), 100)
    tls: str = _setting(_EGRESS_TLS, "may")
    ca_file: str | None = _setting(_path, None)
    soft_bounce_codes: tuple[str, ...] = _setting(_list(_enhanced_code, single=True), ("5.2.2",))
    concurrency: int = _setting(_integer(1), 20)
    hard_bounce_suppresses: bool = _setting(_boolean, True)
    bounce_rules: str | None = _setting(_path, None)


@frozen
class DNSConfig:
    """Resolver settings; no nameservers means the system's (/etc/resolv.conf)."""

    nameservers: tuple[str, ...] = _setting(_list(_nameserver, single=True), ())
    cache_ttl_max: float = _setting(_duration(positive=False), 3600.0)
    timeout: float = _setting(_duration(), 5.0)

    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The nameservers as ``(ip, port)`` pairs (port 53 unless given)."""
        out = []
        for text in self.nameservers:
            host, port = _host_port(text, "dns.nameservers", 53)
            out.append((host, port or 53))
        return tuple(out)


_MATCH_KEYS: dict[str, Parser] = {
    "recipient_domain": _list(_domain, nonempty=True, single=True),
    "sender_domain": _list(_domain, nonempty=True, single=True),
    "tenant": _list(_name, nonempty=True, single=True),
    "tag": _list(_string, nonempty=True, single=True),
    "stream": _list(_string, nonempty=True, single=True),
}


def _match(value: Any, key: str, ctx: _Context) -> dict[str, tuple[str, ...]]:
    table = _expect_table(value, key)
    _reject_unknown(table, _MATCH_KEYS, key)
    return {k: _MATCH_KEYS[k](v, f"{key}.{k}", ctx) for k, v in table.items()}


def _via(value: Any, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    if text in ("mx", "simulator"):
        return text
    if text.startswith("pool:"):
        return "pool:" + _name(text[5:], key, ctx)
    raise ConfigError(key, f'expected "mx", "simulator" or "pool:NAME", got {value!r}')


@frozen
class RouteConfig:
    """A routing rule; all match keys must match (each against any of its values), an
    empty match matches everything.  First matching rule wins."""

    match: dict[str, tuple[str, ...]] = _setting(_match, factory=dict)
    via: str = _setting(_via, "mx")
    egress_pool: str | None = _setting(_name, None)

    @property
    def pool(self) -> str | None:
        """The endpoint pool name of a ``pool:NAME`` route, else None."""
        return self.via[5:] if self.via.startswith("pool:") else None


@frozen
class EndpointConfig:
    """One smarthost of a pool; None for tls/username/password_env means the pool's."""

    host: str = field(metadata={_PARSE: _host})
    port: int = _setting(_integer(1, 65535), 25)
    priority: int = _setting(_integer(0), 10)
    weight: int = _setting(_integer(1), 1)
    tls: str | None = _setting(_EGRESS_TLS, None)
    username: str | None = _setting(_string, None)
    password_env: str | None = _setting(_env_name, None)


def _pool_endpoint(value: Any, key: str, ctx: _Context) -> EndpointConfig:
    if isinstance(value, str):
        host, port = _host_port(value.strip(), key, 25)
        return EndpointConfig(host=_host(host, key, ctx), port=port or 25)
    return _build(EndpointConfig, value, key, ctx)


@frozen
class PoolConfig:
    """A smarthost pool: endpoints tried by priority (lower first), weight sharing
    traffic among equal priorities; a failing endpoint rests for ``cooldown``."""

    name: str
    endpoints: tuple[EndpointConfig, ...] = field(
        metadata={_PARSE: _list(_pool_endpoint, nonempty=True)}
    )
    tls: str = _setting(_EGRESS_TLS, "may")
    username: str | None = _setting(_string, None)
    password_env: str | None = _setting(_env_name, None)
    cooldown: float = _setting(_duration(), 60.0)


@frozen
class ProviderConfig:
    """A mailbox provider recognised by MX host suffix, with its connection limits."""

    name: str
    mx_suffixes: tuple[str, ...] = field(
        metadata={_PARSE: _list(_suffix, nonempty=True, single=True)}
    )
    max_connections: int = _setting(_integer(1), 10)
    max_connections_per_source: int | None = _setting(_integer(1), None)
    messages_per_connection: int = _setting(_integer(1), 100)
    rate: str | None = _setting(_rate, None)
    tls: str = _setting(_EGRESS_TLS, "may")

    @property
    def rate_limit(self) -> tuple[float, float] | None:
        """``(count, period_seconds)`` from ``rate``, or None."""
        return parse_rate(self.rate, f"provider.{self.name}.rate") if self.rate else None

    def matches(self, mx_host: str) -> bool:
        """True when ``mx_host`` ends with one of the suffixes at a label boundary."""
        host = mx_host.lower().rstrip(".")
        return any(host == s or host.endswith("." + s) for s in self.mx_suffixes)


@frozen
class WarmupConfig:
    """A warming IP's schedule: day N after ``start`` may send ``daily[N]`` messages per
    provider; after the list ends the IP is warm."""

    start: datetime.date = field(metadata={_PARSE: _date})
    daily: tuple[int, ...] = field(metadata={_PARSE: _list(_integer(1), nonempty=True)})

    def cap(self, today: datetime.date) -> int | None:
        """Messages allowed per provider on ``today``; None once warm (no cap)."""
        day = (today - self.start).days
        if day < 0:
            return self.daily[0]
        return self.daily[day] if day < len(self.daily) else None


@frozen
class EgressSourceConfig:
    """A local address mail is sent from, with its EHLO name, tier (1 = best), pool."""

    name: str = field(metadata={_PARSE: _name})
    address: str = field(metadata={_PARSE: _ip})
    ehlo: str | None = _setting(_hostname, None)
    tier: int = _setting(_integer(1), 1)
    pool: str = _setting(_name, "default")
    warmup: WarmupConfig | None = _setting(_table(WarmupConfig), None)


def _egress(value: Any, key: str, ctx: _Context) -> tuple[EgressSourceConfig, ...]:
    table = _expect_table(value, key)
    _reject_unknown(table, {"source": None}, key)
    return _tables(EgressSourceConfig)(table.get("source", []), f"{key}.source", ctx)  # type: ignore[no-any-return]


@frozen
class DomainsConfig:
    """Sending-domain policy."""

    require_verified_domains: bool = _setting(_boolean, False)


@frozen
class TenantConfig:
    """Per-tenant settings; tenants not configured get these defaults."""

    name: str
    egress_pool: str | None = _setting(_name, None)
    rate: str | None = _setting(_rate, None)
    suppress_hard_bounces: bool = _setting(_boolean, True)

    @property
    def rate_limit(self) -> tuple[float, float] | None:
        """``(count, period_seconds)`` from ``rate``, or None."""
        return parse_rate(self.rate, f"tenant.{self.name}.rate") if self.rate else None


@frozen
class APIConfig:
    """The HTTP API listener (bind it to an internal address)."""

    endpoint: str = _setting(_server_endpoint, "tcp:8025:interface=127.0.0.1")
    enabled: bool = _setting(_boolean, True)


@frozen
class WebhookConfig:
    """A webhook from the configuration file (more are added with the CLI or API)."""

    url: str = field(metadata={_PARSE: _http_url})
    tenant: str = _setting(_name, "default")
    events: tuple[str, ...] = _setting(_events, EVENT_TYPES)
    secret_env: str | None = _setting(_env_name, None)


@frozen
class SimulatorConfig:
    """The simulator's domain: mail to it is never sent out."""

    domain: str = _setting(_domain, "simulator.sendarix.invalid")


@frozen
class EventsConfig:
    """Delivery log retention and whether events are also logged as JSON lines."""

    retention: float = _setting(_duration(), 30 * 86400.0)
    json_log: bool = _setting(_boolean, True)


def _default_listeners() -> tuple[ListenerConfig, ...]:
    return (ListenerConfig(**DEFAULT_SUBMISSION),)


def _section(cls: type) -> Any:
    return _setting(_table(cls), factory=cls, absent={})


@frozen
class Config:
    """The whole configuration.  ``base_dir`` is the folder relative paths were resolved
    against; ``source`` the file read (None for the built-in default)."""

    base_dir: str
    source: str | None = None
    node: NodeConfig = _section(NodeConfig)
    spool: SpoolConfig = _section(SpoolConfig)
    listeners: tuple[ListenerConfig, ...] = _setting(
        _tables(ListenerConfig),
        factory=_default_listeners,
        toml_key="listener",
        absent=[DEFAULT_SUBMISSION],
    )
    tls: TLSConfig = _section(TLSConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    delivery: DeliveryConfig = _section(DeliveryConfig)
    dns: DNSConfig = _section(DNSConfig)
    routes: tuple[RouteConfig, ...] = _setting(_tables(RouteConfig), (), toml_key="route")
    pools: dict[str, PoolConfig] = _setting(
        _named_tables(PoolConfig), factory=dict, toml_key="pool"
    )
    providers: dict[str, ProviderConfig] = _setting(
        _named_tables(ProviderConfig), factory=dict, toml_key="provider"
    )
    egress_sources: tuple[EgressSourceConfig, ...] = _setting(_egress, (), toml_key="egress")
    domains: DomainsConfig = _section(DomainsConfig)
    tenants: dict[str, TenantConfig] = _setting(
        _named_tables(TenantConfig), factory=dict, toml_key="tenant"
    )
    api: APIConfig = _section(APIConfig)
    webhooks: tuple[WebhookConfig, ...] = _setting(_tables(WebhookConfig), (), toml_key="webhook")
    simulator: SimulatorConfig = _section(SimulatorConfig)
    events: EventsConfig = _section(EventsConfig)

    @property
    def var_dir(self) -> str:
        """Folder for state the relay creates itself (generated certificates, ...)."""
        return os.path.join(self.base_dir, "var")

    @property
    def egress_pools(self) -> dict[str, tuple[EgressSourceConfig, ...]]:
        """Egress sources grouped by pool name."""
        pools: dict[str, list[EgressSourceConfig]] = {}
        for source in self.egress_sources:
            pools.setdefault(source.pool, []).append(source)
        return {name: tuple(sources) for name, sources in pools.items()}

    def tenant(self, name: str) -> TenantConfig:
        """The settings of tenant ``name`` (defaults when it has no ``[tenant.NAME]``)."""
        return self.tenants.get(name) or TenantConfig(name=name)


# -- the builder -----------------------------------------------------------------------


def _expect_table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key or "<top level>", f"expected a table, got {_type_name(value)}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _reject_unknown(table: Mapping[str, Any], known: Mapping[str, Any], path: str) -> None:
    for k in table:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(_join(path, k), f"unknown key{hint}")


def _build(cls: type, value: Any, path: str, ctx: _Context, **given: Any) -> Any:
    """Build ``cls`` from the TOML table ``value`` using its fields' parsers."""
    table = _expect_table(value, path)
    settings = {
        f.metadata.get(_TOML_KEY) or f.name: f for f in attrs.fields(cls) if _PARSE in f.metadata
    }
    _reject_unknown(table, settings, path)
    kwargs = dict(given)
    for toml_key, f in settings.items():
        key = _join(path, toml_key)
        if toml_key in table:
            kwargs[f.name] = f.metadata[_PARSE](table[toml_key], key, ctx)
        elif f.metadata.get(_ABSENT, NOTHING) is not NOTHING:
            kwargs[f.name] = f.metadata[_PARSE](f.metadata[_ABSENT], key, ctx)
        elif f.default is NOTHING and f.name not in given:
            raise ConfigError(key, "required")
    obj = cls(**kwargs)
    check = _CHECKS.get(cls)
    if check is not None:
        check(obj, path)
    return obj


def _check_listener(listener: ListenerConfig, path: str) -> None:
    kind = listener.endpoint_type
    if kind == "ssl" and listener.tls != "implicit":
        raise ConfigError(
            _join(path, "tls"), 'an ssl: endpoint is TLS from the start: set tls = "implicit"'
        )
    if listener.tls == "implicit" and kind == "unix":
        raise ConfigError(
            _join(path, "tls"), '"implicit" needs a tcp, tcp6, ssl or systemd endpoint'
        )
    if listener.auth == "required" and listener.tls == "none":
        raise ConfigError(
            _join(path, "auth"),
            'credentials are never accepted over plaintext: with tls = "none" '
            'use auth = "none" and trusted_networks, or enable TLS',
        )
    if listener.auth == "none" and not listener.trusted_networks:
        raise ConfigError(
            _join(path, "trusted_networks"),
            'with auth = "none" this listener would refuse every '
            "client: list the networks it accepts mail from",
        )
    if listener.max_connections_per_ip > listener.max_connections:
        raise ConfigError(
            _join(path, "max_connections_per_ip"),
            f"must not exceed max_connections ({listener.max_connections})",
        )


def _check_tls(tls: TLSConfig, path: str) -> None:
    if (tls.certificate is None) != (tls.key is None):
        missing = "key" if tls.key is None else "certificate"
        raise ConfigError(
            _join(path, missing), "certificate and key go together: set both or neither"
        )


def _check_pool(pool: PoolConfig, path: str) -> None:
    for i, ep in enumerate(pool.endpoints):
        username = ep.username or pool.username
        password_env = ep.password_env or pool.password_env
        if (username is None) != (password_env is None):
            missing = "password_env" if password_env is None else "username"
            raise ConfigError(
                f"{path}.endpoints[{i}].{missing}",
                "username and password_env go together (here or on the pool)",
            )


_CHECKS: dict[type, Callable[[Any, str], None]] = {
    ListenerConfig: _check_listener,
    TLSConfig: _check_tls,
    PoolConfig: _check_pool,
}


def _unique(names: list[str], key: Callable[[int], str], what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(key(i), f"duplicate {what} {name!r}")
        seen.add(name)


def _check_references(config: Config) -> None:
    """Checks between sections, once every section is valid on its own."""
    _unique([x.name for x in config.listeners], lambda i: f"listener[{i}].name", "listener name")
    _unique(
        [x.name for x in config.egress_sources],
        lambda i: f"egress.source[{i}].name",
        "egress source name",
    )
    pools = ", ".join(sorted(config.pools)) or "none defined"
    egress_pools = config.egress_pools
    egress_names = ", ".join(sorted(egress_pools)) or "none: no [[egress.source]]"
    for i, route in enumerate(config.routes):
        if route.pool is not None and route.pool not in config.pools:
            raise ConfigError(f"route[{i}].via", f"no [pool.{route.pool}] (pools: {pools})")
        if route.egress_pool is not None and route.egress_pool not in egress_pools:
            raise ConfigError(
                f"route[{i}].egress_pool",
                f"no egress source has pool = {route.egress_pool!r} (egress pools: {egress_names})",
            )
    for name, tenant in config.tenants.items():
        if tenant.egress_pool is not None and tenant.egress_pool not in egress_pools:
            raise ConfigError(
                f"tenant.{name}.egress_pool",
                f"no egress source has pool = {tenant.egress_pool!r} "
                f"(egress pools: {egress_names})",
            )


# -- entry points -------------------------------------------------------------------


def parse_config(data: Mapping[str, Any], base_dir: str, source: str | None = None) -> Config:
    """Validate parsed TOML ``data`` into a :class:`Config`; relative paths resolve
    against ``base_dir``.  Raises :class:`ConfigError` naming the first bad key."""
    base_dir = os.path.abspath(base_dir)
    config: Config = _build(
        Config, dict(data), "", _Context(base_dir), base_dir=base_dir, source=source
    )
    _check_references(config)
    return config


def load_config(path: str) -> Config:
    """Read and validate the TOML file at ``path``; its folder is the base directory."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, f"cannot read the configuration file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"invalid TOML: {e}") from None
    return parse_config(data, os.path.dirname(path), source=path)


def default_config(base_dir: str | None = None) -> Config:
    """The built-in development configuration: SQLite spool under ``base_dir/var``,
    submission on 127.0.0.1:2525 with STARTTLS, API on 127.0.0.1:8025."""
    return parse_config({}, base_dir if base_dir is not None else os.getcwd())


def resolve_config(path: str | None) -> Config:
    """``path`` when given, else ``./sendarix.toml`` when present, else the default."""
    if path is not None:
        return load_config(path)
    if os.path.isfile("sendarix.toml"):
        return load_config("sendarix.toml")
    return default_config()


def describe(config: Config) -> str:
    """A human summary of the effective configuration (``sendarix config check``)."""
    d = format_duration
    lines = [f"configuration: {config.source or 'built-in development default'}"]
    lines.append(f"base directory: {config.base_dir}")
    node = config.node
    lines.append(
        f"node: {node.name} (hostname {node.hostname}, {node.workers} worker(s), "
        f"secret from ${node.secret_key_env})"
    )
    spool = config.spool
    where = f"SQLite {spool.sqlite_path}" if spool.sqlite_path else f"Redis {spool.url}"
    volatile = ", volatile Redis allowed" if spool.allow_volatile else ""
    lines.append(f"spool: {where} (lease {d(spool.lease_time)}{volatile})")
    if not config.listeners:
        lines.append("listeners: none (delivery-only node)")
    for lst in config.listeners:
        trusted = ", ".join(str(n) for n in lst.trusted_networks) or "none"
        lines.append(
            f"listener {lst.name}: {lst.endpoint} tls={lst.tls} auth={lst.auth} "
            f"tenant={lst.tenant} trusted={trusted} "
            f"max_connections={lst.max_connections} per_ip={lst.max_connections_per_ip}"
            + (f" rate_per_ip={lst.connection_rate_per_ip}" if lst.connection_rate_per_ip else "")
        )
    tls = config.tls
    cert = (
        f"{tls.certificate} / {tls.key}"
        if tls.certificate
        else f"self-signed, generated under {config.var_dir}"
    )
    lines.append(f"tls: {cert}, TLS {tls.min_version} or newer")
    lim = config.limits
    lines.append(
        f"limits: message {format_size(lim.max_message_size)}, {lim.max_recipients} recipients, "
        f"command timeout {d(lim.command_timeout)}, data timeout {d(lim.data_timeout)}, "
        f"line {lim.max_line_length}, command {lim.max_command_length}, "
        f"auth lockout after {lim.auth_max_failures} failures in "
        f"{d(lim.auth_failure_window)} for {d(lim.auth_lockout)}"
        + (f", recipients per credential {lim.credential_recipient_rate}"
           if lim.credential_recipient_rate else "")
    )
    dl = config.delivery
    lines.append(
        f"delivery: retry {', '.join(d(s) for s in dl.retry_schedule)} (last repeats), "
        f"lifetime {d(dl.max_lifetime)}, greylist retry {d(dl.greylist_retry)}, "
        f"MX port {dl.mx_port}, tls={dl.tls}, {dl.concurrency} connections per destination"
    )
    servers = ", ".join(config.dns.nameservers) or "system resolver"
    lines.append(f"dns: {servers}")
    lines.append(
        f"routing: {len(config.routes)} route(s), pools: {', '.join(config.pools) or 'none'}, "
        f"providers: {', '.join(config.providers) or 'none'}"
    )
    egress = ", ".join(f"{name} ({len(sources)})" for name, sources in config.egress_pools.items())
    lines.append(f"egress: {egress or 'system address'}")
    lines.append(
        f"domains: {'only verified' if config.domains.require_verified_domains else 'any'} "
        "sender domains"
    )
    lines.append(f"tenants configured: {', '.join(config.tenants) or 'none'}")
    api = config.api
    lines.append(f"api: {api.endpoint}" if api.enabled else "api: disabled")
    lines.append(f"webhooks in file: {len(config.webhooks)}")
    lines.append(f"simulator: {config.simulator.domain}")
    json_log = "on" if config.events.json_log else "off"
    lines.append(f"events: kept {d(config.events.retention)}, JSON log {json_log}")
    return "\n".join(lines)
