"""Configuration: units, defaults, validation errors that name the key, path resolution,
the sample file, and how the CLI and plugin pick a configuration file."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tomllib
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from sendarix.config import fields as config_fields
from sendarix.config import settings as config_module
from sendarix.config.errors import ConfigError
from sendarix.config.errors import ConfigError as BaseConfigError
from sendarix.config.loader import (
    default_config,
    describe,
    load_config,
    parse_config,
    resolve_config,
)
from sendarix.config.settings import (
    EVENT_TYPES,
    Config,
    EndpointConfig,
    ListenerConfig,
    SpoolConfig,
)
from sendarix.config.units import (
    DURATION_UNITS,
    SIZE_UNITS,
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE
from tests.support.paths import REPO_ROOT

SAMPLE = os.path.join(
    REPO_ROOT, "etc", "sendarix.toml"
)
BASE = "/srv/sendarix"


def parse(text: str, base_dir: str = BASE) -> Config:
    """Parse a TOML snippet as a configuration file in ``base_dir``."""
    return parse_config(tomllib.loads(text), base_dir)


class UnitsTests(SynchronousTestCase):
    """Durations, sizes and rates as written in the file."""

    def test_duration_examples(self) -> None:
        """Each unit the design names parses to seconds; numbers are seconds."""
        cases: dict[Any, float] = {
            "500ms": 0.5, "30s": 30, "5m": 300, "4h": 14400, "5d": 432000, "1.5h": 5400,
            "30": 30, 30: 30, 2.5: 2.5, " 10 s ": 10, "2w": 1209600, "5min": 300,
        }  # fmt: skip
        for text, seconds in cases.items():
            self.assertEqual(parse_duration(text, "k"), seconds, text)

    def test_duration_errors(self) -> None:
        """Unknown units, negative values, booleans and lists fail naming the key."""
        for bad in ["soon", "5 parsecs", "-5s", "", "1e3s", True, [1], None, "5m3"]:
            with self.assertRaises(ConfigError, msg=repr(bad)) as cm:
                parse_duration(bad, "delivery.max_lifetime")
            self.assertEqual(cm.exception.key, "delivery.max_lifetime")
            self.assertIn(repr(bad), cm.exception.message)

    def test_size_examples(self) -> None:
        """Decimal and binary units, bytes and plain numbers."""
        cases: dict[Any, int] = {
            "50MiB": 52428800, "10MB": 10_000_000, "512KiB": 524288, "1GiB": 1 << 30,
            "100": 100, 100: 100, "100B": 100, "1.5KiB": 1536, "2kb": 2000,
        }  # fmt: skip
        for text, size in cases.items():
            self.assertEqual(parse_size(text, "k"), size, text)

    def test_size_errors(self) -> None:
        """Unknown units, fractions of a byte count as float, negatives, booleans fail."""
        for bad in ["abc", "50M", "10 furlongs", -1, "-1", 1.5, False, ""]:
            with self.assertRaises(ConfigError, msg=repr(bad)) as cm:
                parse_size(bad, "limits.max_message_size")
            self.assertEqual(cm.exception.key, "limits.max_message_size")

    def test_rates(self) -> None:
        """Rates parse to (count, period seconds); plurals are fine; bad ones fail."""
        self.assertEqual(parse_rate("10/s", "k"), (10, 1))
        self.assertEqual(parse_rate("600/min", "k"), (600, 60))
        self.assertEqual(parse_rate("5000 / hours", "k"), (5000, 3600))
        self.assertEqual(parse_rate("100000/day", "k"), (100000, 86400))
        for bad in ["10", "0/s", "10/fortnight", "ten/s", 10]:
            with self.assertRaises(ConfigError, msg=repr(bad)):
                parse_rate(bad, "k")

    def test_config_error_shape(self) -> None:
        """ConfigError is a ValueError carrying key and message; str() joins them."""
        e = ConfigError("listener[0].tls", "bad")
        self.assertIs(ConfigError, BaseConfigError)
        self.assertIsInstance(e, ValueError)
        self.assertEqual(
            (e.key, e.message, str(e)), ("listener[0].tls", "bad", "listener[0].tls: bad")
        )

    @settings(max_examples=200)
    @given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(DURATION_UNITS)))
    def test_duration_round_trip(self, amount: int, unit: str) -> None:
        """An integer with any unit parses to amount times the unit's seconds."""
        self.assertAlmostEqual(
            parse_duration(f"{amount}{unit}", "k"), amount * DURATION_UNITS[unit], delta=1e-6
        )

    @settings(max_examples=200)
    @given(st.floats(min_value=0, max_value=1e7, allow_nan=False).map(lambda f: round(f, 3)))
    def test_format_duration_round_trip(self, seconds: float) -> None:
        """format_duration writes something parse_duration reads back to the same value."""
        self.assertAlmostEqual(parse_duration(format_duration(seconds), "k"), seconds, delta=1e-6)

    @settings(max_examples=200)
    @given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(SIZE_UNITS)))
    def test_size_round_trip(self, amount: int, unit: str) -> None:
        """An integer with any unit (any case) parses to amount times the unit's bytes."""
        written = {"kib": "KiB", "mib": "MiB", "gib": "GiB"}.get(unit, unit.upper())
        self.assertEqual(parse_size(f"{amount}{written}", "k"), amount * SIZE_UNITS[unit])

    @settings(max_examples=200)
    @given(st.integers(min_value=0, max_value=1 << 40))
    def test_format_size_round_trip(self, size: int) -> None:
        """format_size writes something parse_size reads back to the same byte count."""
        self.assertEqual(parse_size(format_size(size), "k"), size)


