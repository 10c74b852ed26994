"""Each worker process on a CPU of its own (``[node] cpu_affinity = "auto"``).

A worker's reactor thread and its database thread take turns on the GIL at every SQL
statement the database thread runs.  When the two threads sit on different CPUs,
each turn is a wake-up sent from one CPU to the other; on a virtual machine that is
an interrupt between virtual CPUs, far dearer than a switch between two threads of
one CPU.  The database thread pays for these turns while it holds the spool's write
lock, which the workers share, so they also held up the other workers.  Measured in
a worker under a steady load: the database thread's part of taking a message in took
126–150 µs (60–66 µs of it CPU) with the threads free to move, and 58–70 µs (45–54
µs of CPU) with them on one CPU; the machine's idle time under that load fell from
about a tenth to under 2 %.

With one worker per CPU (the default worker count) the workers are spread over the
CPUs this process may use, one each, in the order the kernel numbers them; with
more workers than CPUs they go round again.

Only worker processes are placed, when they start (:class:`CpuPlacement`).  A
single-process node is left where the kernel puts it: nothing in one process knows
which CPUs other programs on the machine keep busy, and several single-process
nodes placed alike would all crowd onto the first one.  ``taskset`` places one by
hand (its worker count then follows the CPUs it may use).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


def worker_cpu(allowed: Collection[int], index: int) -> int | None:
    """The CPU for worker ``index`` (numbered from 1) among ``allowed``: the CPUs in
    ascending order, one per worker, and round again past the last; None when there
    is nothing to choose (at most one CPU allowed)."""
    if index < 1:
        raise ValueError(f"worker numbers start at 1, not {index}")
    if len(allowed) <= 1:
        return None
    cpus = sorted(allowed)
    return cpus[(index - 1) % len(cpus)]


def _threads() -> list[int]:
    """This process's threads (Linux: the entries of ``/proc/self/task``); without
    ``/proc``, the calling thread alone (0), which starts the others."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _allow(set_affinity: Callable[[int, Iterable[int]], None], tids: Iterable[int],
           cpus: Iterable[int]) -> None:
    """Let the threads ``tids`` run on ``cpus`` again, as far as each still can (a
    thread that ended, or a CPU no longer allowed, is passed over)."""
    cpus = set(cpus)
    for tid in tids:
        try:
            set_affinity(tid, cpus)
        except OSError:
            continue


def pin_worker(
    index: int,
    allowed: Collection[int],
    *,
    set_affinity: Callable[[int, Iterable[int]], None],
    threads: Callable[[], list[int]] = _threads,
) -> int | None:
    """Keep this process, worker ``index``, on the CPU :func:`worker_cpu` picks from
    ``allowed`` (the CPUs it may use now); the CPU, or None when it was left as it
    was (one CPU allowed, or the kernel refused).

    Every thread the process already has is placed, and those it starts later
    inherit the place from the thread that starts them.
    """
    cpu = worker_cpu(allowed, index)
    if cpu is None:
        return None
    placed: list[int] = []
    for tid in threads():
        try:
            set_affinity(tid, {cpu})
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
        except OSError as e:
            # A cpuset changed under us, or a policy forbids it: the threads placed
            # so far go back, and the whole worker runs unplaced.
            _allow(set_affinity, placed, allowed)
            log.warn("worker {index}: could not keep to CPU {cpu}: {why}",
                     index=index, cpu=cpu, why=e)
            return None
        placed.append(tid)
    return cpu


class CpuPlacement(Service):
    """Keeps worker ``index``'s threads on its CPU while the node runs (see
    :func:`pin_worker`), and lets them go where they were allowed before once it
    stops."""

    name = "cpu-placement"

    def __init__(self, index: int) -> None:
        self.index = index
        #: The CPU the worker keeps to; None when it was not placed.
        self.cpu: int | None = None
        self._before: frozenset[int] | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        Service.startService(self)
        if not hasattr(os, "sched_setaffinity"):
            return  # not Linux: the kernel places the threads
        self._before = frozenset(os.sched_getaffinity(0))
        self.cpu = pin_worker(self.index, self._before, set_affinity=os.sched_setaffinity)
        if self.cpu is not None:
            log.info("worker {index} keeps to CPU {cpu}", index=self.index, cpu=self.cpu)

    def stopService(self) -> None:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        if self.cpu is None or self._before is None:
            return
        _allow(os.sched_setaffinity, _threads(), self._before)
        self.cpu = None
