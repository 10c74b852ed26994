"""Queue ids: short, sortable by creation time, unique across nodes and restarts.

A queue id is 20 upper-case Crockford base32 characters with no separators::

    TTTTTTTTTT NNNN SSSSSS
    |          |    +-- 30-bit sequence: random start each millisecond, then +1
    |          +------- 20-bit hash of the node name
    +------------------ 50-bit POSIX time in milliseconds

Crockford's alphabet is in ASCII order, so comparing two ids as strings compares
their times first.  One generator never repeats itself and never goes backwards,
even when the clock does (an NTP step) or when more than one id is made per
millisecond; two nodes differ in the node hash; a node restarting within the same
millisecond is kept apart by the random sequence start.
"""

from __future__ import annotations

import hashlib

from twisted.internet.interfaces import IReactorTime

from sendarix.model.base32 import DIGITS, decode, encode
from sendarix.model.randomness import unique_bits

TIME_CHARS = 10
NODE_CHARS = 4
SEQ_CHARS = 6
LENGTH = TIME_CHARS + NODE_CHARS + SEQ_CHARS

_SEQ_BITS = 5 * SEQ_CHARS
_SEQ_LIMIT = 1 << _SEQ_BITS
# A new millisecond starts its sequence in the lower half, so at least 2**29 ids fit
# into any millisecond before the generator has to borrow the next one.
_SEQ_START_BITS = _SEQ_BITS - 1


def node_hash(node: str) -> str:
    """The four characters that stand for ``node`` in its queue ids."""
    digest = hashlib.sha256(node.encode("utf-8")).digest()
    return encode(int.from_bytes(digest[:3], "big") >> 4, NODE_CHARS)


class QueueIdGenerator:
    """Makes queue ids for one node; time comes from an injected ``IReactorTime``."""

    def __init__(self, node: str, clock: IReactorTime) -> None:
        self._node = node_hash(node)
        self._clock = clock
        self._last_ms = -1
        self._seq = 0

    def next(self) -> str:
        """A new queue id, greater than every id this generator made before."""
        now_ms = int(self._clock.seconds() * 1000)
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._seq = unique_bits(_SEQ_START_BITS)
        else:
            # Same millisecond, or the clock stepped back: stay on the last
            # millisecond used and count up, so ids keep increasing.
            self._seq += 1
            if self._seq >= _SEQ_LIMIT:
                self._last_ms += 1
                self._seq = unique_bits(_SEQ_START_BITS)
        return encode(self._last_ms, TIME_CHARS) + self._node + encode(self._seq, SEQ_CHARS)


def queue_id_time(queue_id: str) -> float:
    """The creation time (POSIX seconds, millisecond precision) written in a queue id."""
    if len(queue_id) != LENGTH:
        raise ValueError(f"a queue id has {LENGTH} characters: {queue_id!r}")
    return decode(queue_id[:TIME_CHARS]) / 1000.0


def is_queue_id(text: str) -> bool:
    """True when ``text`` has the shape of a queue id (for CLI and API input checks)."""
    return len(text) == LENGTH and DIGITS.issuperset(text)