class DefaultsTests(SynchronousTestCase):
    """The built-in development default and per-key defaults."""

    def test_default_config(self) -> None:
        """SQLite spool under base_dir/var, one STARTTLS submission listener on
        127.0.0.1:2525, API on 127.0.0.1:8025, no certificate configured."""
        c = default_config(BASE)
        self.assertEqual(c.base_dir, BASE)
        self.assertIsNone(c.source)
        self.assertEqual(c.spool.url, "sqlite:/srv/sendarix/var/spool.db")
        self.assertEqual(c.spool.sqlite_path, "/srv/sendarix/var/spool.db")
        self.assertEqual(c.spool.backend, "sqlite")
        self.assertEqual(
            c.listeners,
            (ListenerConfig(name="submission", endpoint="tcp:2525:interface=127.0.0.1",
                            tls="starttls", auth="required"),),
        )  # fmt: skip
        self.assertEqual(c.api.endpoint, "tcp:8025:interface=127.0.0.1")
        self.assertTrue(c.api.enabled)
        self.assertEqual((c.tls.certificate, c.tls.key, c.tls.min_version), (None, None, "1.2"))
        self.assertEqual(c.var_dir, "/srv/sendarix/var")

    def test_default_base_dir_is_cwd(self) -> None:
        """Without a base directory the default resolves against the working folder."""
        self.assertEqual(default_config().base_dir, os.getcwd())

    def test_documented_defaults(self) -> None:
        """The defaults docs/configuration.md promises operators."""
        c = default_config(BASE)
        self.assertFalse(c.spool.allow_volatile)
        self.assertEqual(c.spool.lease_time, 300)
        self.assertEqual(c.limits.max_message_size, 52428800)
        self.assertEqual(c.limits.max_recipients, 1000)
        self.assertEqual(c.limits.max_command_length, 512)
        self.assertEqual(c.limits.max_line_length, 1000)
        self.assertEqual(
            (c.limits.auth_max_failures, c.limits.auth_failure_window, c.limits.auth_lockout),
            (5, 300, 900),
        )
        self.assertEqual(c.listeners[0].max_connections_per_ip, 20)
        self.assertEqual(c.listeners[0].max_connections, 1000)
        self.assertEqual(c.listeners[0].tenant, "default")
        self.assertEqual(c.delivery.retry_schedule, (60, 300, 900, 1800, 3600, 7200, 14400))
        self.assertEqual(c.delivery.max_lifetime, 5 * 86400)
        self.assertEqual(c.delivery.greylist_retry, 300)
        self.assertEqual((c.delivery.mx_port, c.delivery.connect_timeout), (25, 5))
        self.assertEqual(c.delivery.tls, "may")
        self.assertEqual(c.delivery.soft_bounce_codes, ("5.2.2",))
        self.assertEqual((c.delivery.gather_time, c.delivery.gather_messages), (0.05, 20))
        self.assertFalse(c.domains.require_verified_domains)
        self.assertEqual(c.node.secret_key_env, "SENDARIX_SECRET_KEY")
        self.assertEqual(c.simulator.domain, "simulator.sendarix.invalid")
        self.assertEqual(c.events.retention, 30 * 86400)
        self.assertEqual(c.tenant("acme").suppress_hard_bounces, True)
        self.assertEqual((c.routes, c.pools, c.providers, c.egress_sources), ((), {}, {}, ()))

    def test_empty_file_is_the_default(self) -> None:
        """An empty file means the same as no file, and Config() directly has the same
        values apart from unresolved paths."""
        self.assertEqual(parse("", BASE), default_config(BASE))
        direct = Config(base_dir=BASE)
        self.assertEqual(
            attrs.evolve(direct, spool=default_config(BASE).spool), default_config(BASE)
        )

    def test_no_listener_gets_default_but_empty_list_means_none(self) -> None:
        """Without [[listener]] the submission default applies; ``listener = []`` is a
        delivery-only node."""
        self.assertEqual(parse("[limits]\nmax_recipients = 5\n").listeners[0].name, "submission")
        self.assertEqual(parse("listener = []\n").listeners, ())

    def test_listener_defaults(self) -> None:
        """A listener needs only name and endpoint: STARTTLS, AUTH required."""
        lst = parse('[[listener]]\nname = "a"\nendpoint = "tcp:587"\n').listeners[0]
        self.assertEqual((lst.tls, lst.auth, lst.trusted_networks), ("starttls", "required", ()))


