"""Sendarix configuration: the frozen values a TOML file is read into.

The value classes below are also the validation table: every setting is an attrs field
whose metadata names the parser for its TOML value (see
:func:`sendarix.config.fields.setting`).  One generic builder walks a TOML table against
a class, so unknown keys, missing keys and bad values all fail the same way, with a
:class:`ConfigError` naming the full dotted key (``listener[0].tls``,
``pool.relay.endpoints[1].port``).  Checks that involve several keys of one value run
after it is built, and references between sections (a route naming a pool) last, on
the whole :class:`Config` (:mod:`sendarix.config.loader`).

Relative paths (SQLite spool, certificates, CA file, ``ssl:``/``unix:`` endpoint files)
are resolved against the folder of the configuration file at parse time, so the values
hold absolute paths.  Secrets never appear in values: ``*_env`` keys name environment
variables that hold them.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import os
import socket
from typing import Any

from attrs import field, frozen

from sendarix.config.errors import ConfigError
from sendarix.config.fields import (
    PARSE_KEY,
    Context,
    Parser,
    boolean_parser,
    build,
    choice_parser,
    date_parser,
    domain_parser,
    duration_parser,
    endpoint_type,
    enhanced_code_parser,
    env_name_parser,
    events_parser,
    expect_table,
    host_parser,
    hostname_parser,
    http_url_parser,
    integer_parser,
    ip_parser,
    list_parser,
    name_parser,
    named_tables_parser,
    nameserver_parser,
    network_parser,
    path_parser,
    rate_parser,
    reject_unknown,
    server_endpoint_parser,
    setting,
    share_parser,
    size_parser,
    split_host_port,
    spool_url_parser,
    string_parser,
    suffix_parser,
    table_parser,
    tables_parser,
    workers_parser,
)
from sendarix.config.units import (
    parse_rate,
)
from sendarix.model.event import EVENT_TYPES
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


#: Egress TLS policies; "required" is accepted as another word for "encrypt".
EGRESS_TLS = ("may", "encrypt", "verify")

#: The content filters a ``filters`` list may name (docs/filtering.md).
FILTERS = ("pass", "rspamd")

_FILTER_NAMES = list_parser(choice_parser(*FILTERS), single=True)


def _filters(value: Any, key: str, ctx: Context) -> tuple[str, ...]:
    names: tuple[str, ...] = _FILTER_NAMES(value, key, ctx)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{key}[{i}]", f"{name!r} is listed twice")
    return names


DEFAULT_SUBMISSION: dict[str, Any] = {
    "name": "submission",
    "endpoint": "tcp:2525:interface=127.0.0.1",
    "tls": "starttls",
    "auth": "required",
}


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
    environment variable holding the node secret, the number of worker processes and
    where they run."""

    name: str = setting(name_parser, factory=_short_hostname)
    hostname: str = setting(hostname_parser, factory=_fqdn)
    secret_key_env: str = setting(env_name_parser, "SENDARIX_SECRET_KEY")
    #: Worker processes; None (not set): one per usable CPU under ``twistd``, and one
    #: process for a node embedded in another service (it cannot start workers).
    workers: int | None = setting(workers_parser, None)
    #: ``"auto"``: each worker process keeps to a CPU of its own (see
    #: :mod:`sendarix.node.affinity`); ``"none"``: the kernel moves them freely.
    cpu_affinity: str = setting(choice_parser("auto", "none"), "auto")

    @property
    def processes(self) -> int:
        """How many processes share this node's work, as this process runs it:
        ``workers``, or one when it is not set (``twistd`` sets it before it builds a
        node, so only an embedded node, one process, gets here without it)."""
        return self.workers or 1


