"""Reading the configuration: the checks that involve several keys of one section or
several sections, and the entry points (:func:`load_config`, :func:`parse_config`,
:func:`resolve_config`, :func:`default_config`, :func:`describe`)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from sendarix.config.errors import ConfigError
from sendarix.config.fields import (
    Context,
    build,
    join_key,
)
from sendarix.config.settings import (
    Config,
    ListenerConfig,
    PoolConfig,
    TLSConfig,
    WebhookConfig,
)
from sendarix.config.units import (
    format_duration,
    format_size,
)


def _check_listener(listener: ListenerConfig, path: str) -> None:
    kind = listener.endpoint_type
    if kind == "ssl" and listener.tls != "implicit":
        raise ConfigError(
            join_key(path, "tls"), 'an ssl: endpoint is TLS from the start: set tls = "implicit"'
        )
    if listener.tls == "implicit" and kind == "unix":
        raise ConfigError(
            join_key(path, "tls"), '"implicit" needs a tcp, tcp6, ssl or systemd endpoint'
        )
    if listener.auth == "required" and listener.tls == "none":
        raise ConfigError(
            join_key(path, "auth"),
            'credentials are never accepted over plaintext: with tls = "none" '
            'use auth = "none" and trusted_networks, or enable TLS',
        )
    if listener.auth == "none" and not listener.trusted_networks:
        raise ConfigError(
            join_key(path, "trusted_networks"),
            'with auth = "none" this listener would refuse every '
            "client: list the networks it accepts mail from",
        )
    if listener.max_connections_per_ip > listener.max_connections:
        raise ConfigError(
            join_key(path, "max_connections_per_ip"),
            f"must not exceed max_connections ({listener.max_connections})",
        )


def _check_tls(tls: TLSConfig, path: str) -> None:
    if (tls.certificate is None) != (tls.key is None):
        missing = "key" if tls.key is None else "certificate"
        raise ConfigError(
            join_key(path, missing), "certificate and key go together: set both or neither"
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


def _check_webhook(webhook: WebhookConfig, path: str) -> None:
    schedule = webhook.retry_schedule
    for i in range(1, len(schedule)):
        if schedule[i] < schedule[i - 1]:
            raise ConfigError(
                f"{join_key(path, 'retry_schedule')}[{i}]",
                "attempts are counted from the first one: each entry is at least the one before",
            )


CHECKS: dict[type, Callable[[Any, str], None]] = {
    ListenerConfig: _check_listener,
    TLSConfig: _check_tls,
    PoolConfig: _check_pool,
    WebhookConfig: _check_webhook,
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
    _unique(
        [x.endpoint_name for x in config.webhooks], lambda i: f"webhook[{i}].name", "webhook name"
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
    config: Config = build(
        Config, dict(data), "", Context(base_dir, CHECKS), base_dir=base_dir, source=source
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
        f"node: {node.name} (hostname {node.hostname}, "
        f"{node.workers or 'auto: one per CPU,'} worker(s), "
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
        f"dead sites suspended {d(dl.dead_site_suspension)}, "
        f"421 pause {d(dl.rate_limit_pause)}, "
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
    hooks = ", ".join(f"{w.endpoint_name} ({w.tenant})" for w in config.webhooks) or "none"
    private = ", private destinations allowed" if config.webhook_options.allow_private else ""
    lines.append(f"webhooks: {hooks}{private}")
    lines.append(f"simulator: {config.simulator.domain}")
    chains = [f"default [{', '.join(config.filtering.filters)}]"]
    chains += [f"listener {x.name} [{', '.join(x.filters)}]"
               for x in config.listeners if x.filters is not None]
    chains += [f"tenant {name} [{', '.join(t.filters)}]"
               for name, t in config.tenants.items() if t.filters is not None]
    lines.append("filters: " + ", ".join(chains))
    rs = config.rspamd
    lines.append(f"rspamd: {rs.url} (timeout {d(rs.timeout)}, on error {rs.on_error})")
    json_log = "on" if config.events.json_log else "off"
    lines.append(f"events: kept {d(config.events.retention)}, JSON log {json_log}")
    return "\n".join(lines)
