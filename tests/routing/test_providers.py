"""Tests for sendarix.routing.providers: MX-host matching and MX-site rollup."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.routing.providers import SITE_PREFIX, ProviderTable, site_for
from tests.support.paths import REPO_ROOT

_ETC = os.path.join(REPO_ROOT, "etc")


class ProviderTableTests(SynchronousTestCase):
    """ProviderTable maps MX hosts to providers at label boundaries."""

    def setUp(self) -> None:
        self.table = ProviderTable.default()

    def test_label_boundary(self) -> None:
        """A suffix matches whole labels only."""
        self.assertEqual(self.table.provider_for("mx.google.com"), "gmail")
        self.assertEqual(self.table.provider_for("google.com"), "gmail")
        self.assertEqual(self.table.provider_for("ASPMX.L.Google.COM."), "gmail")
        self.assertIsNone(self.table.provider_for("notgoogle.com"))
        self.assertIsNone(self.table.provider_for("google.com.evil.example"))

    def test_known_providers(self) -> None:
        """The major providers' MX hosts are recognised."""
        cases = {
            "example-com.mail.protection.outlook.com": "outlook",
            "mta5.am0.yahoodns.net": "yahoo",
            "mx01.mail.icloud.com": "icloud",
            "mx.zoho.com": "zoho",
            "mx.yandex.net": "yandex",
            "mx00.gmx.net": "gmx",
            "in1-smtp.messagingengine.com": "fastmail",
            "mail.protonmail.ch": "proton",
        }
        for host, name in cases.items():
            self.assertEqual(self.table.provider_for(host), name, host)

    def test_longest_suffix_wins(self) -> None:
        """A more specific suffix beats a shorter one of another provider."""
        self.assertEqual(self.table.provider_for("mx-aol.mail.gm0.yahoodns.net"), "aol")
        self.assertEqual(self.table.provider_for("mta6.am0.yahoodns.net"), "yahoo")

    def test_leading_dot(self) -> None:
        """A leading dot in a suffix is optional."""
        table = ProviderTable.from_dict({"provider": {"x": {"mx_suffixes": [".mx.example"]}}})
        self.assertEqual(table.provider_for("a.mx.example"), "x")
        self.assertEqual(table.provider_for("mx.example"), "x")
        self.assertIsNone(table.provider_for("amx.example"))

    @given(st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True))
    def test_glued_prefix_never_matches(self, prefix: str) -> None:
        """Text glued to a suffix without a dot is never that provider."""
        self.assertIsNone(self.table.provider_for(prefix + "google.com"))
        self.assertEqual(self.table.provider_for(prefix + ".google.com"), "gmail")

    def test_etc_table_loads(self) -> None:
        """etc/providers.toml loads and agrees with the built-in table."""
        table = ProviderTable.from_toml(os.path.join(_ETC, "providers.toml"))
        self.assertEqual(table.providers, self.table.providers)
        self.assertEqual(table.providers["gmail"].tls, "encrypt")
        self.assertEqual(table.providers["gmail"].rate_limit, (3000.0, 60.0))

    def test_merged(self) -> None:
        """Configured providers replace built-in ones of the same name."""
        other = ProviderTable.from_dict(
            {"provider": {"gmail": {"mx_suffixes": ["gmail.example"]}}}
        )
        table = self.table.merged(other.providers)
        self.assertEqual(table.provider_for("mx.gmail.example"), "gmail")
        self.assertIsNone(table.provider_for("mx.google.com"))


class SiteForTests(SynchronousTestCase):
    """site_for rolls domains sharing MX hosts into one shaping key."""

    def test_provider_name(self) -> None:
        """Hosts of one known provider give the provider name."""
        self.assertEqual(
            site_for(["alt1.aspmx.l.google.com", "aspmx.l.google.com"]), "gmail"
        )

    @given(st.permutations(["mx1.host.example", "MX2.host.example.", "mx3.host.example"]))
    def test_stable_rollup(self, hosts: list[str]) -> None:
        """Unknown hosts give a key independent of order, case and trailing dots."""
        self.assertEqual(
            site_for(hosts), SITE_PREFIX + "mx1.host.example,mx2.host.example,mx3.host.example"
        )

    def test_different_sets_differ(self) -> None:
        """Different MX sets give different keys."""
        self.assertNotEqual(site_for(["a.example"]), site_for(["a.example", "b.example"]))

    def test_empty(self) -> None:
        """No MX hosts is an error."""
        self.assertRaises(ValueError, site_for, [])
