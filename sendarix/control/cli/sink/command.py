"""``sendarix sink`` on the command line: options, logging, and the reactor run."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure

from sendarix.control.cli.sink.faults import FaultSpecError, parse_fault
from sendarix.control.cli.sink.records import SinkOptions
from sendarix.control.cli.sink.server import SinkServer


class SinkCommandOptions(usage.Options):
    """``sendarix sink`` command-line options."""

    synopsis = "sendarix sink --listen ENDPOINT [--listen ENDPOINT]... [options]"
    longdesc = "Run a sandbox SMTP server that accepts mail and injects faults on request."

    optFlags = [
        ["verbose", "v", "Print one line per received message to stdout."],
        ["chunking", None, "Advertise CHUNKING (BDAT is always understood)."],
    ]
    optParameters = [
        ["hostname", None, None, "Host name for the banner and EHLO reply."],
        ["maildir", None, None, "Write each message to DIR as NNN-MSGID.eml + .json."],
        ["tls-cert", None, None, "PEM certificate: offer STARTTLS with it."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["auth", None, None, "USER:PASSWORD: offer AUTH PLAIN and require it before MAIL."],
        ["stats-file", None, None, "Keep JSON counters in this file (rewritten atomically)."],
        ["max-size", None, 100 * 1024 * 1024, "Largest message accepted (0: any).", int],
        ["idle-timeout", None, 300.0, "Close idle sessions after SECONDS (0: never).", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["fault"] = []

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted server endpoint to listen on, e.g. tcp:2526:interface=127.0.0.1
        (repeatable)."""
        self["listen"].append(endpoint)

    def opt_fault(self, spec: str) -> None:
        """A fault to inject (repeatable): refuse, connect:CODE[:ENH][:TEXT],
        rcpt:CODE[:ENH]:PATTERN[:TEXT], first:N:CODE[:ENH][:TEXT],
        data:CODE[:ENH][:TEXT], stall[:SECONDS], stall-data[:SECONDS], drop-after-ehlo."""
        try:
            self["fault"].append(parse_fault(spec))
        except FaultSpecError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key must be given together")
        for name in ("tls-cert", "tls-key"):
            if self[name] is not None and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["auth"] is not None and ":" not in self["auth"]:
            raise usage.UsageError("--auth needs USER:PASSWORD")
        if self["max-size"] < 0 or self["idle-timeout"] < 0:
            raise usage.UsageError("--max-size and --idle-timeout must be >= 0")

    def sink_options(self) -> SinkOptions:
        """The parsed options as :class:`SinkOptions`."""
        kwargs: dict[str, Any] = {}
        if self["listen"]:
            kwargs["listen"] = tuple(self["listen"])
        if self["hostname"]:
            kwargs["hostname"] = self["hostname"]
        return SinkOptions(
            maildir=self["maildir"],
            certificate=self["tls-cert"],
            key=self["tls-key"],
            faults=tuple(self["fault"]),
            stats_file=self["stats-file"],
            verbose=bool(self["verbose"]),
            chunking=bool(self["chunking"]),
            max_message_size=self["max-size"],
            idle_timeout=self["idle-timeout"],
            auth=tuple(self["auth"].split(":", 1)) if self["auth"] else None,
            # Nobody can read the in-memory list of a separate process: keep no bodies.
            max_messages=0,
            **kwargs,
        )


def _describe(port: IListeningPort) -> str:
    addr: Any = port.getHost()
    if hasattr(addr, "port"):
        return f"{addr.host}:{addr.port}"
    return f"unix:{getattr(addr, 'name', addr)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sendarix sink``; ``argv`` is the arguments after ``sink``.

    Runs the global reactor until SIGTERM/SIGINT; returns the exit status.
    """
    config = SinkCommandOptions()
    try:
        config.parseOptions(list(sys.argv[1:] if argv is None else argv))
        options = config.sink_options()
    except usage.UsageError as e:
        sys.stderr.write(f"sendarix sink: {e}\n")
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    level = LogLevel.info if options.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=level)],
            )
        ],
        redirectStandardIO=False,
    )
    try:
        server = SinkServer(options, reactor)
    except (OSError, ValueError, ssl.SSL.Error) as e:
        sys.stderr.write(f"sendarix sink: {e}\n")
        return 1
    status = [0]

    def started(ports: list[IListeningPort]) -> None:
        for port in ports:
            sys.stdout.write(f"listening on {_describe(port)}\n")
        sys.stdout.flush()
        reactor.addSystemEventTrigger("before", "shutdown", server.stop)

    def failed(reason: Failure) -> None:
        sys.stderr.write(f"sendarix sink: cannot listen: {reason.getErrorMessage()}\n")
        status[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: server.start().addCallbacks(started, failed))
    reactor.run()
    return status[0]

