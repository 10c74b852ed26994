"""``twistd sendarix``: command-line options and the service maker."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from attrs import evolve
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from sendarix.config.errors import ConfigError
from sendarix.config.fields import auto_workers
from sendarix.config.loader import load_config, resolve_config
from sendarix.config.settings import Config
from sendarix.node.affinity import CpuPlacement
from sendarix.node.garbage import CollectorTuning
from sendarix.node.nodelock import NodeRunningError, hold_node_lock, note_pid
from sendarix.node.workers import (
    ParentWatch,
    WorkerPool,
    supervisor_pid,
    twistd_log_file,
    twistd_reactor,
    worker_name,
)
from sendarix.routing.state import discard_other_layouts

log = Logger()


def _worker_count(text: str) -> int:
    """``--workers``: an integer, or ``auto`` for one worker per usable CPU."""
    return auto_workers() if text == "auto" else int(text)


class Options(usage.Options):
    """Options of ``twistd -n sendarix``."""

    synopsis = "[--config PATH] [--workers N|auto]"
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: ./sendarix.toml if "
         "present, else the built-in development default)"],
        ["workers", "w", None, "run N worker processes sharing the listeners' ports, "
         "or auto: one per usable CPU (default: [node] workers)", _worker_count],
        ["worker", None, None, "(set by the parent process) run as worker number N", int],
        ["peers", None, None, "(set by the parent process) the directory where the "
         "workers serve their metrics to each other"],
    ]

    def postOptions(self) -> None:
        try:
            path = self["config"]
            self["parsed"] = load_config(path) if path else resolve_config(None)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from e
        except OSError as e:
            raise usage.UsageError(f"cannot read configuration: {e}") from e
        for key in ("workers", "worker"):
            if self[key] is not None and not 1 <= self[key] <= 256:
                raise usage.UsageError(f"--{key} must be between 1 and 256")


def _discard_other_layouts(config: Config, workers: int) -> None:
    """Remove routing state files left by the node running with another number of
    processes (a move to workers, or back), so that ``queue stats`` shows only
    those of the processes now running."""
    try:
        removed = discard_other_layouts(config, workers)
    except OSError as e:
        log.warn("could not remove old routing state: {why}", why=e)
        return
    for path in removed:
        log.info("removed the routing state of an earlier layout: {path}", path=path)


def _lock_node(config: Config) -> None:
    """Refuse to run a second copy of this node (see :mod:`sendarix.node.nodelock`):
    before anything of the node's is touched, its state files included."""
    from twisted.internet import reactor

    try:
        hold_node_lock(config.var_dir, config.node.name)
    except NodeRunningError as e:
        sys.stderr.write(f"sendarix: {e}\n")
        raise SystemExit(1) from e
    except OSError as e:
        sys.stderr.write(f"sendarix: cannot lock node {config.node.name}: {e}\n")
        raise SystemExit(1) from e
    # twistd without -n forks after this: the process that runs names itself.
    reactor.callWhenRunning(note_pid)


def _shared_listeners(config: Config) -> list[str]:
    """The endpoints the workers share: each SMTP listener, and the HTTP API."""
    descriptions = [lc.endpoint for lc in config.listeners]
    if config.api.enabled:
        descriptions.append(config.api.endpoint)
    return descriptions


def makeService(options: Options) -> IService:
    """Build the node from parsed options: a single node, the parent of ``workers``
    worker processes, or (``--worker I``) one of those workers."""
    from sendarix.node.service import makeService as make_node  # noqa: N813

    config = options["parsed"]
    # Not set anywhere: one worker per usable CPU (one CPU: a single process).
    workers = options["workers"] or config.node.workers or auto_workers()
    index = options["worker"]
    base_name = config.node.name
    if index is not None:
        # A worker: its own stable node name; listeners inherited from the supervisor.
        node = evolve(config.node, name=worker_name(config.node.name, index),
                      workers=max(workers, 2))
        config = evolve(config, node=node)
        _lock_node(config)
    elif workers > 1:
        from twisted.internet import reactor

        from sendarix.node.service import load_node_secret

        try:
            # Refuse here, once, rather than in every worker over and over.
            load_node_secret(config)
        except ConfigError as e:
            sys.stderr.write(f"configuration error: {e}\n")
            raise SystemExit(1) from e
        _lock_node(config)
        _discard_other_layouts(config, workers)
        path = options["config"]
        arguments = ["--config", os.path.abspath(path)] if path else []
        # Each worker knows how many they are (limits kept per process are split).
        arguments += ["--workers", str(workers)]
        # The workers run on the reactor the supervisor was told to use, if any.
        pool = WorkerPool(reactor, workers, arguments, log_file=twistd_log_file(sys.argv),
                          reactor_name=twistd_reactor(sys.argv),
                          listen=_shared_listeners(config))
        pool.forward_sighup = True  # each worker reloads its TLS certificate
        return pool
    if index is None:
        # A single process, however it was chosen: its limits are whole and its
        # listeners not shared.
        config = evolve(config, node=evolve(config.node, workers=1))
        _lock_node(config)
        _discard_other_layouts(config, 1)
    try:
        from twisted.internet import reactor as running

        node = make_node(config)
        node.reload_on_sighup = True  # SIGHUP reloads the TLS certificate
        # Only here, where the process is the node's own: an application that embeds
        # the node keeps its collector as it set it.
        CollectorTuning(running).setServiceParent(node)
        # SIGUSR2 writes every thread's stack to standard error (the supervisor's, for
        # a worker), even when the reactor thread is stuck: what an operator needs to
        # see where a process that does not answer or does not stop is waiting.
        faulthandler.register(signal.SIGUSR2, all_threads=True)
        if index is not None:
            ParentWatch(running, running.stop,
                        supervisor=supervisor_pid()).setServiceParent(node)
            if config.node.cpu_affinity == "auto":
                CpuPlacement(index).setServiceParent(node)
            if options["peers"] and config.api.enabled:
                from sendarix.node.peermetrics import WorkerPeers, serve_worker_metrics

                # /metrics answers for the whole node, whichever worker it reaches.
                peers = WorkerPeers(options["peers"], index, config.node.workers, base_name)
                serve_worker_metrics(node, peers, running)
        return node
    except ConfigError as e:
        sys.stderr.write(f"configuration error: {e}\n")
        raise SystemExit(1) from e