class ParsedValuesTests(SynchronousTestCase):
    """What valid values turn into."""

    def test_units_in_sections(self) -> None:
        """Sizes and durations are accepted with units or as plain numbers."""
        c = parse(
            '[limits]\nmax_message_size = "10MB"\ncommand_timeout = "90s"\ndata_timeout = 120\n'
            '[delivery]\nretry_schedule = ["30s", 120, "1.5h"]\nmax_lifetime = "2d"\n'
        )
        self.assertEqual(c.limits.max_message_size, 10_000_000)
        self.assertEqual((c.limits.command_timeout, c.limits.data_timeout), (90, 120))
        self.assertEqual(c.delivery.retry_schedule, (30, 120, 5400))
        self.assertEqual(c.delivery.max_lifetime, 172800)

    def test_workers_auto(self) -> None:
        """``workers = "auto"`` is one worker per CPU this process may use."""
        self.assertEqual(parse('[node]\nworkers = "auto"\n').node.workers,
                         len(os.sched_getaffinity(0)))
        self.assertEqual(parse("[node]\nworkers = 3\n").node.workers, 3)

    def test_cpu_affinity(self) -> None:
        """Workers keep to a CPU each unless told otherwise."""
        self.assertEqual(parse("").node.cpu_affinity, "auto")
        self.assertEqual(parse('[node]\ncpu_affinity = "none"\n').node.cpu_affinity, "none")
        self.assertEqual(parse('[node]\ncpu_affinity = "Auto"\n').node.cpu_affinity, "auto")

    def test_listener_values(self) -> None:
        """Networks become ip_network objects; a single string is a list of one."""
        c = parse(
            '[[listener]]\nname = "lan"\nendpoint = "tcp:25"\ntls = "none"\nauth = "none"\n'
            'trusted_networks = "10.0.0.0/8"\ntenant = "printers"\n'
            '[[listener]]\nname = "smtps"\nendpoint = "tcp:465"\ntls = "implicit"\n'
        )
        lan, smtps = c.listeners
        self.assertEqual(lan.trusted_networks, (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(lan.tenant, "printers")
        self.assertTrue(smtps.wrap_tls)
        self.assertFalse(lan.wrap_tls)
        self.assertEqual(smtps.endpoint_type, "tcp")

    def test_routes_and_pools(self) -> None:
        """Match values become tuples (domains lower-cased); endpoints accept tables and
        "host:port" strings."""
        c = parse(
            '[[route]]\nmatch.recipient_domain = "Example.COM"\nmatch.tag = ["a", "b"]\n'
            'via = "pool:relay"\n'
            '[pool.relay]\nendpoints = [{host = "a.example", port = 587, priority = 5}, '
            '"b.example:2525", "[::1]:26", "c.example"]\ncooldown = "2m"\n'
        )
        route = c.routes[0]
        self.assertEqual(route.match, {"recipient_domain": ("example.com",), "tag": ("a", "b")})
        self.assertEqual(route.pool, "relay")
        pool = c.pools["relay"]
        self.assertEqual(pool.name, "relay")
        self.assertEqual(pool.cooldown, 120)
        self.assertEqual(
            pool.endpoints,
            (
                EndpointConfig(host="a.example", port=587, priority=5),
                EndpointConfig(host="b.example", port=2525),
                EndpointConfig(host="::1", port=26),
                EndpointConfig(host="c.example", port=25),
            ),
        )

    def test_providers(self) -> None:
        """Suffixes are normalised and match at a label boundary; "required" TLS means
        encrypt; the rate is parsed on demand."""
        p = parse(
            '[provider.gmail]\nmx_suffixes = [".Google.com", "googlemail.com"]\n'
            'rate = "300/min"\ntls = "required"\n'
        ).providers["gmail"]
        self.assertEqual(p.mx_suffixes, ("google.com", "googlemail.com"))
        self.assertEqual(p.tls, "encrypt")
        self.assertEqual(p.rate_limit, (300, 60))
        self.assertTrue(p.matches("alt1.gmail-smtp-in.l.Google.com."))
        self.assertTrue(p.matches("google.com"))
        self.assertFalse(p.matches("notgoogle.com"))

    def test_egress_and_tenants(self) -> None:
        """Sources without a pool form "default"; warmup takes TOML dates or strings and
        caps by day; tenants and routes may name egress pools that exist."""
        c = parse(
            '[[egress.source]]\nname = "a"\naddress = "2001:DB8::1"\n'
            '[[egress.source]]\nname = "b"\naddress = "192.0.2.2"\npool = "bulk"\ntier = 2\n'
            'warmup = {start = "2025-01-01", daily = [10, 20]}\n'
            '[tenant.news]\negress_pool = "bulk"\nrate = "100/h"\n'
            '[[route]]\nvia = "mx"\negress_pool = "default"\n'
        )
        a, b = c.egress_sources
        self.assertEqual((a.address, a.pool, a.tier), ("2001:db8::1", "default", 1))
        self.assertEqual(set(c.egress_pools), {"default", "bulk"})
        assert b.warmup is not None
        self.assertEqual(b.warmup.start, datetime.date(2025, 1, 1))
        self.assertEqual(b.warmup.cap(datetime.date(2025, 1, 2)), 20)
        self.assertIsNone(b.warmup.cap(datetime.date(2025, 1, 3)))
        self.assertEqual(c.tenant("news").rate_limit, (100, 3600))
        toml_date = parse(
            '[[egress.source]]\nname = "a"\naddress = "192.0.2.1"\n'
            "warmup = {start = 2025-02-03, daily = [5]}\n"
        )
        assert toml_date.egress_sources[0].warmup is not None
        self.assertEqual(toml_date.egress_sources[0].warmup.start, datetime.date(2025, 2, 3))

    def test_webhooks_dns_spool(self) -> None:
        """ "*" subscribes to every event type; nameservers keep ports; Redis URLs pass."""
        c = parse(
            '[[webhook]]\nurl = "https://h.example/x"\nevents = ["*"]\n'
            '[dns]\nnameservers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.1", "::1"]\n'
            '[spool]\nurl = "rediss://redis.example:6380/2"\npassword_env = "REDIS_PW"\n'
        )
        self.assertEqual(c.webhooks[0].events, EVENT_TYPES)
        self.assertEqual(c.webhooks[0].tenant, "default")
        self.assertEqual(c.webhooks[0].retry_schedule, STANDARD_RETRY_SCHEDULE)
        self.assertRegex(c.webhooks[0].endpoint_name, r"^default-[0-9a-f]{8}$")
        self.assertFalse(c.webhook_options.allow_private)
        self.assertEqual(
            c.dns.addresses(),
            (("127.0.0.1", 5353), ("::1", 53), ("192.0.2.1", 53), ("::1", 53)),
        )
        self.assertEqual(c.spool.backend, "redis")
        self.assertIsNone(c.spool.sqlite_path)
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://user@host",
            "unix:///run/redis.sock?db=1",
            "redis+sentinel://s1:26379,s2:26379/mymaster/0",
        ]:
            self.assertEqual(parse(f'[spool]\nurl = "{url}"\n').spool.url, url)

    def test_accepted_endpoints_work_with_twisted(self) -> None:
        """Endpoint strings that pass validation (including rewritten ones with
        absolute paths) are understood by Twisted's own parser."""
        reactor = MemoryReactor()
        for endpoint in ["tcp:587", "tcp:0:interface=127.0.0.1", "tcp6:587:interface=\\:\\:1",
                         "unix:run/sendarix.sock:mode=660"]:  # fmt: skip
            c = parse(f"[[listener]]\nname = \"a\"\nendpoint = '{endpoint}'\n", self.mktemp())
            serverFromString(reactor, c.listeners[0].endpoint)

    def test_describe(self) -> None:
        """The summary names the source, listeners, spool file and limits."""
        c = parse(
            '[[listener]]\nname = "sub"\nendpoint = "tcp:587"\n'
            '[limits]\nmax_message_size = "25MiB"\n'
        )
        text = describe(c)
        self.assertIn("built-in development default", text)
        self.assertIn("listener sub: tcp:587 tls=starttls auth=required", text)
        self.assertIn("/srv/sendarix/var/spool.db", text)
        self.assertIn("message 25MiB", text)


class ErrorTests(SynchronousTestCase):
    """Every bad configuration fails with a ConfigError naming the full key."""

    def assertConfigError(self, text: str, key: str, *fragments: str) -> ConfigError:
        """Parsing ``text`` fails on ``key`` and the message contains ``fragments``."""
        try:
            parse(text)
        except ConfigError as caught:
            e = caught
        else:
            self.fail(f"no ConfigError for {text!r}")
        self.assertEqual(e.key, key, f"{text!r}: {e}")
        self.assertTrue(str(e).startswith(f"{key}: "))
        for fragment in fragments:
            self.assertIn(fragment, e.message, text)
        return e

    def test_bad_workers(self) -> None:
        self.assertConfigError('[node]\nworkers = "many"\n', "node.workers", "auto")
        self.assertConfigError("[node]\nworkers = 0\n", "node.workers", "between 1 and 256")
        self.assertConfigError('[node]\ncpu_affinity = "0-3"\n', "node.cpu_affinity",
                               '"auto"', '"none"')

    def test_unknown_top_level_key(self) -> None:
        """An unknown section is named, with a suggestion when one is close."""
        self.assertConfigError("[nodes]\nname = 'a'\n", "nodes", "unknown key", "'node'")
        self.assertConfigError("colour = 1\n", "colour", "unknown key")

    def test_unknown_nested_keys(self) -> None:
        """Unknown keys inside sections, lists, match tables and endpoint tables."""
        self.assertConfigError("[limits]\nmax_mesage_size = 1\n", "limits.max_mesage_size",
                               "did you mean 'max_message_size'")  # fmt: skip
        self.assertConfigError(
            '[[listener]]\nname = "a"\nendpoint = "tcp:1"\ntsl = "none"\n', "listener[0].tsl"
        )
        self.assertConfigError(
            '[[route]]\nmatch.recipent_domain = "x.example"\n', "route[0].match.recipent_domain"
        )
        self.assertConfigError(
            '[pool.relay]\nendpoints = [{host = "a.example", prt = 25}]\n',
            "pool.relay.endpoints[0].prt",
        )
        self.assertConfigError("[egress]\nsources = []\n", "egress.sources", "'source'")
        self.assertConfigError(
            '[[egress.source]]\nname = "a"\naddress = "192.0.2.1"\n'
            'warmup = {start = "2025-01-01", daily = [1], end = 3}\n',
            "egress.source[0].warmup.end",
        )

    def test_bad_size(self) -> None:
        """A size that is not one names the key, the expected form and the value."""
        self.assertConfigError(
            '[limits]\nmax_message_size = "abc"\n', "limits.max_message_size",
            "expected a size like", "50MiB", "'abc'",
        )  # fmt: skip
        self.assertConfigError("[limits]\nmax_message_size = 10\n", "limits.max_message_size",
                               "at least")  # fmt: skip

    def test_bad_duration(self) -> None:
        """Bad durations, also inside lists, name the element."""
        self.assertConfigError('[delivery]\nretry_schedule = ["1m", "soon"]\n',
                               "delivery.retry_schedule[1]", "duration", "'soon'")  # fmt: skip
        self.assertConfigError("[delivery]\nretry_schedule = []\n", "delivery.retry_schedule",
                               "empty")  # fmt: skip
        self.assertConfigError('[delivery]\nretry_schedule = ["0s"]\n',
                               "delivery.retry_schedule[0]", "greater than zero")  # fmt: skip
        self.assertConfigError('[spool]\nlease_time = "forever"\n', "spool.lease_time")

    def test_bad_enum(self) -> None:
        """Enumerations list what is allowed."""
        self.assertConfigError('[delivery]\ntls = "sometimes"\n', "delivery.tls",
                               '"may"', '"encrypt"', '"verify"')  # fmt: skip
        self.assertConfigError('[[listener]]\nname = "a"\nendpoint = "tcp:1"\nauth = "maybe"\n',
                               "listener[0].auth", '"required"', '"optional"')  # fmt: skip
        self.assertConfigError('[tls]\nmin_version = "1.0"\n', "tls.min_version", '"1.3"')

    def test_bad_cidr(self) -> None:
        """Bad networks name the list element."""
        for bad in ["10.0.0.0/33", "banana", "10.0.0.1/8"]:
            self.assertConfigError(
                f'[[listener]]\nname = "a"\nendpoint = "tcp:1"\n'
                f'trusted_networks = ["127.0.0.1", "{bad}"]\n',
                "listener[0].trusted_networks[1]", bad,
            )  # fmt: skip

    def test_bad_endpoint(self) -> None:
        """Unknown endpoint types, bad ports and unknown options are refused."""
        for bad, fragment in [
            ("tpc:587", "unknown endpoint type"),
            ("tcp:http", "port"),
            ("tcp:587:interfce=127.0.0.1", "no option 'interfce'"),
            ("ssl:465", "privateKey"),
            ("systemd:domain=INET", "index or name"),
        ]:
            self.assertConfigError(
                f'[[listener]]\nname = "a"\nendpoint = "{bad}"\ntls = "implicit"\n',
                "listener[0].endpoint", fragment,
            )  # fmt: skip
        self.assertConfigError('[api]\nendpoint = "tcp:99999"\n', "api.endpoint", "0-65535")

    def test_pool_reference_missing(self) -> None:
        """A route naming a pool that is not defined is refused, listing the pools."""
        self.assertConfigError(
            '[[route]]\nvia = "pool:nope"\n[pool.relay]\nendpoints = ["a.example"]\n',
            "route[0].via", "[pool.nope]", "relay",
        )  # fmt: skip
        self.assertConfigError('[[route]]\nvia = "smarthost"\n', "route[0].via", "pool:NAME")
        self.assertConfigError('[[route]]\negress_pool = "bulk"\n', "route[0].egress_pool")
        self.assertConfigError('[tenant.acme]\negress_pool = "bulk"\n', "tenant.acme.egress_pool")

    def test_more_errors(self) -> None:
        """Wrong types, ranges, cross-key rules and secrets: each names its key."""
        listener = '[[listener]]\nname = "a"\nendpoint = "tcp:1"\n'
        cases = [
            ("node = 3\n", "node", "table"),
            ("listener = {name = 'a'}\n", "listener", "array of tables"),
            ('[limits]\nmax_recipients = "many"\n', "limits.max_recipients", "integer"),
            ("[limits]\nmax_recipients = 0\n", "limits.max_recipients", "at least 1"),
            ("[delivery]\nmx_port = 70000\n", "delivery.mx_port", "between 1 and 65535"),
            ('[delivery]\ngather_time = "soon"\n', "delivery.gather_time", "duration"),
            ("[delivery]\ngather_messages = 0\n", "delivery.gather_messages", "at least 1"),
            ('[spool]\nallow_volatile = "yes"\n', "spool.allow_volatile", "true or false"),
            ('[spool]\nurl = "mysql://db/x"\n', "spool.url", "sqlite:PATH"),
            ('[spool]\nurl = "redis://:hunter2@h:6379/0"\n', "spool.url", "password_env"),
            ('[spool]\nurl = "redis://h:port/0"\n', "spool.url", "bad Redis URL"),
            ('[[listener]]\nendpoint = "tcp:1"\n', "listener[0].name", "required"),
            ('[[listener]]\nname = "a"\n', "listener[0].endpoint", "required"),
            (listener + listener, "listener[1].name", "duplicate"),
            (listener + 'tls = "none"\n', "listener[0].auth", "plaintext"),
            (listener + 'auth = "none"\n', "listener[0].trusted_networks", "refuse"),
            (listener + "max_connections = 5\n", "listener[0].max_connections_per_ip", "exceed"),
            ('[[listener]]\nname = "a"\nendpoint = "ssl:1:privateKey=k"\n', "listener[0].tls",
             "implicit"),
            ('[[listener]]\nname = "a"\nendpoint = "unix:s"\ntls = "implicit"\n',
             "listener[0].tls", "tcp"),
            ('[tls]\ncertificate = "c.pem"\n', "tls.key", "both or neither"),
            ('[pool.relay]\nendpoints = []\n', "pool.relay.endpoints", "empty"),
            ('[pool.relay]\ntls = "verify"\n', "pool.relay.endpoints", "required"),
            ('[pool.relay]\nendpoints = ["a.example:0"]\n', "pool.relay.endpoints[0]", "port"),
            ('[pool.relay]\nendpoints = ["a.example"]\npassword_env = "hunter2!"\n',
             "pool.relay.password_env", "environment variable"),
            ('[pool.relay]\nendpoints = [{host = "a.example", username = "u"}]\n',
             "pool.relay.endpoints[0].password_env", "go together"),
            ('[pool."bad name"]\nendpoints = ["a.example"]\n', "pool.bad name", "name"),
            ('[provider.gmail]\nmx_suffixes = ["google.com"]\nrate = "fast"\n',
             "provider.gmail.rate", "600/min"),
            ("[provider.gmail]\nmax_connections = 3\n", "provider.gmail.mx_suffixes", "required"),
            ('[provider.gmail]\nmx_suffixes = ["google.com"]\nmax_connections_per_source = 0\n',
             "provider.gmail.max_connections_per_source", "at least 1"),
            ('[[egress.source]]\nname = "a"\naddress = "300.1.1.1"\n',
             "egress.source[0].address", "IPv4 or IPv6"),
            ('[[egress.source]]\nname = "a"\naddress = "192.0.2.1"\ntier = 0\n',
             "egress.source[0].tier", "at least 1"),
            ('[[egress.source]]\nname = "a"\naddress = "192.0.2.1"\n'
             'warmup = {start = "Monday", daily = [1]}\n', "egress.source[0].warmup.start",
             "date"),
            ('[[egress.source]]\nname = "a"\naddress = "192.0.2.1"\n'
             '[[egress.source]]\nname = "a"\naddress = "192.0.2.2"\n',
             "egress.source[1].name", "duplicate"),
            ('[[webhook]]\nurl = "ftp://x"\n', "webhook[0].url", "https://"),
            ('[[webhook]]\nurl = "https://x.example"\nsecret = "whsec_x"\n',
             "webhook[0].secret", "unknown"),
            ('[[webhook]]\nurl = "https://x.example"\nretry_schedule = ["5m", "5s"]\n',
             "webhook[0].retry_schedule[1]", "at least the one before"),
            ('[[webhook]]\nurl = "https://x.example"\nretry_schedule = []\n',
             "webhook[0].retry_schedule", "empty"),
            ('[[webhook]]\nurl = "https://x.example"\n[[webhook]]\nurl = "https://x.example"\n',
             "webhook[1].name", "duplicate"),
            ('[webhooks]\nallow_private = "yes"\n', "webhooks.allow_private", "true or false"),
            ('[webhooks]\nallow_loopback = true\n', "webhooks.allow_loopback", "unknown"),
            ('[[webhook]]\nurl = "https://x.example"\nevents = ["opened"]\n',
             "webhook[0].events[0]", "delivered"),
            ('[dns]\nnameservers = ["dns.example"]\n', "dns.nameservers[0]", "IP address"),
            ('[delivery]\nsoft_bounce_codes = ["552"]\n', "delivery.soft_bounce_codes[0]", "5.2.2"),
            ('[node]\nsecret_key_env = "s3cr3t value"\n', "node.secret_key_env", "not its value"),
            ("[simulator]\ndomain = 'not a domain'\n", "simulator.domain", "host name"),
            ('[events]\nretention = "0s"\n', "events.retention", "greater than zero"),
        ]  # fmt: skip
        for text, key, fragment in cases:
            self.assertConfigError(text, key, fragment)


class PathTests(SynchronousTestCase):
    """Relative paths resolve against the configuration file's folder."""

    def test_relative_paths(self) -> None:
        """Spool file, certificate, key, CA file and endpoint files become absolute."""
        c = parse(
            '[spool]\nurl = "sqlite:data/q.db"\n'
            '[tls]\ncertificate = "tls/c.pem"\nkey = "../k.pem"\n'
            '[delivery]\nca_file = "ca.pem"\n'
            '[[listener]]\nname = "smtps"\nendpoint = "ssl:465:privateKey=k.pem:certKey=c.pem"\n'
            'tls = "implicit"\n'
            '[[listener]]\nname = "local"\nendpoint = "unix:run/s.sock"\n'
        )
        self.assertEqual(c.spool.sqlite_path, "/srv/sendarix/data/q.db")
        self.assertEqual(c.tls.certificate, "/srv/sendarix/tls/c.pem")
        self.assertEqual(c.tls.key, "/srv/k.pem")
        self.assertEqual(c.delivery.ca_file, "/srv/sendarix/ca.pem")
        self.assertEqual(
            c.listeners[0].endpoint,
            "ssl:port=465:privateKey=/srv/sendarix/k.pem:certKey=/srv/sendarix/c.pem",
        )
        self.assertEqual(c.listeners[1].endpoint, "unix:address=/srv/sendarix/run/s.sock")

    def test_absolute_paths_unchanged(self) -> None:
        """Absolute paths and endpoints without files are kept as written."""
        c = parse(
            '[spool]\nurl = "sqlite:/var/lib/s.db"\n'
            '[[listener]]\nname = "a"\nendpoint = "ssl:465:privateKey=/etc/k.pem"\n'
            'tls = "implicit"\n'
        )
        self.assertEqual(c.spool.url, "sqlite:/var/lib/s.db")
        self.assertEqual(c.listeners[0].endpoint, "ssl:465:privateKey=/etc/k.pem")

    def test_spool_config_alone(self) -> None:
        """A SpoolConfig made directly resolves its relative default against the cwd."""
        self.assertEqual(SpoolConfig().sqlite_path, os.path.join(os.getcwd(), "var", "spool.db"))

    def test_load_config_uses_file_folder(self) -> None:
        """load_config resolves against the file's folder, not the working folder."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "relay.toml")
        with open(path, "w") as f:
            f.write('[spool]\nurl = "sqlite:state/spool.db"\n')
        c = load_config(path)
        self.assertEqual((c.base_dir, c.source), (folder, path))
        self.assertEqual(c.spool.sqlite_path, os.path.join(folder, "state", "spool.db"))


class LoadTests(SynchronousTestCase):
    """Reading files: syntax errors, missing files, the sample configuration."""

    def write(self, text: str) -> str:
        """Write ``text`` to a new file and return its path."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_toml_syntax_error(self) -> None:
        """A TOML syntax error names the file and the line."""
        path = self.write('[node]\nname = "a"\nworkers = = 2\n')
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.key, path)
        self.assertIn("line 3", cm.exception.message)

    def test_missing_file(self) -> None:
        """A missing file names the path."""
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.key, path)

    def test_validation_error_from_file(self) -> None:
        """Validation errors from a file name the dotted key."""
        with self.assertRaises(ConfigError) as cm:
            load_config(self.write("[limits]\nmax_message_size = 'huge'\n"))
        self.assertEqual(cm.exception.key, "limits.max_message_size")

    def test_sample_loads(self) -> None:
        """etc/sendarix.toml loads, is production-minded, and resolves against etc/."""
        c = load_config(SAMPLE)
        etc = os.path.dirname(SAMPLE)
        self.assertEqual(c.base_dir, etc)
        self.assertTrue(c.domains.require_verified_domains)
        self.assertEqual(c.tls.certificate, os.path.join(etc, "tls", "fullchain.pem"))
        self.assertEqual(c.spool.sqlite_path, os.path.join(os.path.dirname(etc), "var", "spool.db"))
        self.assertGreaterEqual(len(c.listeners), 2)
        self.assertTrue(c.routes and c.pools and c.providers and c.egress_sources)
        self.assertTrue(c.tenants and c.webhooks)
        self.assertIn("listener submission", describe(c))

    def test_sample_covers_every_key(self) -> None:
        """Every configuration key appears in the sample (set, or shown commented out)."""
        with open(SAMPLE) as f:
            text = f.read()
        names = {"match." + k for k in config_module._MATCH_KEYS}
        for cls in vars(config_module).values():
            if attrs.has(cls) and cls.__name__.endswith("Config") and cls is not Config:
                for f in attrs.fields(cls):
                    if config_fields.PARSE_KEY in f.metadata and f.name != "match":
                        names.add(f.metadata.get(config_fields.TOML_KEY) or f.name)
        for section in ["[node]", "[spool]", "[[listener]]", "[tls]", "[limits]", "[delivery]",
                        "[dns]", "[[route]]", "[pool.", "[provider.", "[[egress.source]]",
                        "[domains]", "[tenant.", "[api]", "[[webhook]]", "[webhooks]",
                        "[simulator]", "[events]", "[filtering]", "[rspamd]"]:  # fmt: skip
            self.assertIn(section, text)
        for name in names:
            self.assertTrue(re.search(rf"(^|[\s{{,])#?\s*{re.escape(name)}\s*=", text, re.M), name)


