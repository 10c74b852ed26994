"""The bench run: Sendarix variants and Postfix, alternated, each measured the same way.

Per system and run: acceptance rate and end-to-end rate (one ``smtp-source`` load:
``-s`` parallel sessions, one message per session), single-message latency (messages
sent one at a time, submission start to arrival at the sink), the time to accept one
large message, and memory with idle sessions open.  Every system relays to one
``smtp-sink``.  Output: ``name: value`` lines (median, min–max over runs, and the
Sendarix/Postfix ratio of the medians), then the same as a Markdown table.  For each
load the harness also counts the CPU seconds (user + sys) that all processes of each
system spent, per message, and their peak resident memory (``tests.bench.resources``).

``--backlog N`` (not part of the default run) measures a queue of N messages built
while the destination is down, then released (``tests.bench.backlog``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tests.bench import clients
from tests.bench.dnsproc import DNSProcess
from tests.bench.install import ensure_installed
from tests.bench.postfix import PostfixSystem
from tests.bench.profile import Profiler, summarize
from tests.bench.resources import Usage, machine_context_switches, tree_cpu_seconds
from tests.bench.sendarix import (
    DOMAIN,
    GATHER,
    REACTORS,
    Failed,
    Refused,
    SendarixSystem,
    raise_nofile,
)
from tests.bench.sink import Sink
from tests.support.relayproc import free_port

MIB = 1024 * 1024
#: The variants of a default run; ``default`` is what a user gets without choosing
#: (no ``[node] workers``, no ``[spool]``).  Any ``sqlite-wN``, ``redis-wN``,
#: ``sqlite-wauto`` or ``redis-wauto`` may be asked for as well, and any variant with
#: ``+asyncio`` or ``+uvloop`` runs on Twisted's asyncio reactor (on uvloop's loop);
#: ``+nolog`` sets ``[events] json_log = false`` (no event lines in the node's log);
#: ``+nogather`` sets ``[delivery] gather_time = "0s"`` (each message handed over
#: is sent at once, with no wait for company while clients are sending);
#: ``+nopin`` sets ``[node] cpu_affinity = "none"`` (the workers' threads move freely
#: between CPUs, as before the eighteenth session);
#: ``+burst`` lets fresh mail wait up to 5 s for a full outgoing session while
#: clients are sending (``[delivery] gather_time = "5s"``, ``gather_messages = 100``):
#: intake first during a peak, delivery in long sessions after it;
#: ``+pypy`` runs the node on PyPy (``$SENDARIX_BENCH_PYPY``, else ``pypy3``), and is
#: reported as skipped, with the reason, where no PyPy can run the relay.
#: ``default+burst`` is in the default run as the best configuration found for taking
#: a peak in (the performance issue's target for any documented setting).
VARIANTS = ("default", "sqlite-w1", "redis-w1", "redis-w2", "default+burst")

#: The gather options a variant may name (at most one): every choice but the default.
GATHER_OPTIONS = frozenset(GATHER) - {"default"}
#: Every variant option other than a reactor.
OPTIONS = frozenset({"nolog", "nopin", "pypy"}) | GATHER_OPTIONS

#: metric -> (label, unit, format, higher is better)
METRICS: dict[str, tuple[str, str, str, bool]] = {
    "accept_rate": ("acceptance rate", "msg/s", "{:.0f}", True),
    "relay_rate": ("end-to-end relay rate", "msg/s", "{:.0f}", True),
    "latency_p50": ("latency p50", "ms", "{:.1f}", False),
    "latency_p99": ("latency p99", "ms", "{:.1f}", False),
    # Where the single message's time goes, as the client sees each step (p50).
    "latency_connect": ("latency step: connect to banner, p50", "ms", "{:.2f}", False),
    "latency_ehlo": ("latency step: EHLO, p50", "ms", "{:.2f}", False),
    "latency_mail": ("latency step: MAIL, p50", "ms", "{:.2f}", False),
    "latency_rcpt": ("latency step: RCPT, p50", "ms", "{:.2f}", False),
    "latency_data": ("latency step: DATA (to 354), p50", "ms", "{:.2f}", False),
    "latency_dot": ("latency step: final dot to 250, p50", "ms", "{:.2f}", False),
    "latency_relay": ("latency step: final dot to arrival at the sink, p50", "ms", "{:.2f}",
                      False),
    "cpu_ms_per_msg": ("CPU (user+sys, all processes) per message", "ms", "{:.2f}", False),
    "load_switches_per_msg": ("context switches of the whole machine per message, load",
                              "switches", "{:.1f}", False),
    "latency_cpu_ms_per_msg": ("CPU (user+sys, all processes) per latency message", "ms",
                               "{:.2f}", False),
    "latency_switches_per_msg": (
        "context switches of the whole machine per latency message", "switches", "{:.1f}",
        False),
    "load_peak_rss": ("peak RSS (sum over processes) during the load", "MiB", "{:.1f}",
                      False),
    "load_peak_pss": ("peak PSS (sum over processes) during the load", "MiB", "{:.1f}",
                      False),
    "large_accept": ("large message accepted in", "s", "{:.2f}", False),
    "idle_rss": ("RSS with idle sessions", "MiB", "{:.1f}", False),
    "idle_rss_per_session": ("RSS per idle session", "KiB", "{:.1f}", False),
    "idle_pss_per_session": ("PSS per idle session", "KiB", "{:.1f}", False),
    "backlog_accept_rate": ("backlog: acceptance rate while down", "msg/s", "{:.0f}", True),
    "backlog_down_cpu_ms_per_msg": ("backlog: CPU per message while down (taken in, "
                                    "tried, deferred)", "ms", "{:.2f}", False),
    "backlog_quiet_s": ("backlog: from the last message taken in to quiet", "s",
                        "{:.0f}", False),
    "backlog_drain_rate": ("backlog: drain rate after release", "msg/s", "{:.0f}", True),
    "backlog_drain_vs_relay": ("backlog: drain rate / relay rate at --messages", "×",
                               "{:.2f}", True),
    "backlog_cpu_ms_per_msg": ("backlog: CPU per drained message", "ms", "{:.2f}", False),
    "backlog_peak_rss": ("backlog: peak RSS while draining", "MiB", "{:.1f}", False),
    "backlog_peak_pss": ("backlog: peak PSS while draining", "MiB", "{:.1f}", False),
    "backlog_new_accept_p50": ("backlog: new mail accepted in, p50, while draining", "ms",
                               "{:.1f}", False),
    "backlog_new_accept_p99": ("backlog: new mail accepted in, p99, while draining", "ms",
                               "{:.1f}", False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    p.add_argument("--runs", type=int, default=3,
                   help="runs per system (default 3; 0 with --backlog runs only that)")
    p.add_argument("--messages", type=int, default=10000,
                   help="messages per smtp-source load (default 10000)")
    p.add_argument("--sessions", type=int, default=20,
                   help="parallel smtp-source sessions (default 20)")
    p.add_argument("--size", type=int, default=4096, help="payload octets (default 4096)")
    p.add_argument("--latency-messages", type=int, default=200,
                   help="messages sent one at a time for latency (default 200)")
    p.add_argument("--latency-gap", type=float, default=0.0, metavar="MS",
                   help="pause between two latency messages, in milliseconds (default "
                        "0: each starts when the previous one reached the sink, so it "
                        "meets what the relay still does for that one)")
    p.add_argument("--idle-sessions", type=int, default=10000,
                   help="idle sessions held open on Sendarix (default 10000; 0: no "
                        "idle-session measurement of Sendarix)")
    p.add_argument("--postfix-idle-sessions", type=int, default=1000,
                   help="idle sessions on Postfix, one smtpd process each (default "
                        "1000; 0: no idle-session measurement of Postfix)")
    p.add_argument("--memory-runs", type=int, default=1,
                   help="runs (of --runs) that also measure idle-session memory; the "
                        "figure hardly varies, and opening the sessions takes time "
                        "(default 1)")
    p.add_argument("--large-mib", type=float, default=50.0,
                   help="size of the large message in MiB (default 50)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"Sendarix variants, comma-separated (default {','.join(VARIANTS)})")
    p.add_argument("--route", choices=("pool", "mx"), default="pool",
                   help="how Sendarix reaches the sink: a [pool.sink] smarthost route "
                        "(default, like Postfix's relayhost) or MX via the bench's DNS")
    p.add_argument("--time-limit", type=float, default=555.0,
                   help="start no system run that would end after this many seconds "
                        "(judged by its previous run; default 555)")
    p.add_argument("--backlog", type=int, default=0, metavar="N",
                   help="also queue N messages while the destination is down, release "
                        "them and measure the drain (Postfix and the SQLite variants; "
                        "not part of the default run)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 run, 500 messages, 20 latency samples, "
                        "500/100 idle sessions, 5 MiB large message")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing packages")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    p.add_argument("--profile", metavar="DIR",
                   help="record a py-spy profile of each Sendarix variant's first load "
                        "(its worker processes included), and of its backlog drain with "
                        "--backlog, into DIR and print a summary (needs py-spy)")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: only samples of threads holding the GIL (where "
                        "the Python work goes, not where threads wait)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.messages, args.latency_messages = 1, 500, 20
        args.idle_sessions, args.postfix_idle_sessions, args.large_mib = 500, 100, 5.0
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        try:
            variant(v)
        except ValueError:
            p.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)}, "
                    "sqlite-wN, redis-wN, sqlite-wauto, redis-wauto, each with +asyncio "
                    "or +uvloop, +nolog, +nogather or +burst, +nopin and +pypy)")
    return args


def variant(name: str) -> tuple[str, int | str | None]:
    """(spool, workers) of a variant name: ``default`` or ``<spool>-w<N|auto>``, either
    followed by options: ``+<reactor>`` (one at most), ``+nolog``, ``+nogather`` or
    ``+burst`` (not both), ``+nopin`` and ``+pypy``."""
    name, *options = name.split("+")
    reactors = [o for o in options if o not in OPTIONS]
    if (
        len(reactors) > 1
        or any(r not in REACTORS for r in reactors)
        or len(set(options)) < len(options)
        or len(GATHER_OPTIONS.intersection(options)) > 1
    ):
        raise ValueError("+".join(options))
    if name == "default":
        return "default", None
    spool, sep, workers = name.partition("-w")
    if not sep or spool not in ("sqlite", "redis"):
        raise ValueError(name)
    if workers == "auto":
        return spool, "auto"
    if not workers.isdigit() or int(workers) < 1:
        raise ValueError(name)
    return spool, int(workers)


def reactor_of(name: str) -> str:
    """The reactor a variant name asks for (``epoll`` unless ``+asyncio``/``+uvloop``)."""
    return next((o for o in name.split("+")[1:] if o in REACTORS), "epoll")


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


class Bench:
    """Holds what every system shares (sink, DNS, Redis) and the results."""

    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.args = args
        self.root = root
        self.results: dict[str, dict[str, list[float]]] = {}
        self.skipped: dict[str, str] = {}
        self.profiled: set[str] = set()
        self.phases: dict[str, float] = {}
        self.small = clients.message(args.size)
        self.large = clients.message(int(args.large_mib * MIB) - 64 * 1024, "large")
        self.size_limit = max(52428800, len(self.large) + 64 * 1024)

    # -- one system, one run --------------------------------------------------

    def measure_memory(self, system: Any, idle_sessions: int,
                       rss: Callable[[], tuple[int, int]]) -> dict[str, float]:
        """RSS with ``idle_sessions`` idle sessions open, measured first, on the freshly
        started system: later loads leave freed heap behind that new sessions would
        reuse, hiding their cost."""
        out: dict[str, float] = {}
        before_rss, before_pss = rss()
        idle = clients.IdleSessions(system.port, idle_sessions, timeout=120)
        try:
            time.sleep(1.0)
            after_rss, after_pss = rss()
        finally:
            idle.close()
        if idle.opened < idle_sessions:
            say(f"# {system.name}: only {idle.opened} of {idle_sessions} idle sessions opened")
        opened = max(idle.opened, 1)
        out["idle_sessions"] = idle.opened
        out["idle_rss"] = after_rss / MIB
        out["idle_rss_per_session"] = (after_rss - before_rss) / opened / 1024
        out["idle_pss_per_session"] = (after_pss - before_pss) / opened / 1024
        time.sleep(2.0)  # let the system end those sessions before the load starts
        return out

    def measure(self, system: Any, sink: Sink, idle_sessions: int,
                rss: Callable[[], tuple[int, int]], run: int) -> dict[str, float]:
        a = self.args
        port = system.port
        out: dict[str, float] = {}
        phases: dict[str, float] = {}
        t = time.monotonic()
        if run < a.memory_runs and idle_sessions > 0:
            out.update(self.measure_memory(system, idle_sessions, rss))
        phases["memory"], t = time.monotonic() - t, time.monotonic()

        profiler = self._profiler(system)
        base = sink.count
        usage = Usage(system.roots)
        switches = machine_context_switches()
        try:
            start, end = clients.smtp_source(port, a.sessions, a.messages, a.size, timeout=300)
            out["accept_rate"] = a.messages / (end - start)
            if not sink.wait_for(base + a.messages, timeout=300):
                raise Failed(f"only {sink.count - base} of {a.messages} messages reached the sink")
            out["relay_rate"] = a.messages / (sink.arrival(base + a.messages) - start)
            cpu, peak_rss, peak_pss = usage.stop()
            out["load_switches_per_msg"] = (machine_context_switches() - switches) / a.messages
            out["cpu_ms_per_msg"] = cpu * 1000 / a.messages
            out["load_peak_rss"] = peak_rss / MIB
            out["load_peak_pss"] = peak_pss / MIB
        finally:
            usage.stop()
            if profiler is not None:
                profiler.stop()
                say(f"# profile of {system.name} under the smtp-source load ({profiler.out}):")
                for line in summarize(profiler.out):
                    say(f"#   {line}")

        phases["load"], t = time.monotonic() - t, time.monotonic()
        latencies = []
        steps: dict[str, list[float]] = {}
        # One message at a time: what each costs when nothing else runs (caches and
        # idle CPUs to wake), and how many sleeps and wake-ups it takes.
        switches = machine_context_switches()
        cpu = tree_cpu_seconds(system.roots())
        for _ in range(a.latency_messages):
            base = sink.count
            timing: dict[str, float] = {}
            t0 = clients.send_message(port, self.small, steps=timing)
            if not sink.wait_for(base + 1, timeout=30):
                raise Failed("a latency message did not reach the sink within 30 s")
            arrived = sink.arrival(base + 1)
            latencies.append(arrived - t0)
            timing["relay"] = arrived - timing.pop("dot_sent")
            for step, seconds in timing.items():
                steps.setdefault(step, []).append(seconds)
            if a.latency_gap:
                time.sleep(a.latency_gap / 1000)
        if a.latency_messages:
            cpu = tree_cpu_seconds(system.roots()) - cpu
            out["latency_cpu_ms_per_msg"] = cpu * 1000 / a.latency_messages
            out["latency_switches_per_msg"] = (
                machine_context_switches() - switches) / a.latency_messages
            out["latency_p50"] = percentile(latencies, 0.50) * 1000
            out["latency_p99"] = percentile(latencies, 0.99) * 1000
        for step, values in steps.items():
            out[f"latency_{step}"] = statistics.median(values) * 1000

        phases["latency"], t = time.monotonic() - t, time.monotonic()
        base = sink.count
        t0 = clients.send_message(port, self.large, timeout=120)
        out["large_accept"] = time.monotonic() - t0
        sink.wait_for(base + 1, timeout=120)
        phases["large"] = time.monotonic() - t
        self.phases = phases
        return out

    def _profiler(self, system: Any) -> Profiler | None:
        """A py-spy recording of a Sendarix node's first load, with ``--profile``."""
        if not self.args.profile or not isinstance(system, SendarixSystem):
            return None
        if system.name in self.profiled or system.proc is None:
            return None
        self.profiled.add(system.name)
        os.makedirs(self.args.profile, exist_ok=True)
        out = os.path.join(os.path.abspath(self.args.profile), f"{system.name}.txt")
        return Profiler(system.proc.pid, out, gil=self.args.profile_gil)

    def run_system(self, system: Any, sink: Sink, idle_sessions: int,
                   rss: Callable[[], tuple[int, int]], run: int) -> None:
        started = time.monotonic()
        self.phases = {}
        try:
            # Each turn starts on a quiet disk: the previous turn's writes (Postfix's
            # thousands of queue files, a spool file and its log) and the removal of
            # this system's last folder (at its start) are written back first, so
            # their writeback does not slow the fsyncs of the turn measured.
            os.sync()
            system.start()
            os.sync()
            self.phases["start"] = time.monotonic() - started
            try:
                values = self.measure(system, sink, idle_sessions, rss, run)
            finally:
                t = time.monotonic()
                system.stop()
                self.phases["stop"] = time.monotonic() - t
        except Refused as e:
            self.skipped[system.name] = str(e)
            say(f"# {system.name}: skipped ({e})")
            return
        except (Failed, OSError) as e:
            say(f"# {system.name}: run failed: {e}")
            return
        for key, value in values.items():
            self.results.setdefault(system.name, {}).setdefault(key, []).append(value)
        say(f"# {system.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items())
            + f" ({time.monotonic() - started:.0f} s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in self.phases.items()) + ")")

    # -- the whole bench ------------------------------------------------------

    def run(self) -> None:
        a = self.args
        t_start = time.monotonic()
        sink = Sink(free_port())
        dns = DNSProcess(DOMAIN) if a.route == "mx" else None
        redis_stop: Callable[[], None] | None = None
        redis_url = None
        redis_pid = None
        try:
            if any(v.startswith("redis") for v in a.variants):
                from tests.support.redisserver import start_redis

                redis_port, redis_stop = start_redis(os.path.join(self.root, "redis"))
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
                redis_pid = _listener_pid(redis_port)
            max_idle = max(a.idle_sessions, a.postfix_idle_sessions)
            postfix = PostfixSystem(
                os.path.join(self.root, "postfix"), free_port(), sink.port,
                maxproc=a.postfix_idle_sessions + 100, size_limit=self.size_limit,
            )
            systems: list[tuple[Any, int, Callable[[], tuple[int, int]]]] = [
                (postfix, a.postfix_idle_sessions, postfix.smtpd_rss)
            ]
            for name in a.variants:
                spool, workers = variant(name)
                options = name.split("+")[1:]
                s = SendarixSystem(
                    os.path.join(self.root, name), free_port(), sink.port,
                    dns.port if dns is not None else 0,
                    spool=spool, workers=workers, max_connections=max_idle + 100,
                    size_limit=self.size_limit, route=a.route, redis_url=redis_url,
                    redis_pid=redis_pid, reactor=reactor_of(name),
                    json_log="nolog" not in options,
                    gather=next((o for o in options if o in GATHER_OPTIONS), "default"),
                    pin="nopin" not in options, pypy="pypy" in options, name=f"sendarix-{name}",
                )
                systems.append((s, a.idle_sessions, s.rss))
            durations: dict[str, float] = {}
            for run in range(a.runs):
                # Alternate the systems; each run starts from a different one.
                order = systems[run % len(systems):] + systems[:run % len(systems)]
                for system, idle, rss in order:
                    if system.name in self.skipped:
                        continue
                    elapsed = time.monotonic() - t_start
                    if elapsed + durations.get(system.name, 0.0) > a.time_limit:
                        say(f"# time limit: {system.name} run {run + 1} not started")
                        continue
                    if redis_url is not None and getattr(system, "spool", "") == "redis":
                        _redis_flush(redis_url)
                    t0 = time.monotonic()
                    self.run_system(system, sink, idle, rss, run)
                    durations[system.name] = time.monotonic() - t0
            if a.backlog:
                from tests.bench.backlog import run_backlog

                run_backlog(self, [s for s, _, _ in systems], say)
        finally:
            sink.stop()
            if dns is not None:
                dns.stop()
            if redis_stop is not None:
                redis_stop()
        self.report(time.monotonic() - t_start)

    # -- output ---------------------------------------------------------------

    def report(self, seconds: float) -> None:
        a = self.args
        say("")
        say(f"machine: {platform.node()}, {os.cpu_count()} cores, "
            f"{platform.platform()}, Python {platform.python_version()}")
        say(f"load: smtp-source -s {a.sessions} -m {a.messages} -l {a.size}; "
            f"{a.latency_messages} latency messages; large message {a.large_mib:g} MiB; "
            f"idle sessions: Sendarix {a.idle_sessions}, Postfix {a.postfix_idle_sessions}; "
            f"runs: {a.runs}; route: {a.route}; bench time: {seconds:.0f} s")
        pf = self.results.get("postfix", {})
        rows: list[list[str]] = []
        for key, (_, unit, fmt, _) in METRICS.items():
            if key in pf:
                say(f"postfix.{key}: {_summary(pf[key], fmt)} {unit}")
            for name, values in self.results.items():
                if name == "postfix" or key not in values:
                    continue
                ratio = ""
                base = _reference(pf.get(key), fmt)
                if base is not None:
                    ratio = f", ratio {statistics.median(values[key]) / base:.3g}"
                say(f"{name}.{key}: {_summary(values[key], fmt)} {unit}{ratio}")
        for name, why in self.skipped.items():
            say(f"{name}: skipped ({why})")
        names = [n for n in self.results if n != "postfix"]
        say("")
        say("| metric | Postfix | " + " | ".join(f"{n} (ratio)" for n in names) + " |")
        say("|---|---|" + "---|" * len(names))
        for key, (label, unit, fmt, _) in METRICS.items():
            if not any(key in values for values in self.results.values()):
                continue
            cells = [_median(pf.get(key), fmt)]
            for n in names:
                v = self.results[n].get(key)
                cell = _median(v, fmt)
                base = _reference(pf.get(key), fmt)
                if v and base is not None:
                    cell += f" ({statistics.median(v) / base:.3g})"
                cells.append(cell)
            rows.append([f"{label} ({unit})", *cells])
        for row in rows:
            say("| " + " | ".join(row) + " |")


