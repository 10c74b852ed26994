"""What a system costs while it works: CPU seconds (user + sys) and peak resident memory
of all its processes, and the machine's context switches.

CPU is read from ``/proc/PID/stat`` for every process of the system's tree, adding each
process's ``cutime``/``cstime`` (its children that ended and were reaped), so that a
Postfix ``smtpd`` or ``smtp`` process that exits during the load still counts, in its
master's figures, and nothing is counted twice.  Peak memory is the largest sum of
the tree's resident sets (RSS, and PSS, which splits shared pages between the processes
that share them) seen by a sampling thread (every 0.25 s) during the measured
interval.  Extra PIDs (the Redis server of a Redis variant) count as part of the
system.

Context switches are the machine's (the ``ctxt`` line of ``/proc/stat``): a thread
that blocks and one that is woken each count.  Per-process counts would miss the
Postfix daemons that exit during a load, and the load's own client and sink switch
the same way for every system, so the machine's total compares the systems fairly:
it counts how often each message puts a process to sleep and wakes another.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

from tests.bench.sendarix import process_tree

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: Iterable[int]) -> float:
    """user + sys seconds of ``pids``, with their reaped children."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the ")": state is [0]; utime, stime, cutime, cstime are [11]..[14].
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / _TICK


def tree_pids(roots: Iterable[int]) -> list[int]:
    """Every process of the trees under ``roots``."""
    return [pid for root in roots for pid in process_tree(root)]


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """:func:`cpu_seconds` of the process trees under ``roots``."""
    return cpu_seconds(tree_pids(roots))


def machine_context_switches() -> int:
    """Context switches on the whole machine since it started (``/proc/stat``)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    raise OSError("no ctxt line in /proc/stat")


def memory_bytes(pids: Iterable[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over ``pids``.  Summed RSS counts pages shared between
    processes once per process (Postfix runs many); PSS splits them."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


class Usage:
    """Measures one interval: ``Usage(roots)`` starts it, ``stop()`` ends it and returns
    (CPU seconds used, peak summed RSS, peak summed PSS, in bytes).  ``roots`` gives
    the system's root PIDs each time it is called (a system may restart processes)."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.25) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self.start_cpu = cpu_seconds(self._pids())
        self._thread = threading.Thread(target=self._sample, name="usage", daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        return tree_pids(self.roots())

    def _take(self, pids: list[int]) -> None:
        rss, pss = memory_bytes(pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take(self._pids())
            self._stop.wait(self.interval)

    def stop(self) -> tuple[float, int, int]:
        self._stop.set()
        self._thread.join(timeout=5)
        pids = self._pids()
        self._take(pids)
        return cpu_seconds(pids) - self.start_cpu, self.peak_rss, self.peak_pss
