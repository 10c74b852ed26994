"""How one TOML value becomes one configuration value: the parsers of every kind of
setting (names, hosts, durations, sizes, endpoint descriptions, spool URLs, nested
tables), and the generic builder that walks a TOML table against a value class.

Every setting is an attrs field whose metadata names its parser (:func:`setting`);
:func:`build` rejects unknown keys, parses each value and fails with a
:class:`~sendarix.config.errors.ConfigError` naming the full dotted key.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from attrs import NOTHING, field, frozen

from sendarix.config.errors import ConfigError
from sendarix.config.units import (
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)
from sendarix.model.event import EVENT_TYPES

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# -- parsers ------------------------------------------------------------------------
#
# A parser turns one raw TOML value into its config value or raises ConfigError for
# ``key``.  ``Context`` carries what some parsers need besides the value.


@frozen
class Context:
    """What parsers need besides the value: the folder relative paths resolve against,
    and the checks to run on a value once it is built (by class)."""

    base_dir: str
    checks: Mapping[type, Callable[[Any, str], None]] = field(factory=dict)


Parser = Callable[[Any, str, Context], Any]

PARSE_KEY = "sendarix.config.settings.parse"
TOML_KEY = "sendarix.config.settings.toml_key"
ABSENT_KEY = "sendarix.config.settings.absent"


def setting(
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
    metadata = {PARSE_KEY: parse, TOML_KEY: toml_key, ABSENT_KEY: absent}
    if factory is not None:
        return field(factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def type_name(value: object) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def string_parser(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def boolean_parser(value: Any, key: str, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def integer_parser(low: int, high: int | None = None) -> Parser:
    def parse(value: Any, key: str, ctx: Context) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(key, f"must be {allowed}, got {value}")
        return value

    return parse


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count:
    a container or ``taskset`` may allow fewer)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def auto_workers() -> int:
    """The worker count ``auto`` (and an unset count under ``twistd``) means: one per
    usable CPU, at most 256 like any count."""
    return min(256, usable_cpus())


def workers_parser(value: Any, key: str, ctx: Context) -> int:
    """A worker process count: an integer from 1 to 256, or ``"auto"`` for one per
    usable CPU."""
    if value == "auto":
        return auto_workers()
    if isinstance(value, str):
        raise ConfigError(key, f'expected an integer or "auto", got {value!r}')
    return integer_parser(1, 256)(value, key, ctx)


def share_parser(value: Any, key: str, ctx: Context) -> float:
    """A share: a fraction (``0.003``) or a percentage string (``"0.3%"``), 0 to 1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ConfigError(
                key, f"expected a share like 0.003 or \"0.3%\", got {value!r}"
            ) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        share = float(value)
    else:
        raise ConfigError(key, f"expected a share like 0.003 or \"0.3%\", got {value!r}")
    if not 0 <= share <= 1:
        raise ConfigError(key, f"must be between 0 and 1 (0% and 100%), got {value!r}")
    return share


def duration_parser(positive: bool = True) -> Parser:
    def parse(value: Any, key: str, ctx: Context) -> float:
        seconds = parse_duration(value, key)
        if positive and seconds <= 0:
            raise ConfigError(key, f"must be greater than zero, got {value!r}")
        return seconds

    return parse


def size_parser(low: int) -> Parser:
    def parse(value: Any, key: str, ctx: Context) -> int:
        size = parse_size(value, key)
        if size < low:
            raise ConfigError(key, f"must be at least {format_size(low)}, got {value!r}")
        return size

    return parse


def choice_parser(*allowed: str, aliases: Mapping[str, str] | None = None) -> Parser:
    aliases = dict(aliases or {})

    def parse(value: Any, key: str, ctx: Context) -> str:
        # `min_version = 1.3` (a TOML float) is an easy slip; compare its text.
        text = str(value) if isinstance(value, int | float) else value
        if isinstance(text, str):
            text = aliases.get(text.strip().lower(), text.strip().lower())
            if text in allowed:
                return text
        choices = ", ".join(f'"{a}"' for a in allowed)
        raise ConfigError(key, f"expected one of {choices}, got {value!r}")

    return parse


def list_parser(item: Parser, *, nonempty: bool = False, single: bool = False) -> Parser:
    """A TOML list parsed item by item (``key[i]``) into a tuple; ``single`` also takes
    one bare value as a list of one."""

    def parse(value: Any, key: str, ctx: Context) -> tuple[Any, ...]:
        if single and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type_name(value)}")
        if nonempty and not value:
            raise ConfigError(key, "must not be empty")
        return tuple(item(v, f"{key}[{i}]", ctx) for i, v in enumerate(value))

    return parse


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def name_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    if not _NAME.fullmatch(text):
        raise ConfigError(
            key, f"expected a name of letters, digits, '.', '_' and '-', got {value!r}"
        )
    return text


def env_name_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    if not _ENV_NAME.fullmatch(text):
        raise ConfigError(
            key, f"expected the name of an environment variable (not its value), got {value!r}"
        )
    return text


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def hostname_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    if not _is_hostname(text):
        raise ConfigError(key, f"expected a host name like mail.example.com, got {value!r}")
    return text


def host_parser(value: Any, key: str, ctx: Context) -> str:
    """A host name or an IP address (smarthost endpoints)."""
    text = string_parser(value, key, ctx)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return hostname_parser(text, key, ctx)


