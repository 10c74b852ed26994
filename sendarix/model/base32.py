"""Crockford base32 for the ids Sendarix makes (queue ids, event ids).

Its 32 digits leave out I, L, O and U, so an id read aloud or copied by hand is not
mistaken, and they are in ASCII order: ids of the same width compare as strings the
way their numbers compare, which is what lets ids that start with a time sort by it.
"""

from __future__ import annotations

__all__ = ["ALPHABET", "DIGITS", "decode", "encode"]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: The digits, for a check that a text is made of them only.
DIGITS = frozenset(ALPHABET)
_VALUE = {digit: value for value, digit in enumerate(ALPHABET)}
#: Every pair of digits, by the 10-bit value it writes.
_PAIRS = tuple(a + b for a in ALPHABET for b in ALPHABET)


def encode(value: int, width: int) -> str:
    """``value`` as exactly ``width`` digits (leading zeros kept); ValueError when it
    is negative or needs more."""
    if value < 0 or value >> (5 * width):
        raise ValueError(f"{value} does not fit in {width} base32 digits")
    # Two digits per step: half the steps of one at a time (ids are made for every
    # message and every event).
    parts = []
    for _ in range(width // 2):
        parts.append(_PAIRS[value & 1023])
        value >>= 10
    if width % 2:
        parts.append(ALPHABET[value & 31])
    return "".join(reversed(parts))


def decode(text: str) -> int:
    """The number ``text`` writes; ValueError on a character that is not a digit."""
    value = 0
    for digit in text:
        try:
            value = (value << 5) | _VALUE[digit]
        except KeyError:
            raise ValueError(f"not a Crockford base32 digit: {digit!r}") from None
    return value
