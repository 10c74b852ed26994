"""The ``sendarix`` operator command: credentials, sending domains, suppressions,
queue, delivery log, webhooks, configuration.

``sendarix [--config PATH] COMMAND ...`` works directly on the stores the relay uses
(SQLite in WAL mode lets both share the file), so it also works while the relay is
stopped.  ``--config`` may come before or after the command; without it
``./sendarix.toml`` is read when present, else the built-in development default.

Output contract (docs/operator-guide.md): listing commands take ``--json`` and then
print one JSON array of objects; exit status 0 on success, 1 on a user error with a
one-line reason on stderr, 2 on an internal error (with a traceback).

Commands that need the stores run their asynchronous part under ``task.react``; they
return their output instead of printing it, so all writing happens after the reactor
has stopped and a closed pipe (``| head``) cannot break a store operation halfway.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet.task import react
from twisted.python.failure import Failure

from sendarix import __version__
from sendarix.config.errors import ConfigError
from sendarix.config.loader import resolve_config
from sendarix.config.settings import Config
from sendarix.control.cli import config as config_commands
from sendarix.control.cli import credentials as credential_commands
from sendarix.control.cli import domains as domain_commands
from sendarix.control.cli import log as log_commands
from sendarix.control.cli import queue as queue_commands
from sendarix.control.cli import suppressions as suppression_commands
from sendarix.control.cli import tenants as tenant_commands
from sendarix.control.cli import webhooks as webhook_commands
from sendarix.control.cli.common import (
    PROG,
    CommandError,
    Output,
    Parser,
    StoreCommand,
    UsageError,
    parse_time,
    render_table,
)
from sendarix.stores.backends import open_stores
from sendarix.stores.errors import SpoolError, StoreUnavailable

__all__ = ["CommandError", "main", "parse_time", "render_table"]


# -- the parser --------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    # Sub-parsers get --config with a SUPPRESS default so they only set it when it is
    # given after the command; given before, the top-level parser's value stays.
    config_opt = Parser(add_help=False)
    config_opt.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML configuration file"
    )
    json_opt = Parser(add_help=False)
    json_opt.add_argument("--json", action="store_true", help="print JSON")
    common = [config_opt]
    listing = [config_opt, json_opt]

    parser = Parser(
        prog=PROG,
        description="Operate a Sendarix relay: credentials, queue, delivery log, configuration.",
        epilog="Without --config, ./sendarix.toml is read when present, else the built-in "
        "development default.  'sendarix sink --help' describes the test sink.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="TOML configuration file (also accepted after the command)",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> Any:
        p = commands.add_parser(name, parents=common, help=help, description=help)
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    # One module per command group, each adding its own commands.
    for commands_of in (config_commands, credential_commands, domain_commands,
                        suppression_commands, queue_commands, log_commands,
                        webhook_commands, tenant_commands):
        commands_of.register(group, common, listing)

    # sink: dispatched before parsing (see main); listed here for --help.
    commands.add_parser(
        "sink", help="run the test SMTP sink (see 'sendarix sink --help')", add_help=False
    )
    return parser


# -- running --------------------------------------------------------------------------


def _sink_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``sink`` when the command is ``sink`` (``--config`` may come
    first and is ignored: the sink has no configuration file), else None."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            i += 2
        elif arg.startswith("--config="):
            i += 1
        else:
            return argv[i + 1 :] if arg == "sink" else None
    return None


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


#: Seconds the command waits for an unreachable Redis before giving up.
REDIS_WAIT = 5.0


def _run_with_stores(config: Config, command: StoreCommand, args: argparse.Namespace) -> Output:
    """Open the stores, run ``command``, close the stores (always); the command's output.

    Raises CommandError for user errors; anything else unexpected comes back as the
    Failure it was, re-raised here.
    """
    result: list[Output | BaseException | Failure] = []

    async def work(reactor: Any) -> None:
        try:
            stores = open_stores(config, reactor, json_log=False)
        except (NotImplementedError, ValueError) as e:  # e.g. an unset password_env
            result.append(CommandError(str(e)))
            return
        where = stores.location
        failures = tuple(stores.backend.errors)
        try:
            await stores.open(wait=REDIS_WAIT)
        except StoreUnavailable as e:
            result.append(CommandError(str(e)))  # it names the store
            await stores.close()
            return
        try:
            result.append(await command(args, stores))
        except CommandError as e:
            result.append(e)
        except (SpoolError, StoreUnavailable, *failures) as e:
            result.append(CommandError(f"{where}: {e}"))
        except BaseException:
            result.append(Failure())
        finally:
            await stores.close()

    try:
        react(work)
    except SystemExit as e:
        if e.code not in (0, None) and not result:
            # react logged the failure already (closing the stores failed).
            raise CommandError("the stores did not close cleanly") from None
    if not result:  # interrupted (SIGINT/SIGTERM) before the command finished
        raise CommandError("interrupted")
    outcome = result[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _write(output: Output) -> None:
    if output.note:
        sys.stderr.write(output.note + "\n")
        sys.stderr.flush()
    if isinstance(output.stdout, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(output.stdout)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(output.stdout)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``sendarix`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    sink_args = _sink_arguments(arguments)
    if sink_args is not None:
        from sendarix.control.cli import sink

        return sink.main(sink_args)

    parser = _build_parser()
    try:
        args = parser.parse_args(arguments)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    except SystemExit as e:  # --help and --version print and exit 0
        return e.code if isinstance(e.code, int) else 0
    try:
        config = resolve_config(args.config)
    except ConfigError as e:
        _error(f"configuration error: {e}")
        return 1
    try:
        if hasattr(args, "plain"):
            output = args.plain(args, config)
        else:
            output = _run_with_stores(config, args.store, args)
        _write(output)
    except CommandError as e:
        _error(str(e))
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): not worth a traceback.  Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception:
        Failure().printTraceback(sys.stderr)
        _error("internal error (traceback above)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