def domain_parser(value: Any, key: str, ctx: Context) -> str:
    return hostname_parser(value, key, ctx).lower().rstrip(".")


def suffix_parser(value: Any, key: str, ctx: Context) -> str:
    # "google.com" and ".google.com" mean the same: match at a label boundary.
    text = value.strip().lstrip(".") if isinstance(value, str) else value
    return domain_parser(text, key, ctx)


def ip_parser(value: Any, key: str, ctx: Context) -> str:
    try:
        return str(ipaddress.ip_address(string_parser(value, key, ctx)))
    except ValueError:
        raise ConfigError(key, f"expected an IPv4 or IPv6 address, got {value!r}") from None


def network_parser(value: Any, key: str, ctx: Context) -> IPNetwork:
    try:
        return ipaddress.ip_network(string_parser(value, key, ctx))
    except ValueError as e:
        raise ConfigError(
            key, f"expected a network like 10.0.0.0/8 or 2001:db8::/32, got {value!r} ({e})"
        ) from None


def path_parser(value: Any, key: str, ctx: Context) -> str:
    return _resolve(ctx.base_dir, string_parser(value, key, ctx))


def _resolve(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def rate_parser(value: Any, key: str, ctx: Context) -> str:
    parse_rate(value, key)
    return str(value).strip()


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def enhanced_code_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    if not _ENHANCED.fullmatch(text):
        raise ConfigError(key, f'expected an enhanced status code like "5.2.2", got {value!r}')
    return text


def date_parser(value: Any, key: str, ctx: Context) -> datetime.date:
    # TOML has a date type (start = 2025-01-31); a quoted string is fine too.
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ConfigError(key, f"expected a date like 2025-01-31, got {value!r}")


def http_url_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL, got {value!r}")
    return text


def _event_type(value: Any, key: str, ctx: Context) -> str:
    return choice_parser(*EVENT_TYPES, "*")(value, key, ctx)


def events_parser(value: Any, key: str, ctx: Context) -> tuple[str, ...]:
    names = list_parser(_event_type, nonempty=True, single=True)(value, key, ctx)
    if "*" in names:
        return EVENT_TYPES
    return tuple(dict.fromkeys(names))


def split_host_port(text: str, key: str, default_port: int | None) -> tuple[str, int | None]:
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


def nameserver_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    host, _ = split_host_port(text, key, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            key,
            f'expected an IP address with optional port ("127.0.0.1:5353", "[::1]:53"), '
            f"got {value!r}",
        ) from None
    return text


def table_parser(cls: type, **given: Any) -> Parser:
    """A nested TOML table built into ``cls``."""

    def parse(value: Any, key: str, ctx: Context) -> Any:
        return build(cls, value, key, ctx, **given)

    return parse


def tables_parser(cls: type) -> Parser:
    """A TOML array of tables (``[[listener]]``) built into a tuple of ``cls``."""

    def parse(value: Any, key: str, ctx: Context) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ConfigError(
                key, f"expected an array of tables ([[{key}]]), got {type_name(value)}"
            )
        return tuple(build(cls, v, f"{key}[{i}]", ctx) for i, v in enumerate(value))

    return parse


def named_tables_parser(cls: type) -> Parser:
    """``[section.NAME]`` tables built into ``{NAME: cls(name=NAME, ...)}``."""

    def parse(value: Any, key: str, ctx: Context) -> dict[str, Any]:
        table = expect_table(value, key)
        out = {}
        for name, sub in table.items():
            name_parser(name, f"{key}.{name}", ctx)
            out[name] = build(cls, sub, f"{key}.{name}", ctx, name=name)
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


def server_endpoint_parser(value: Any, key: str, ctx: Context) -> str:
    """Check a Twisted server endpoint description without touching files or sockets
    (Twisted's own parser reads ``ssl:`` key files and systemd's environment), and make
    relative ``ssl:``/``unix:`` file names absolute."""
    text = string_parser(value, key, ctx)
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


def spool_url_parser(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
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
                name, _ = split_host_port(host, key, 26379)
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


# -- the builder -----------------------------------------------------------------------


def expect_table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key or "<top level>", f"expected a table, got {type_name(value)}")
    return value


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def reject_unknown(table: Mapping[str, Any], known: Mapping[str, Any], path: str) -> None:
    for k in table:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(join_key(path, k), f"unknown key{hint}")


def build(cls: type, value: Any, path: str, ctx: Context, **given: Any) -> Any:
    """Build ``cls`` from the TOML table ``value`` using its fields' parsers."""
    table = expect_table(value, path)
    settings = {
        f.metadata.get(TOML_KEY) or f.name: f for f in attrs.fields(cls) if PARSE_KEY in f.metadata
    }
    reject_unknown(table, settings, path)
    kwargs = dict(given)
    for toml_key, f in settings.items():
        key = join_key(path, toml_key)
        if toml_key in table:
            kwargs[f.name] = f.metadata[PARSE_KEY](table[toml_key], key, ctx)
        elif f.metadata.get(ABSENT_KEY, NOTHING) is not NOTHING:
            kwargs[f.name] = f.metadata[PARSE_KEY](f.metadata[ABSENT_KEY], key, ctx)
        elif f.default is NOTHING and f.name not in given:
            raise ConfigError(key, "required")
    obj = cls(**kwargs)
    check = ctx.checks.get(cls)
    if check is not None:
        check(obj, path)
    return obj