class ResolveTests(SynchronousTestCase):
    """resolve_config: an explicit path, else ./sendarix.toml, else the default."""

    def setUp(self) -> None:
        """Work in a fresh folder; always return to the original one."""
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.folder)

    def test_default_without_file(self) -> None:
        """No path and no ./sendarix.toml: the development default, based here."""
        c = resolve_config(None)
        self.assertIsNone(c.source)
        self.assertEqual(c.spool.sqlite_path, os.path.join(self.folder, "var", "spool.db"))

    def test_picks_local_file(self) -> None:
        """./sendarix.toml is used when present."""
        with open("sendarix.toml", "w") as f:
            f.write('[node]\nname = "local"\n')
        c = resolve_config(None)
        self.assertEqual(c.source, os.path.join(self.folder, "sendarix.toml"))
        self.assertEqual(c.node.name, "local")

    def test_explicit_path_wins(self) -> None:
        """A given path is read even when ./sendarix.toml exists."""
        with open("sendarix.toml", "w") as f:
            f.write('[node]\nname = "local"\n')
        os.makedirs("other")
        with open(os.path.join("other", "x.toml"), "w") as f:
            f.write('[node]\nname = "explicit"\n')
        c = resolve_config(os.path.join("other", "x.toml"))
        self.assertEqual(c.node.name, "explicit")
        self.assertEqual(c.base_dir, os.path.join(self.folder, "other"))


