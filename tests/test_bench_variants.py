"""The bench's variant names, its PyPy runtime option, and a node that does not come
up (tests/bench); the bench itself is not part of the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from sendarix.config.loader import parse_config
from tests.bench import sendarix
from tests.bench.run import reactor_of, variant
from tests.bench.sendarix import (
    REACTORS,
    Failed,
    Refused,
    SendarixSystem,
    check_pypy,
    on_interpreter,
)

MIB = 1024 * 1024


class VariantNameTests(SynchronousTestCase):
    def test_options(self) -> None:
        """``+pypy`` is an option beside the reactor and ``+nolog``, not a reactor."""
        self.assertEqual(variant("default+pypy"), ("default", None))
        self.assertEqual(variant("sqlite-w2+asyncio+nolog+pypy"), ("sqlite", 2))
        self.assertEqual(variant("default+nogather"), ("default", None))
        self.assertEqual(reactor_of("default+pypy"), "epoll")
        self.assertEqual(reactor_of("default+pypy+asyncio"), "asyncio")
        for bad in ("default+pypy+pypy", "default+asyncio+uvloop", "default+jython"):
            with self.assertRaises(ValueError, msg=bad):
                variant(bad)

    def test_name(self) -> None:
        system = SendarixSystem("x", 1, 2, 3, spool="default", workers=None,
                                max_connections=10, size_limit=1, json_log=False,
                                pypy=True)
        self.assertEqual(system.name, "sendarix-default+nolog+pypy")

    def test_nogather(self) -> None:
        """``+nogather`` turns the wait for company off in the node's [delivery]."""
        system = SendarixSystem("x", 1, 2, 3, spool="default", workers=None,
                                max_connections=10, size_limit=MIB, gather="nogather")
        self.assertEqual(system.name, "sendarix-default+nogather")
        config = parse_config(tomllib.loads(system.config_text()), "/tmp")
        self.assertEqual(config.delivery.gather_time, 0.0)
        default = SendarixSystem("x", 1, 2, 3, spool="default", workers=None,
                                 max_connections=10, size_limit=MIB)
        self.assertEqual(
            parse_config(tomllib.loads(default.config_text()), "/tmp").delivery.gather_time,
            0.05,
        )

    def test_burst(self) -> None:
        """``+burst`` lets fresh mail wait up to 5 s for 100 of its site while clients
        are sending; it cannot be asked for together with ``+nogather``."""
        self.assertEqual(variant("default+burst+nolog"), ("default", None))
        with self.assertRaises(ValueError):
            variant("default+burst+nogather")
        system = SendarixSystem("x", 1, 2, 3, spool="default", workers=None,
                                max_connections=10, size_limit=MIB, gather="burst")
        self.assertEqual(system.name, "sendarix-default+burst")
        config = parse_config(tomllib.loads(system.config_text()), "/tmp")
        self.assertEqual((config.delivery.gather_time, config.delivery.gather_messages),
                         (5.0, 100))
        with self.assertRaises(ValueError):
            SendarixSystem("x", 1, 2, 3, spool="default", workers=None,
                           max_connections=10, size_limit=MIB, gather="never")

    def test_nopin(self) -> None:
        """``+nopin`` lets the workers move between CPUs (``cpu_affinity = "none"``),
        also with a worker count of its own; the default keeps them placed."""
        self.assertEqual(variant("sqlite-w2+nopin"), ("sqlite", 2))
        system = SendarixSystem("x", 1, 2, 3, spool="sqlite", workers=2,
                                max_connections=10, size_limit=MIB, pin=False)
        self.assertEqual(system.name, "sendarix-sqlite-w2+nopin")
        config = parse_config(tomllib.loads(system.config_text()), "/tmp")
        self.assertEqual((config.node.workers, config.node.cpu_affinity), (2, "none"))
        default = SendarixSystem("x", 1, 2, 3, spool="default", workers=None,
                                 max_connections=10, size_limit=MIB)
        self.assertEqual(
            parse_config(tomllib.loads(default.config_text()), "/tmp").node.cpu_affinity,
            "auto",
        )


class PyPyTests(SynchronousTestCase):
    def test_command(self) -> None:
        """The node's command is the same twistd command, on the other interpreter."""
        for reactor, command in REACTORS.items():
            self.assertEqual(on_interpreter(command, None), command, reactor)
            self.assertEqual(on_interpreter(command, "/opt/pypy/bin/pypy3"),
                             ["/opt/pypy/bin/pypy3", *command[1:]], reactor)

    def test_none_installed(self) -> None:
        with self.assertRaises(Refused) as caught:
            check_pypy(None)
        self.assertIn("no pypy3", str(caught.exception))

    def test_missing_interpreter(self) -> None:
        with self.assertRaises(Refused):
            check_pypy("/nonexistent/pypy3")

    def test_interpreter_that_can_run_the_relay(self) -> None:
        """The probe names the interpreter; ours passes it, as a 3.11 PyPy would."""
        self.assertIn(sys.version.split()[0], check_pypy(sys.executable))

    def test_too_old(self) -> None:
        """Debian 12's pypy3 is Python 3.9: refused with the versions named."""
        pypy = shutil.which("pypy3")
        if pypy is None:
            raise self.skipTest("no pypy3 installed")
        version = subprocess.run([pypy, "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout
        if tuple(int(part) for part in version.split()) >= (3, 11):
            raise self.skipTest("this pypy3 is recent enough")
        with self.assertRaises(Refused) as caught:
            check_pypy(pypy)
        self.assertIn("needs Python 3.11", str(caught.exception))


class StartFailureTests(SynchronousTestCase):
    def test_node_that_never_listens_is_stopped(self) -> None:
        """A node that starts but never answers is ended (by its PID) before the
        failure is reported, not left running through the rest of the bench."""
        self.patch(sendarix, "REACTORS", {"epoll": [sys.executable, "-c",
                                                    "import time; time.sleep(60)"]})

        def never(timeout: float) -> None:
            raise Failed("not listening")

        system = SendarixSystem(self.mktemp(), 1, 2, 3, spool="default", workers=None,
                                max_connections=10, size_limit=1)
        self.patch(system, "_wait_listening", never)
        started: list[int] = []
        popen = subprocess.Popen

        def recording(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
            proc = popen(*args, **kwargs)  # type: ignore[call-overload]
            started.append(proc.pid)
            return proc

        self.patch(sendarix.subprocess, "Popen", recording)
        with self.assertRaises(Failed):
            system.start()
        self.assertIsNone(system.proc)
        [pid] = started
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)
