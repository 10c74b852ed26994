"""``sendarix sink``: a sandbox destination SMTP server with fault injection.

The sink accepts mail on one or more Twisted endpoints and records each message
(in memory, or as files in a directory), so applications and the relay's own tests
and benchmarks have a fast, correct peer.  Faults are injected on request; each is
given as a ``--fault SPEC`` string, parsed by :func:`parse_fault`:

==================================  ==================================================
``refuse``                          accept each connection, then close it at once
                                    without a banner.  (To test "connection refused",
                                    simply do not start a sink on that address.)
``connect:CODE[:ENH][:TEXT]``       banner ``CODE`` (e.g. ``connect:421``) then close
``rcpt:CODE[:ENH]:PATTERN[:TEXT]``  answer ``CODE`` to RCPT whose address matches the
                                    glob ``PATTERN`` (case-insensitive),
                                    e.g. ``rcpt:550:5.1.1:bad*@*``
``first:N:CODE[:ENH][:TEXT]``       answer ``CODE`` to every RCPT of the first ``N``
                                    transactions that reach RCPT (server-wide), e.g.
                                    ``first:1:450:4.2.0:Greylisted, try again in 60 seconds``
``data:CODE[:ENH][:TEXT]``          answer ``CODE`` after the end of DATA/BDAT LAST
``stall[:SECONDS]``                 accept TCP and send no banner (for ever, or for
                                    ``SECONDS`` and then carry on normally)
``stall-data[:SECONDS]``            send no reply after the end of the message data
                                    (for ever, or for ``SECONDS``)
``drop-after-ehlo``                 close the connection right after the EHLO/HELO reply
==================================  ==================================================

With ``--auth USER:PASSWORD`` the sink offers AUTH PLAIN (inside TLS when it has a
certificate) and refuses MAIL without it, so smarthost credentials can be tested.

Faults combine; for RCPT, ``rcpt`` faults are tried before ``first`` faults, each in
the order given, and the first that applies answers.  A 421 reply always closes the
connection.  When ``ENH`` or ``TEXT`` is left out, a sensible default is used (see
``_DEFAULT_ENHANCED`` and ``_DEFAULT_TEXT``).

A message counts as received (``SinkStats.messages``) once it was answered 250 (after
its files were written, with ``maildir``).  The stats file lists every received
message's Message-ID header value in arrival order, duplicates included, so tests can
detect double deliveries.

The package holds the fault specs (``faults``), the options and records (``records``),
one SMTP session (``session``), the shared state of the sessions (``factory``), the
listening server (``server``) and the command (``command``).

Run it with ``sendarix sink --listen tcp:2526 ...`` or ``python -m sendarix.control.cli.sink ...``;
after listening it prints ``listening on HOST:PORT`` once per endpoint, so a test that
listens on port 0 can read the port from its stdout.
"""

from sendarix.control.cli.sink.command import SinkCommandOptions, main
from sendarix.control.cli.sink.factory import SinkFactory
from sendarix.control.cli.sink.faults import Fault, FaultKind, FaultSpecError, parse_fault
from sendarix.control.cli.sink.records import ReceivedMessage, SinkOptions, SinkStats
from sendarix.control.cli.sink.server import SinkServer
from sendarix.control.cli.sink.session import SinkProtocol

__all__ = [
    "Fault",
    "FaultKind",
    "FaultSpecError",
    "ReceivedMessage",
    "SinkCommandOptions",
    "SinkFactory",
    "SinkOptions",
    "SinkProtocol",
    "SinkServer",
    "SinkStats",
    "main",
    "parse_fault",
]
