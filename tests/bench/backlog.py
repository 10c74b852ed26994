"""``--backlog N``: a queue of N messages built while the destination is down, then
released, for Postfix and each SQLite variant of Sendarix.

Each system gets a fresh instance whose destination is a port where nothing listens.
The harness submits N messages (``smtp-source``), waits until the system has tried
them and gone quiet (every delivery deferred), and stops it.  Then the destination
comes up (a second ``smtp-sink`` on that port) and the queue is released: Sendarix's
deferred deliveries are made due now in its spool file (what ``sendarix queue retry``
does for one message), Postfix gets ``postqueue -f`` once it runs again.  The system
is started again on the same folder, and the harness measures

- the drain rate: backlog messages delivered per second, from the restart to the last
  arrival, and its ratio to the system's relay rate at ``--messages`` in this run;
- CPU seconds per drained message and peak RSS while draining (all processes);
- how long new mail waits for its ``250`` while the queue drains (one message every
  0.2 s, each in its own session).
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from sendarix.stores import codec
from tests.bench import clients
from tests.bench.postfix import PostfixSystem
from tests.bench.profile import Profiler, summarize
from tests.bench.resources import Usage, tree_cpu_seconds
from tests.bench.sendarix import Failed, SendarixSystem
from tests.bench.sink import Sink
from tests.support.relayproc import free_port

MIB = 1024 * 1024


def _quiet(roots: Callable[[], list[int]], timeout: float) -> float:
    """Wait until the system spends under 5 % of a core (two seconds in a row): its
    tries are over, and what is left is the periodic look at the queue (Sendarix's
    lease poll walks past the due mail of a dead destination).  When the calm began
    (``time.monotonic()``), or when the wait timed out."""
    deadline = time.monotonic() + timeout
    calm = 0
    calm_since = time.monotonic()
    last = tree_cpu_seconds(roots())
    while time.monotonic() < deadline and calm < 2:
        time.sleep(1.0)
        now = tree_cpu_seconds(roots())
        if now - last < 0.05:
            calm += 1
        else:
            calm, calm_since = 0, time.monotonic()
        last = now
    return calm_since if calm >= 2 else time.monotonic()


def _release_sqlite(path: str) -> int:
    """Make every active recipient and delivery in the (stopped) node's spool due now."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            now = time.time()
            active = ", ".join(f"'{s.value}'" for s in codec.ACTIVE_STATUSES)
            count = conn.execute(
                f"UPDATE spool_recipient SET next_attempt = ? WHERE status IN ({active})",
                (now,),
            ).rowcount
            conn.execute("UPDATE spool_delivery SET due = ?, lease_node = NULL, "
                         "lease_expires = NULL", (now,))
            # Held messages (leased at their commit, rows not written): their lease
            # ends now, so the next poll writes their rows, due at once.
            conn.execute("UPDATE spool_message SET held_until = ?"
                         " WHERE held_node IS NOT NULL", (now,))
        return count
    finally:
        conn.close()


def _copy(system: Any, root: str, dead_port: int) -> Any:
    if isinstance(system, PostfixSystem):
        return PostfixSystem(os.path.join(root, "backlog-postfix"), free_port(), dead_port,
                             maxproc=system.maxproc, size_limit=system.size_limit)
    return SendarixSystem(
        os.path.join(root, f"backlog-{system.name}"), free_port(), dead_port, 0,
        spool=system.spool, workers=system.workers, max_connections=system.max_connections,
        size_limit=system.size_limit, reactor=system.reactor, json_log=system.json_log,
        pypy=system.pypy,
    )


def _spool_file(system: SendarixSystem) -> str:
    return os.path.join(system.dir, "var" if system.spool == "default" else "", "spool.db")


def _drain_profiler(args: Any, system: Any) -> Profiler | None:
    """With ``--profile``, a py-spy recording of a Sendarix node's drain (from the
    restart to the last arrival), its workers included."""
    if not args.profile or not isinstance(system, SendarixSystem) or system.proc is None:
        return None
    os.makedirs(args.profile, exist_ok=True)
    out = os.path.join(os.path.abspath(args.profile),
                       f"{system.name}-drain-{args.backlog}.txt")
    return Profiler(system.proc.pid, out, gil=args.profile_gil)