def _summary(values: list[float], fmt: str) -> str:
    med = fmt.format(statistics.median(values))
    return f"{med} (min–max {fmt.format(min(values))}–{fmt.format(max(values))}, n={len(values)})"


def _reference(values: list[float] | None, fmt: str) -> float | None:
    """Postfix's median to divide by, or None when it shows as zero in its own
    format (a second under one rounds to 0 s): a ratio against it says nothing."""
    if not values:
        return None
    median = statistics.median(values)
    return median if float(fmt.format(median)) != 0 else None


def _median(values: list[float] | None, fmt: str) -> str:
    return fmt.format(statistics.median(values)) if values else "–"


def _listener_pid(port: int) -> int | None:
    """The PID of the process listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                inode = fields[9]
                break
    if inode is None:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == f"socket:[{inode}]":
                    return int(entry)
        except OSError:
            continue
    return None


def _redis_flush(url: str) -> None:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(64)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.no_install:
        ensure_installed(say)
    raise_nofile(max(args.idle_sessions, args.postfix_idle_sessions) + 1000)
    root = tempfile.mkdtemp(prefix="sendarix-bench-", dir="/var/tmp")
    os.chmod(root, 0o755)  # Postfix daemons run as the postfix user
    say(f"# bench folder {root}")
    try:
        Bench(args, root).run()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