@frozen
class SpoolConfig:
    """Where messages are kept: ``sqlite:/abs/path.db`` or a Redis URL."""

    url: str = setting(spool_url_parser, "sqlite:var/spool.db", absent="sqlite:var/spool.db")
    allow_volatile: bool = setting(boolean_parser, False)
    lease_time: float = setting(duration_parser(), 300.0)
    password_env: str | None = setting(env_name_parser, None)
    ca_file: str | None = setting(path_parser, None)
    wait_replicas: int = setting(integer_parser(0, 16), 0)
    wait_timeout: float = setting(duration_parser(), 2.0)

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

    name: str = field(metadata={PARSE_KEY: name_parser})
    endpoint: str = field(metadata={PARSE_KEY: server_endpoint_parser})
    tls: str = setting(choice_parser("none", "starttls", "implicit"), "starttls")
    auth: str = setting(choice_parser("required", "optional", "none"), "required")
    trusted_networks: tuple[IPNetwork, ...] = setting(list_parser(network_parser, single=True), ())
    max_connections_per_ip: int = setting(integer_parser(1), 20)
    max_connections: int = setting(integer_parser(1), 1000)
    tenant: str = setting(name_parser, "default")
    #: New connections per client address (e.g. "120/min"); None: no rate limit.
    connection_rate_per_ip: str | None = setting(rate_parser, None)
    #: The content filters of mail taken in here, in order; None: ``[filtering]``'s.
    filters: tuple[str, ...] | None = setting(_filters, None)

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

    certificate: str | None = setting(path_parser, None)
    key: str | None = setting(path_parser, None)
    min_version: str = setting(choice_parser("1.2", "1.3"), "1.2")


@frozen
class LimitsConfig:
    """Ingress limits; the minimums are those RFC 5321 requires a server to accept."""

    max_message_size: int = setting(size_parser(1024), 52428800)
    max_recipients: int = setting(integer_parser(1), 1000)
    command_timeout: float = setting(duration_parser(), 300.0)
    data_timeout: float = setting(duration_parser(), 600.0)
    max_line_length: int = setting(integer_parser(1000), 1000)
    max_command_length: int = setting(integer_parser(512), 512)
    auth_max_failures: int = setting(integer_parser(1), 5)
    auth_failure_window: float = setting(duration_parser(), 300.0)
    auth_lockout: float = setting(duration_parser(), 900.0)
    #: Recipients per authenticated credential (e.g. "1000/min"); None: no cap.
    credential_recipient_rate: str | None = setting(rate_parser, None)

    @property
    def recipient_rate(self) -> tuple[float, float] | None:
        """``(count, period_seconds)`` from ``credential_recipient_rate``, or None."""
        rate = self.credential_recipient_rate
        return parse_rate(rate, "limits.credential_recipient_rate") if rate else None


_EGRESS_TLS = choice_parser(*EGRESS_TLS, aliases={"required": "encrypt"})


