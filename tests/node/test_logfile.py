"""The workers' log observer: twistd's lines, written a pass of the reactor at a time."""

from __future__ import annotations

import atexit
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.events.sinks import PLAIN_TEXT, JSONLogSink
from sendarix.model.event import Event
from sendarix.node.logfile import BatchedTextObserver, worker_observer
from tests.support import relayproc


class RunningClock(Clock):
    """A clock that says it runs, as the reactor does once started."""

    running = True


class CountingOut(io.StringIO):
    """A text file that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def line(text: str, when: float = 1_765_000_000.25, **extra: object) -> dict[str, object]:
    """A log event as twisted.logger makes one."""
    return {
        "log_format": text, "log_time": when, "log_level": LogLevel.info,
        "log_namespace": "test", **extra,
    }


class BatchedTextObserverTests(SynchronousTestCase):
    """What is written, and when."""

    def setUp(self) -> None:
        self.clock = RunningClock()
        self.out = CountingOut()
        self.observer = BatchedTextObserver(self.out, self.clock)
        # The test's thread stands for the reactor's.
        self.patch(threadable, "ioThread", threading.get_ident())

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(ILogObserver, self.observer))

    def test_one_write_per_pass(self) -> None:
        """The lines of one pass are written together when it ends, as twistd's own
        observer would have written them one by one."""
        events = [line("first"), line("second {x}", x=2), line("third")]
        for event in events:
            self.observer(event)
        self.assertEqual(self.out.writes, [])
        self.clock.advance(0)
        expected = "".join(formatEventAsClassicLogText(e) or "" for e in events)
        self.assertEqual(self.out.writes, [expected])
        self.assertIn("] second 2\n", expected)
        self.observer(line("fourth"))
        self.clock.advance(0)
        self.assertEqual(len(self.out.writes), 2)

    def test_warning_written_at_once_after_what_came_before(self) -> None:
        self.observer(line("before"))
        self.observer(line("trouble", log_level=LogLevel.warn))
        self.assertEqual(len(self.out.writes), 1)
        self.assertRegex(
            self.out.getvalue(), r"^\S+ \[test#info\] before\n\S+ \[test#warn\] trouble\n$")
        self.clock.advance(0)
        self.assertEqual(len(self.out.writes), 1)

    def test_written_at_once_when_the_reactor_does_not_run(self) -> None:
        self.clock.running = False
        self.observer(line("starting up"))
        self.assertEqual(len(self.out.writes), 1)

    def test_written_at_once_from_another_thread(self) -> None:
        """A line logged by another thread does not wait for a pass it cannot ask
        for (callLater belongs to the reactor's thread)."""
        worker = threading.Thread(target=self.observer, args=(line("from a thread"),))
        worker.start()
        worker.join()
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_whole_lines_up_to_the_limit(self) -> None:
        """Past the limit the gathered lines go out; every write ends with a whole
        line and stays within the limit, unless one line alone is longer."""
        observer = BatchedTextObserver(self.out, self.clock, limit=300)
        for i in range(40):
            observer(line(f"message {i:03d} " + "x" * 20))
        observer(line("long " + "y" * 400))
        observer(line("after the long one"))
        self.clock.advance(0)
        self.assertGreater(len(self.out.writes), 3)
        for write in self.out.writes:
            self.assertTrue(write.endswith("\n"))
            if "y" * 400 in write:
                self.assertEqual(write.count("\n"), 1)  # alone, as long as it is
            else:
                self.assertLessEqual(len(write), 300)
        self.assertEqual(self.out.getvalue().count("\n"), 42)
        self.assertTrue(self.out.getvalue().endswith("] after the long one\n"))

    def test_a_line_logged_in_the_middle_of_a_write(self) -> None:
        """A line logged on the thread that is writing (as a signal handler logs one:
        twistd's for SIGTERM does) is written right after the interrupted write, and
        the thread goes on.  A plain lock made that thread wait for itself, forever."""
        observer: BatchedTextObserver

        class Interrupted(CountingOut):
            def write(self, text: str) -> int:
                if not self.writes:
                    observer(line("Received SIGTERM, shutting down."))
                return super().write(text)

        out = Interrupted()
        observer = BatchedTextObserver(out, self.clock)
        done = threading.Event()

        def log() -> None:
            # Another thread than the reactor's: written at once.
            observer(line("the last line before the signal"))
            done.set()

        threading.Thread(target=log, daemon=True).start()
        self.assertTrue(done.wait(10), "the thread waits for itself in the observer")
        self.assertEqual(len(out.writes), 2)
        self.assertIn("] the last line before the signal\n", out.writes[0])
        self.assertIn("] Received SIGTERM, shutting down.\n", out.writes[1])

    def test_a_signal_during_a_write(self) -> None:
        """The same with a real signal, in a process of its own (so that a deadlock
        fails the test instead of stopping the suite): the handler's line follows
        the interrupted write, and the process ends."""
        script = textwrap.dedent("""
            import os, signal, sys
            from twisted.internet.task import Clock
            from twisted.logger import LogLevel
            from sendarix.node.logfile import BatchedTextObserver

            def line(text):
                return {"log_format": text, "log_time": 1765000000.0,
                        "log_level": LogLevel.info, "log_namespace": "test"}

            class Out:
                def __init__(self):
                    self.texts = []
                def write(self, text):
                    if not self.texts:
                        os.kill(os.getpid(), signal.SIGUSR2)
                    # The handler runs at one of the next steps, still in this write.
                    self.texts.append(text)
                def flush(self):
                    pass

            class Stopped(Clock):
                running = False  # as before the reactor starts: written at once

            out = Out()
            observer = BatchedTextObserver(out, Stopped())
            signal.signal(signal.SIGUSR2, lambda *_: observer(line("from the handler")))
            observer(line("interrupted"))
            sys.stdout.write("".join(out.texts))
        """)
        try:
            done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                  text=True, timeout=30, env=relayproc.env(), check=False)
        except subprocess.TimeoutExpired:
            self.fail("the process waits for itself in the observer")
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 2, done.stdout)
        self.assertTrue(lines[0].endswith("] interrupted"), lines)
        self.assertTrue(lines[1].endswith("] from the handler"), lines)

    def test_a_failing_log_does_not_raise(self) -> None:
        """A log that cannot be written (full disk, closed pipe) drops its lines."""
        class Broken(io.StringIO):
            def write(self, text: str) -> int:
                raise OSError(28, "No space left on device")

        observer = BatchedTextObserver(Broken(), self.clock)
        observer(line("lost"))
        self.clock.advance(0)
        observer(line("lost too", log_level=LogLevel.error))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failure_written_at_once_with_its_traceback(self) -> None:
        """``log.failure`` (critical, with a traceback) goes out at once, its
        traceback's lines indented as twistd writes them."""
        try:
            1 / 0  # noqa: B018 - a real traceback to log
        except ZeroDivisionError:
            failure = Failure()
        self.observer(line("it broke", log_level=LogLevel.critical, log_failure=failure))
        self.assertEqual(len(self.out.writes), 1)
        written = self.out.writes[0]
        self.assertIn("] it broke\n\tTraceback (most recent call last):\n", written)
        self.assertIn("\tbuiltins.ZeroDivisionError: division by zero\n", written)

    @given(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    )
    def test_event_lines_as_twisted_writes_them(self, queue_id: str, recipient: str) -> None:
        """The event sink's lines carry their text, which is written as it is: the
        same line twistd's formatter makes from the event (braces, new lines and all)."""
        events: list[dict[str, object]] = []
        sink = JSONLogSink(logger=Logger(namespace="sendarix.events", observer=events.append))
        sink.emit(Event.make("accepted", 1_765_000_000.5, queue_id=queue_id,
                             recipient=recipient))
        [event] = events
        self.assertIn(PLAIN_TEXT, event)
        observer = BatchedTextObserver(io.StringIO(), self.clock)
        self.assertEqual(observer._format(event), formatEventAsClassicLogText(event))

    def test_event_without_text_writes_nothing(self) -> None:
        self.observer({"log_time": 1.0, "log_level": LogLevel.info})
        self.clock.advance(0)
        self.assertEqual(self.out.writes, [])

    @given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), max_size=20))
    def test_time_as_twisted_writes_it(self, times: list[float]) -> None:
        """The time, worked out once a second, is the text twistd would write."""
        observer = BatchedTextObserver(io.StringIO(), self.clock)
        for when in sorted(times) + times:
            self.assertEqual(observer._time(when), formatTime(when))
        self.assertEqual(observer._time(None), formatTime(None))


class WorkerObserverTests(SynchronousTestCase):
    """The factory twistd's ``--logger`` names in a worker's command line."""

    def make(self) -> BatchedTextObserver:
        """worker_observer(), with what it sets up for the process undone afterwards."""
        usr1 = signal.getsignal(signal.SIGUSR1)
        observer = worker_observer()
        self.addCleanup(signal.signal, signal.SIGUSR1, usr1)
        self.addCleanup(atexit.unregister, observer.flush)
        return observer

    def test_writes_to_the_logfile_given(self) -> None:
        path = os.path.abspath(self.mktemp())
        self.patch(os.sys, "argv", ["-c", "-n", f"--logfile={path}", "sendarix", "--worker", "1"])
        observer = self.make()
        # The reactor is not running in this test: the line is written at once.
        observer(line("hello from a worker"))
        with open(path) as f:
            self.assertIn("[test#info] hello from a worker\n", f.read())

    def test_writes_to_standard_output_without_one(self) -> None:
        out = CountingOut()
        self.patch(os.sys, "stdout", out)
        self.patch(os.sys, "argv", ["-c", "-n", "sendarix", "--worker", "1"])
        observer = self.make()
        observer(line("to stdout"))
        self.assertIn("to stdout\n", out.getvalue())
