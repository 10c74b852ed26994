"""The random parts of ids: drawn without a system call, yet apart in every process."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from sendarix.model import randomness
from sendarix.model.event import new_event_id


class UniqueBitsTests(SynchronousTestCase):
    def test_width(self) -> None:
        """Draws fill the width asked for and no more; wide ones do not repeat."""
        values = [randomness.unique_bits(29) for _ in range(2000)]
        self.assertTrue(all(0 <= v < 1 << 29 for v in values))
        self.assertGreater(max(values), 1 << 28)  # the top bit is used
        wide = [randomness.unique_bits(64) for _ in range(2000)]
        self.assertEqual(len(set(wide)), len(wide))

    def test_forked_child_draws_its_own(self) -> None:
        """A child made by fork() (without exec) does not repeat its parent's draws:
        its generator is seeded again, so ids made in both stay apart."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its next draw and leave at once
            try:
                os.write(write, randomness.unique_bits(64).to_bytes(8, "big"))
            finally:
                os._exit(0)
        os.close(write)
        try:
            child = int.from_bytes(os.read(read, 8), "big")
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        self.assertNotEqual(child, randomness.unique_bits(64))

    def test_event_ids_differ_across_a_fork(self) -> None:
        """Parent and child making an event id in the same millisecond make two
        different ones (the child does not count on from the parent's last id)."""
        new_event_id(1_000.0)  # the parent's last id, in that millisecond
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(write, new_event_id(1_000.0).encode())
            finally:
                os._exit(0)
        os.close(write)
        try:
            child = os.read(read, 64).decode()
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        self.assertNotEqual(child, new_event_id(1_000.0))