@frozen
class DeliveryConfig:
    """Egress behaviour: retry timing, MX port, timeouts, TLS policy, bounce handling."""

    retry_schedule: tuple[float, ...] = setting(
        list_parser(duration_parser(), nonempty=True),
        (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
    )
    max_lifetime: float = setting(duration_parser(), 5 * 86400.0)
    greylist_retry: float = setting(duration_parser(), 300.0)
    #: How long a site whose connections keep failing is suspended (its mail deferred
    #: without connecting) before one probe connection is tried.
    dead_site_suspension: float = setting(duration_parser(), 300.0)
    #: How long a site that refused every session with 421 three times in a row is
    #: paused.
    rate_limit_pause: float = setting(duration_parser(), 60.0)
    mx_port: int = setting(integer_parser(1, 65535), 25)
    connect_timeout: float = setting(duration_parser(), 5.0)
    command_timeout: float = setting(duration_parser(), 300.0)
    max_messages_per_connection: int = setting(integer_parser(1), 100)
    tls: str = setting(_EGRESS_TLS, "may")
    ca_file: str | None = setting(path_parser, None)
    soft_bounce_codes: tuple[str, ...] = setting(
        list_parser(enhanced_code_parser, single=True), ("5.2.2",)
    )
    concurrency: int = setting(integer_parser(1), 20)
    #: While other clients are sending, fresh mail for a site waits up to this long
    #: for ``gather_messages`` messages to share one outgoing session ("0s": never).
    gather_time: float = setting(duration_parser(positive=False), 0.05)
    gather_messages: int = setting(integer_parser(1), 20)
    hard_bounce_suppresses: bool = setting(boolean_parser, True)
    bounce_rules: str | None = setting(path_parser, None)


@frozen
class DNSConfig:
    """Resolver settings; no nameservers means the system's (/etc/resolv.conf)."""

    nameservers: tuple[str, ...] = setting(list_parser(nameserver_parser, single=True), ())
    cache_ttl_max: float = setting(duration_parser(positive=False), 3600.0)
    timeout: float = setting(duration_parser(), 5.0)

    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The nameservers as ``(ip, port)`` pairs (port 53 unless given)."""
        out = []
        for text in self.nameservers:
            host, port = split_host_port(text, "dns.nameservers", 53)
            out.append((host, port or 53))
        return tuple(out)


_MATCH_KEYS: dict[str, Parser] = {
    "recipient_domain": list_parser(domain_parser, nonempty=True, single=True),
    "sender_domain": list_parser(domain_parser, nonempty=True, single=True),
    "tenant": list_parser(name_parser, nonempty=True, single=True),
    "tag": list_parser(string_parser, nonempty=True, single=True),
    "stream": list_parser(string_parser, nonempty=True, single=True),
}


def _match(value: Any, key: str, ctx: Context) -> dict[str, tuple[str, ...]]:
    table = expect_table(value, key)
    reject_unknown(table, _MATCH_KEYS, key)
    return {k: _MATCH_KEYS[k](v, f"{key}.{k}", ctx) for k, v in table.items()}


def _via(value: Any, key: str, ctx: Context) -> str:
    text = string_parser(value, key, ctx)
    if text in ("mx", "simulator"):
        return text
    if text.startswith("pool:"):
        return "pool:" + name_parser(text[5:], key, ctx)
    raise ConfigError(key, f'expected "mx", "simulator" or "pool:NAME", got {value!r}')


@frozen
class RouteConfig:
    """A routing rule; all match keys must match (each against any of its values), an
    empty match matches everything.  First matching rule wins."""

    match: dict[str, tuple[str, ...]] = setting(_match, factory=dict)
    via: str = setting(_via, "mx")
    egress_pool: str | None = setting(name_parser, None)

    @property
    def pool(self) -> str | None:
        """The endpoint pool name of a ``pool:NAME`` route, else None."""
        return self.via[5:] if self.via.startswith("pool:") else None


@frozen
class EndpointConfig:
    """One smarthost of a pool; None for tls/username/password_env means the pool's."""

    host: str = field(metadata={PARSE_KEY: host_parser})
    port: int = setting(integer_parser(1, 65535), 25)
    priority: int = setting(integer_parser(0), 10)
    weight: int = setting(integer_parser(1), 1)
    tls: str | None = setting(_EGRESS_TLS, None)
    username: str | None = setting(string_parser, None)
    password_env: str | None = setting(env_name_parser, None)


def _pool_endpoint(value: Any, key: str, ctx: Context) -> EndpointConfig:
    if isinstance(value, str):
        host, port = split_host_port(value.strip(), key, 25)
        return EndpointConfig(host=host_parser(host, key, ctx), port=port or 25)
    return build(EndpointConfig, value, key, ctx)


@frozen
class PoolConfig:
    """A smarthost pool: endpoints tried by priority (lower first), weight sharing
    traffic among equal priorities; a failing endpoint rests for ``cooldown``."""

    name: str
    endpoints: tuple[EndpointConfig, ...] = field(
        metadata={PARSE_KEY: list_parser(_pool_endpoint, nonempty=True)}
    )
    tls: str = setting(_EGRESS_TLS, "may")
    username: str | None = setting(string_parser, None)
    password_env: str | None = setting(env_name_parser, None)
    cooldown: float = setting(duration_parser(), 60.0)


@frozen
class ProviderConfig:
    """A mailbox provider recognised by MX host suffix, with its connection limits."""

    name: str
    mx_suffixes: tuple[str, ...] = field(
        metadata={PARSE_KEY: list_parser(suffix_parser, nonempty=True, single=True)}
    )
    max_connections: int = setting(integer_parser(1), 10)
    max_connections_per_source: int | None = setting(integer_parser(1), None)
    messages_per_connection: int = setting(integer_parser(1), 100)
    rate: str | None = setting(rate_parser, None)
    tls: str = setting(_EGRESS_TLS, "may")

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

    start: datetime.date = field(metadata={PARSE_KEY: date_parser})
    daily: tuple[int, ...] = field(
        metadata={PARSE_KEY: list_parser(integer_parser(1), nonempty=True)}
    )

    def cap(self, today: datetime.date) -> int | None:
        """Messages allowed per provider on ``today``; None once warm (no cap)."""
        day = (today - self.start).days
        if day < 0:
            return self.daily[0]
        return self.daily[day] if day < len(self.daily) else None


@frozen
class EgressSourceConfig:
    """A local address mail is sent from, with its EHLO name, tier (1 = best), pool."""

    name: str = field(metadata={PARSE_KEY: name_parser})
    address: str = field(metadata={PARSE_KEY: ip_parser})
    ehlo: str | None = setting(hostname_parser, None)
    tier: int = setting(integer_parser(1), 1)
    pool: str = setting(name_parser, "default")
    warmup: WarmupConfig | None = setting(table_parser(WarmupConfig), None)


def _egress(value: Any, key: str, ctx: Context) -> tuple[EgressSourceConfig, ...]:
    table = expect_table(value, key)
    reject_unknown(table, {"source": None}, key)
    return tables_parser(EgressSourceConfig)(table.get("source", []), f"{key}.source", ctx)  # type: ignore[no-any-return]


@frozen
class DomainsConfig:
    """Sending-domain policy."""

    require_verified_domains: bool = setting(boolean_parser, False)


@frozen
class TenantConfig:
    """Per-tenant settings; tenants not configured get these defaults."""

    name: str
    egress_pool: str | None = setting(name_parser, None)
    rate: str | None = setting(rate_parser, None)
    #: Messages the tenant may submit per day (a rolling day), all nodes' counting
    #: where limits are shared.
    quota: int | None = setting(integer_parser(1), None)
    suppress_hard_bounces: bool = setting(boolean_parser, True)
    #: Send DSNs for final failures when the client did not say (NOTIFY) whether it
    #: wants them; applications usually follow events and webhooks instead.
    dsn: bool = setting(boolean_parser, False)
    #: A domain (its MX at Sendarix) for VERP envelope senders, so that bounces
    #: coming back later reach the node rather than the sender's mailbox.
    return_path_domain: str | None = setting(domain_parser, None)
    #: The share of complaints over recent deliveries the tenant should stay under
    #: (0.3 %: what large mailbox providers publish as their limit).
    max_complaint_rate: float = setting(share_parser, 0.003)
    #: The content filters of this tenant's mail, in order; None: the listener's.
    filters: tuple[str, ...] | None = setting(_filters, None)

    @property
    def rate_limit(self) -> tuple[float, float] | None:
        """``(count, period_seconds)`` from ``rate``, or None."""
        return parse_rate(self.rate, f"tenant.{self.name}.rate") if self.rate else None


@frozen
class FilteringConfig:
    """The content filters of mail whose tenant and listener name none."""

    filters: tuple[str, ...] = setting(_filters, ())


@frozen
class RspamdConfig:
    """The rspamd filter: where rspamd's normal worker listens, how long a check may
    take, and what happens to a message when rspamd does not answer in time."""

    url: str = setting(http_url_parser, "http://127.0.0.1:11333")
    timeout: float = setting(duration_parser(), 10.0)
    on_error: str = setting(choice_parser("accept", "defer"), "accept")


@frozen
class APIConfig:
    """The HTTP API listener (bind it to an internal address)."""

    endpoint: str = setting(server_endpoint_parser, "tcp:8025:interface=127.0.0.1")
    enabled: bool = setting(boolean_parser, True)
    #: Serve HTTPS with the listeners' ``[tls]`` certificate (reloaded with it).
    tls: bool = setting(boolean_parser, False)


@frozen
class WebhookConfig:
    """A webhook endpoint: where a tenant's events of the listed types are POSTed.

    ``retry_schedule`` lists when each attempt is due, in seconds after the first
    (docs/webhooks.md); ``name`` keys the endpoint's queue in the outbox (by default
    the tenant and a digest of the URL, so reordering the file changes nothing).
    """

    url: str = field(metadata={PARSE_KEY: http_url_parser})
    tenant: str = setting(name_parser, "default")
    events: tuple[str, ...] = setting(events_parser, EVENT_TYPES)
    secret_env: str | None = setting(env_name_parser, None)
    retry_schedule: tuple[float, ...] = setting(
        list_parser(duration_parser(positive=False), nonempty=True), STANDARD_RETRY_SCHEDULE
    )
    name: str | None = setting(name_parser, None)

    @property
    def endpoint_name(self) -> str:
        """``name``, or ``<tenant>-<8 hex digits of the URL's SHA-256>``."""
        if self.name is not None:
            return self.name
        return f"{self.tenant}-{hashlib.sha256(self.url.encode()).hexdigest()[:8]}"


@frozen
class WebhooksConfig:
    """What every webhook shares: whether private destinations are allowed."""

    allow_private: bool = setting(boolean_parser, False)


@frozen
class FeedbackConfig:
    """Domains whose mail is a report (ARF complaint, delivery status) to read, never
    to relay: every listener accepts it from any client."""

    domains: tuple[str, ...] = setting(list_parser(domain_parser), ())

    def is_feedback(self, address: str) -> bool:
        """Is ``address`` at one of the feedback domains?"""
        return bool(self.domains) and address.rpartition("@")[2].lower().rstrip(".") in (
            self.domains
        )


def report_domains(config: Config) -> frozenset[str]:
    """Every domain whose mail is a report: ``[feedback] domains`` and the tenants'
    ``return_path_domain``."""
    return frozenset(config.feedback.domains) | frozenset(
        t.return_path_domain for t in config.tenants.values() if t.return_path_domain
    )


@frozen
class SimulatorConfig:
    """The simulator's domain: mail to it is never sent out."""

    domain: str = setting(domain_parser, "simulator.sendarix.invalid")


@frozen
class EventsConfig:
    """Delivery log retention and whether events are also logged as JSON lines."""

    retention: float = setting(duration_parser(), 30 * 86400.0)
    json_log: bool = setting(boolean_parser, True)


def _default_listeners() -> tuple[ListenerConfig, ...]:
    return (ListenerConfig(**DEFAULT_SUBMISSION),)


def _section(cls: type) -> Any:
    return setting(table_parser(cls), factory=cls, absent={})


@frozen
class Config:
    """The whole configuration.  ``base_dir`` is the folder relative paths were resolved
    against; ``source`` the file read (None for the built-in default)."""

    base_dir: str
    source: str | None = None
    node: NodeConfig = _section(NodeConfig)
    spool: SpoolConfig = _section(SpoolConfig)
    listeners: tuple[ListenerConfig, ...] = setting(
        tables_parser(ListenerConfig),
        factory=_default_listeners,
        toml_key="listener",
        absent=[DEFAULT_SUBMISSION],
    )
    tls: TLSConfig = _section(TLSConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    delivery: DeliveryConfig = _section(DeliveryConfig)
    dns: DNSConfig = _section(DNSConfig)
    routes: tuple[RouteConfig, ...] = setting(tables_parser(RouteConfig), (), toml_key="route")
    pools: dict[str, PoolConfig] = setting(
        named_tables_parser(PoolConfig), factory=dict, toml_key="pool"
    )
    providers: dict[str, ProviderConfig] = setting(
        named_tables_parser(ProviderConfig), factory=dict, toml_key="provider"
    )
    egress_sources: tuple[EgressSourceConfig, ...] = setting(_egress, (), toml_key="egress")
    domains: DomainsConfig = _section(DomainsConfig)
    tenants: dict[str, TenantConfig] = setting(
        named_tables_parser(TenantConfig), factory=dict, toml_key="tenant"
    )
    api: APIConfig = _section(APIConfig)
    webhooks: tuple[WebhookConfig, ...] = setting(
        tables_parser(WebhookConfig), (), toml_key="webhook"
    )
    webhook_options: WebhooksConfig = setting(
        table_parser(WebhooksConfig), factory=WebhooksConfig, absent={}, toml_key="webhooks"
    )
    feedback: FeedbackConfig = _section(FeedbackConfig)
    simulator: SimulatorConfig = _section(SimulatorConfig)
    events: EventsConfig = _section(EventsConfig)
    filtering: FilteringConfig = _section(FilteringConfig)
    rspamd: RspamdConfig = _section(RspamdConfig)

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
