"""Crockford base32 (``sendarix.model.base32``): what ids are written in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.model.base32 import ALPHABET, DIGITS, decode, encode

widths = st.integers(min_value=1, max_value=26)


class Base32Tests(SynchronousTestCase):
    def test_alphabet(self) -> None:
        """Thirty-two digits in ASCII order, without I, L, O and U."""
        self.assertEqual(len(DIGITS), 32)
        self.assertEqual(sorted(ALPHABET), list(ALPHABET))
        self.assertFalse(set("ILOU") & DIGITS)

    def test_known_values(self) -> None:
        self.assertEqual(encode(0, 4), "0000")
        self.assertEqual(encode(31, 1), "Z")
        self.assertEqual(encode(32, 3), "010")
        self.assertEqual(encode(1 << 48 | 5, 10), "8000000005")
        self.assertEqual(decode("8000000005"), 1 << 48 | 5)

    @given(st.data(), widths)
    def test_round_trip(self, data: st.DataObject, width: int) -> None:
        """Every value that fits reads back from exactly ``width`` digits, odd or even."""
        value = data.draw(st.integers(min_value=0, max_value=(1 << 5 * width) - 1))
        text = encode(value, width)
        self.assertEqual(len(text), width)
        self.assertEqual(decode(text), value)

    @given(st.data(), widths)
    def test_order(self, data: st.DataObject, width: int) -> None:
        """Texts of one width compare as their values do (ids sort by their time)."""
        values = st.integers(min_value=0, max_value=(1 << 5 * width) - 1)
        a, b = data.draw(values), data.draw(values)
        self.assertEqual(encode(a, width) < encode(b, width), a < b)

    def test_refusals(self) -> None:
        self.assertRaises(ValueError, encode, 32, 1)
        self.assertRaises(ValueError, encode, -1, 4)
        self.assertRaises(ValueError, decode, "0I")
