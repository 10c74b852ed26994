"""Worker processes kept to a CPU each (``[node] cpu_affinity``)."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.node.affinity import CpuPlacement, pin_worker, worker_cpu


class WorkerCpuTests(SynchronousTestCase):
    """Which CPU a worker keeps to: pure choice, no system calls."""

    def test_one_cpu_each_in_order(self) -> None:
        allowed = {5, 1, 3}
        self.assertEqual([worker_cpu(allowed, i) for i in (1, 2, 3)], [1, 3, 5])

    def test_round_again_past_the_last(self) -> None:
        self.assertEqual([worker_cpu({0, 1}, i) for i in (1, 2, 3, 4, 5)], [0, 1, 0, 1, 0])

    def test_nothing_to_choose(self) -> None:
        self.assertIsNone(worker_cpu({7}, 1))
        self.assertIsNone(worker_cpu({7}, 2))
        self.assertIsNone(worker_cpu(set(), 1))

    def test_workers_count_from_one(self) -> None:
        self.assertRaises(ValueError, worker_cpu, {0, 1}, 0)

    @given(st.sets(st.integers(0, 1023), min_size=2, max_size=64), st.integers(1, 256))
    def test_spread_evenly(self, allowed: set[int], workers: int) -> None:
        """Workers 1..N use the allowed CPUs only, and no CPU has two workers more
        than another."""
        cpus = [worker_cpu(allowed, i) for i in range(1, workers + 1)]
        self.assertTrue(set(cpus) <= allowed)
        counts = [cpus.count(c) for c in allowed]
        self.assertLessEqual(max(counts) - min(counts), 1)


class _Affinity:
    """The affinity calls of a process with ``tids``, recorded."""

    def __init__(self, allowed: Collection[int], tids: list[int],
                 gone: Collection[int] = (), refused: Collection[int] = ()) -> None:
        self.allowed = set(allowed)
        self.tids = tids
        self.gone = set(gone)
        self.refused = set(refused)
        self.placed: dict[int, set[int]] = {}

    def set(self, tid: int, cpus: Iterable[int]) -> None:
        if tid in self.gone:
            raise ProcessLookupError(tid)
        if tid in self.refused:
            raise PermissionError(tid)
        self.placed[tid] = set(cpus)

    def pin(self, index: int) -> int | None:
        return pin_worker(index, self.allowed, set_affinity=self.set,
                          threads=lambda: list(self.tids))


class PinWorkerTests(SynchronousTestCase):
    """Placing every thread of the process (recorded calls, no real affinity)."""

    def test_every_thread_placed(self) -> None:
        calls = _Affinity({0, 1, 2, 3}, [100, 101, 102])
        self.assertEqual(calls.pin(2), 1)
        self.assertEqual(calls.placed, {100: {1}, 101: {1}, 102: {1}})

    def test_thread_that_ended_is_skipped(self) -> None:
        calls = _Affinity({0, 1}, [100, 101, 102], gone={101})
        self.assertEqual(calls.pin(1), 0)
        self.assertEqual(calls.placed, {100: {0}, 102: {0}})

    def test_one_cpu_left_alone(self) -> None:
        calls = _Affinity({3}, [100, 101])
        self.assertIsNone(calls.pin(1))
        self.assertEqual(calls.placed, {})

    def test_refused_runs_unplaced(self) -> None:
        """A refusal (a cpuset or policy) part-way leaves no thread placed: those
        placed before it may run on every CPU allowed again."""
        calls = _Affinity({0, 1, 2}, [100, 101, 102], refused={102})
        self.assertIsNone(calls.pin(2))
        self.assertEqual(calls.placed, {100: {0, 1, 2}, 101: {0, 1, 2}})


class CpuPlacementTests(SynchronousTestCase):
    """The service, on this process's real threads."""

    def setUp(self) -> None:
        if not hasattr(os, "sched_setaffinity"):
            self.skipTest("no CPU affinity on this system")
        self.before = os.sched_getaffinity(0)
        if len(self.before) < 2:
            self.skipTest("one usable CPU: nothing to place")

    def masks(self) -> set[frozenset[int]]:
        return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}

    def test_kept_to_its_cpu_while_running(self) -> None:
        """Started, every thread of the process keeps to worker 2's CPU (the second
        allowed one); stopped, they may run where they could before."""
        placement = CpuPlacement(2)
        placement.startService()
        try:
            cpu = sorted(self.before)[1]
            self.assertEqual(placement.cpu, cpu)
            self.assertEqual(self.masks(), {frozenset({cpu})})
        finally:
            placement.stopService()
        self.assertIsNone(placement.cpu)
        self.assertEqual(self.masks(), {frozenset(self.before)})