def backlog_one(bench: Any, original: Any, say: Callable[[str], None]) -> dict[str, float]:
    a = bench.args
    n = a.backlog
    dead_port = free_port()
    system = _copy(original, bench.root, dead_port)
    out: dict[str, float] = {}
    sink: Sink | None = None
    try:
        system.start()
        cpu_at_start = tree_cpu_seconds(system.roots())
        start, end = clients.smtp_source(system.port, a.sessions, n, a.size,
                                          timeout=max(300.0, n / 50))
        out["backlog_accept_rate"] = n / (end - start)
        quiet_at = _quiet(system.roots, timeout=max(120.0, n / 100))
        # Everything the system did with the backlog before the release: taking it
        # in, trying the destination, deferring (less the calm seconds counted).
        down_cpu = tree_cpu_seconds(system.roots())
        out["backlog_down_cpu_ms_per_msg"] = (down_cpu - cpu_at_start) * 1000 / n
        out["backlog_quiet_s"] = max(0.0, quiet_at - end)
        system.stop()
        if isinstance(system, SendarixSystem):
            _release_sqlite(_spool_file(system))
        sink = Sink(dead_port)
        system.start(fresh=False)
        t0 = time.monotonic()
        if isinstance(system, PostfixSystem):
            subprocess.run([system.postfix.replace("postfix", "postqueue"), "-c",
                            system.config_dir, "-f"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        usage = Usage(system.roots)
        profiler = _drain_profiler(a, system)
        accepted: list[float] = []
        stop = threading.Event()

        def submit() -> None:
            while not stop.is_set():
                try:
                    began = clients.send_message(system.port, bench.small, timeout=60)
                    accepted.append(time.monotonic() - began)
                except OSError:
                    pass
                stop.wait(0.2)

        submitter = threading.Thread(target=submit, name="backlog-new-mail", daemon=True)
        submitter.start()
        try:
            deadline = time.monotonic() + max(600.0, n / 20)
            while sink.count < n and time.monotonic() < deadline:
                sink.wait_for(n, timeout=1.0)
            if sink.count < n:
                raise Failed(f"backlog: only {sink.count} of {n} delivered after release")
            # The drain ends when the backlog has arrived; new mail counts with it.
            done = sink.arrival(n)
        finally:
            stop.set()
            submitter.join(timeout=70)
            cpu, peak_rss, peak_pss = usage.stop()
            if profiler is not None:
                profiler.stop()
                say(f"# profile of {system.name}'s drain of {n} ({profiler.out}):")
                for line in summarize(profiler.out):
                    say(f"#   {line}")
        drained = n + max(0, min(len(accepted), sink.count - n))
        out["backlog_drain_rate"] = n / (done - t0)
        out["backlog_cpu_ms_per_msg"] = cpu * 1000 / drained
        out["backlog_peak_rss"] = peak_rss / MIB
        out["backlog_peak_pss"] = peak_pss / MIB
        relay = bench.results.get(original.name, {}).get("relay_rate")
        if relay:
            out["backlog_drain_vs_relay"] = out["backlog_drain_rate"] / statistics.median(relay)
        if accepted:
            ordered = sorted(accepted)
            out["backlog_new_accept_p50"] = ordered[len(ordered) // 2] * 1000
            out["backlog_new_accept_p99"] = ordered[min(len(ordered) - 1,
                                                        int(len(ordered) * 0.99))] * 1000
        return out
    finally:
        system.stop()
        if sink is not None:
            sink.stop()


def run_backlog(bench: Any, systems: list[Any], say: Callable[[str], None]) -> None:
    """The backlog measurement for Postfix and each SQLite variant, once each."""
    for system in systems:
        if isinstance(system, SendarixSystem) and system.spool not in ("default", "sqlite"):
            continue
        if system.name in bench.skipped:
            continue
        started = time.monotonic()
        try:
            values = backlog_one(bench, system, say)
        except (Failed, OSError) as e:
            say(f"# {system.name}: backlog failed: {e}")
            continue
        for key, value in values.items():
            bench.results.setdefault(system.name, {}).setdefault(key, []).append(value)
        say(f"# {system.name} backlog of {bench.args.backlog}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in values.items())
            + f" ({time.monotonic() - started:.0f} s)")
