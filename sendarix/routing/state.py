"""The routing state file: what a running node's delivery agent knows about sites,
smarthost endpoints and egress sources, for ``sendarix queue stats``.

Throttle and health state lives in the relay's memory; the CLI is another process.
So the delivery agent writes a small JSON snapshot (``var/routing-state.json``, every
few seconds and at stop, atomically) and the CLI reads it and says how old it is.  At
start the node reads its own file back for one thing: today's warmup counts and the
deprioritization marks of its egress sources (the rest is rebuilt from traffic).

Worker processes (``[node] workers``) each keep their own routing state, so each
writes its own file, ``var/routing-state-<node>-wI.json``: one shared file would hold
whichever worker wrote last, and a restarted worker would take back another's counts.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from sendarix.config.settings import Config

__all__ = [
    "STATE_FILE", "discard_other_layouts", "format_state", "read_state", "read_states",
    "state_path", "write_state",
]

STATE_FILE = "routing-state.json"
VERSION = 1
# A worker's file: the same name with the worker's node name before the extension.
_ROOT, _EXT = os.path.splitext(STATE_FILE)


def state_path(config: Config) -> str:
    """Where the node of ``config`` writes its routing state.  With several workers
    only the workers run delivery (the supervisor does not), and each has its own
    file, named after it."""
    if config.node.processes > 1:
        return os.path.join(config.var_dir, f"{_ROOT}-{config.node.name}{_EXT}")
    return os.path.join(config.var_dir, STATE_FILE)


def read_states(config: Config) -> list[dict[str, Any]]:
    """Every routing state written on this machine for ``config``'s node: the one of
    a single process and those of its workers, newest first."""
    paths = [os.path.join(config.var_dir, STATE_FILE)] + [
        path for _, path in sorted(_worker_files(config).items())
    ]
    states = [s for s in (read_state(p) for p in paths) if s is not None]
    return sorted(states, key=lambda s: -float(s.get("written_at", 0) or 0))


def _worker_files(config: Config) -> dict[int, str]:
    """The workers' state files in ``config``'s var directory, by worker index."""
    prefix = os.path.join(config.var_dir, f"{_ROOT}-{config.node.name}-w")
    found = {}
    pattern = f"{_ROOT}-{glob.escape(config.node.name)}-w*{_EXT}"
    for path in glob.glob(os.path.join(glob.escape(config.var_dir), pattern)):
        index = path[len(prefix): -len(_EXT)]
        if index.isdigit():
            found[int(index)] = path
    return found


def discard_other_layouts(config: Config, workers: int) -> list[str]:
    """Remove the state files this node's processes will not write when it runs
    ``workers`` processes: the single process's file under workers, the workers'
    files in a single process, and those of workers beyond the count.  Their figures
    are not this node's any more (each process restores only its own file), and
    ``queue stats`` would go on showing them.  Returns the paths removed (blocking:
    called while the node starts, before the reactor runs)."""
    stale = [p for i, p in _worker_files(config).items() if workers <= 1 or i > workers]
    if workers > 1:
        stale.append(os.path.join(config.var_dir, STATE_FILE))
    removed = []
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def write_state(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (blocking: run it off the reactor)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": VERSION, **state}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_state(path: str) -> dict[str, Any] | None:
    """The state at ``path``, or None when there is none (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    return data


def _rate(site: dict[str, Any]) -> str:
    if site.get("rate") is None:
        return "-"
    return f"{site['rate']:g}/{site['period']:g}s"


def format_state(state: dict[str, Any], now: float) -> list[str]:
    """Human lines for ``queue stats``."""
    age = max(0.0, now - float(state.get("written_at", now)))
    lines = [f"routing state of node {state.get('node', '?')} ({age:.0f} s old):"]
    sites = state.get("sites", [])
    if sites:
        lines.append(
            "  sites (connections open/cap, window, ready queue, rate now, throttled, suspended):"
        )
        for s in sites:
            suspended = "" if s.get("suspended_until") is None else (
                f", suspended for {max(0.0, s['suspended_until'] - now):.0f} s"
            )
            if s.get("held_until") is not None:
                suspended += (
                    f", suspended by the operator for {max(0.0, s['held_until'] - now):.0f} s"
                )
            lines.append(
                f"    {s['site']}: {s.get('open', 0)}/{s['max_connections']}"
                + (f" ({s['max_connections_per_source']} per source)"
                   if s.get("max_connections_per_source") else "")
                + ", "
                + f"window {s['window']}, queued {s.get('queued', 0)}, rate {_rate(s)}, "
                f"throttled {s['throttled']}{suspended}"
            )
    for pool, endpoints in sorted(state.get("pools", {}).items()):
        shown = ", ".join(f"{key} {value}" for key, value in sorted(endpoints.items()))
        lines.append(f"  pool {pool}: {shown}")
    for source in state.get("egress", []):
        parts = [f"  egress {source['name']} ({source['address']}, tier {source['tier']}, "
                 f"pool {source['pool']})"]
        if source.get("warmup_cap") is not None:
            parts.append(f"warmup cap {source['warmup_cap']}/day per provider")
        sent = source.get("sent_today", {})
        if sent:
            parts.append("sent today " + ", ".join(f"{k} {v}" for k, v in sorted(sent.items())))
        penalties = source.get("penalties", {})
        if penalties:
            parts.append(
                "deprioritized for " + ", ".join(
                    f"{k} ({v:.2f})" for k, v in sorted(penalties.items())
                )
            )
        lines.append("; ".join(parts))
    return lines
