"""The random parts of ids (queue ids, event ids, Message-IDs).

They only have to differ between processes and runs, never to be secret: a
generator seeded from the system once per process (and again in a forked child)
serves them without a system call per id, and so without giving up the GIL on the
reactor thread for each one.  Secrets (API keys, webhook keys, session tokens) keep
using :mod:`secrets`.
"""

from __future__ import annotations

import os
import random

__all__ = ["unique_bits"]

_generator = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _generator.seed(os.urandom(32)))


def unique_bits(bits: int) -> int:
    """A number of ``bits`` random bits, for the part of an id that keeps it apart."""
    return _generator.getrandbits(bits)
