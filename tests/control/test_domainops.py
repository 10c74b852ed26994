"""DKIM selector names for new keys (pure)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sendarix.control.domainops import DomainOpError, key_names

DEC_2026 = 1_796_601_600.0  # 2026-12-07


class KeyNameTests(SynchronousTestCase):
    def test_named_selector_is_used_exactly_for_rsa(self) -> None:
        self.assertEqual(key_names("s1", "dual", DEC_2026),
                         [("s1", "rsa"), ("s1-ed25519", "ed25519")])
        self.assertEqual(key_names("s1", "rsa-2048", DEC_2026), [("s1", "rsa")])
        self.assertEqual(key_names("s1", "ed25519", DEC_2026), [("s1", "ed25519")])

    def test_default_names(self) -> None:
        self.assertEqual(key_names(None, "dual", DEC_2026),
                         [("sx202612-rsa", "rsa"), ("sx202612-ed25519", "ed25519")])
        self.assertEqual(key_names(None, "ed25519", DEC_2026), [("sx202612", "ed25519")])

    def test_bad_selector_and_algorithm(self) -> None:
        for selector, algorithm in (("bad selector", "dual"), ("s1", "dsa")):
            with self.assertRaises(DomainOpError):
                key_names(selector, algorithm, DEC_2026)