class BounceRulesKeyTests(SynchronousTestCase):
    """``[delivery] bounce_rules`` names a rule table the relay loads at start."""

    def test_sample_rules_load(self) -> None:
        """The sample configuration's rule file resolves next to it and loads."""
        from sendarix.scheduler.classify import BounceRules

        root = REPO_ROOT
        config = load_config(os.path.join(root, "etc", "sendarix.toml"))
        path = config.delivery.bounce_rules
        assert path is not None
        self.assertEqual(path, os.path.join(root, "etc", "bounce-rules.toml"))
        self.assertGreater(len(BounceRules.from_toml(path)), 10)


class RedisSpoolKeyTests(SynchronousTestCase):
    """The Redis keys of ``[spool]``: ca_file, wait_replicas, wait_timeout."""

    def test_parsed(self) -> None:
        """ca_file resolves against the config folder; the WAIT settings parse."""
        spool = parse_config(
            {"spool": {"url": "rediss://r.example:6380/0", "ca_file": "ca.pem",
                       "wait_replicas": 2, "wait_timeout": "500ms"}},
            "/etc/sendarix",
        ).spool
        self.assertEqual(spool.ca_file, "/etc/sendarix/ca.pem")
        self.assertEqual((spool.wait_replicas, spool.wait_timeout), (2, 0.5))
        defaults = parse_config({}, "/etc/sendarix").spool
        self.assertEqual((defaults.ca_file, defaults.wait_replicas), (None, 0))

    def test_refused(self) -> None:
        """A negative or huge wait_replicas, and the keys outside [spool], name the key."""
        for data, key in (
            ({"spool": {"wait_replicas": -1}}, "spool.wait_replicas"),
            ({"spool": {"wait_replicas": 99}}, "spool.wait_replicas"),
            ({"delivery": {"wait_replicas": 1}}, "delivery.wait_replicas"),
        ):
            with self.assertRaises(BaseConfigError) as caught:
                parse_config(data, "/etc/sendarix")
            self.assertIn(key, str(caught.exception))
