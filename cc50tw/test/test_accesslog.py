"""
Tests for ``cc50tw.accesslog``: the buffered request lines must be exactly
what the ``twisted.logger`` observers would have written for the event, and
must all reach the file, in order.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogPublisher,
    eventAsJSON,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from cc50tw import accesslog
from cc50tw.logs import twistdLogFile

NAMESPACE = "cc50tw.server.CC50ServerFactory"

#: Arguments of ``logRequest`` after the logger, for a few kinds of request.
REQUESTS: list[tuple[Any, ...]] = [
    (1, "127.0.0.1:5000", "done", "toy", None, 3, 1, 18, 0.1764, 0.0821, "", "length"),
    (2, "10.0.0.5:40112", "shutting_down", "toy", None, None, None, 4410, 1002.117, 8.21, "drained\nin 1s", None),
    (3, "[::1]:7", "cancelled", "llama_server", "m x", None, None, 0, 12.5, None, "", None),
    (4, "h:1", "done", "openai", "qwen\nrequest 9 from", 1, 2, 6, 0.5, 0.25, "", "stop"),
    (2**64 - 1, "é:1", "error", "toy", "été", 0, 0, 0, 1e-9, 0.0, "bad \"quote\" ✓", ""),
]


def eventsFor(requests: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The events ``logRequest`` emits with no sink installed."""
    events: list[dict[str, Any]] = []
    # A source, as the factory's logger has: one that the json form cannot hold.
    log = Logger(namespace=NAMESPACE, source=object(), observer=LogPublisher(events.append))  # type: ignore[arg-type]
    for request in requests:
        accesslog.logRequest(log, *request)
    return events


class Sinked:
    """A sink installed on a ``StringIO`` and a ``Clock``; uninstalled by the test's cleanup."""

    def __init__(self, test: SynchronousTestCase, formatLine: Any, observerFor: Any) -> None:
        self.output = io.StringIO()
        self.clock = Clock()
        self.observer = accesslog.install(observerFor(self.output), self.output, formatLine, self.clock)
        test.addCleanup(accesslog.uninstall)
        assert isinstance(self.observer, accesslog.FlushingObserver)
        self.sink = self.observer.sink
        self.log = Logger(namespace=NAMESPACE, observer=self.observer)


class FormatTests(SynchronousTestCase):
    def test_textLinesAreTheObserversLines(self) -> None:
        """Each buffered line is what ``textFileLogObserver`` writes for the event: newlines indented too."""
        events = eventsFor(REQUESTS)
        expected = "".join(formatEventAsClassicLogText(event) or "" for event in events)
        sinked = Sinked(self, accesslog.TextLines(), textFileLogObserver)
        times = iter([event["log_time"] for event in events])
        sinked.sink.now = lambda: next(times)
        for request in REQUESTS:
            accesslog.logRequest(sinked.log, *request)
        accesslog.uninstall()
        self.assertEqual(sinked.output.getvalue(), expected)
        self.assertEqual(sinked.output.getvalue().count("\n"), len(REQUESTS) + 1)  # a message with a newline: indented

    def test_jsonLinesAreTheObserversLines(self) -> None:
        """Each buffered line is what ``jsonFileLogObserver`` writes: the same keys, order and values."""
        events = eventsFor(REQUESTS)
        expected = [eventAsJSON(dict(event)) for event in events]
        sinked = Sinked(self, accesslog.jsonLine, lambda output: jsonFileLogObserver(output, recordSeparator=""))
        times = iter([event["log_time"] for event in events])
        sinked.sink.now = lambda: next(times)
        for request in REQUESTS:
            accesslog.logRequest(sinked.log, *request)
        accesslog.uninstall()
        lines = sinked.output.getvalue().splitlines()
        self.assertEqual(lines, expected)
        self.assertEqual([json.loads(line)["req_id"] for line in lines], [request[0] for request in REQUESTS])

    def test_withoutSinkAnEvent(self) -> None:
        """With no sink (tests, ``twist``, syslog), the line is the ``twisted.logger`` event, as before."""
        [event] = eventsFor(REQUESTS[:1])
        self.assertEqual((event["req_id"], event["outcome"], event["tokens"]), (1, "done", 3))
        self.assertEqual(event["log_format"], accesslog.REQUEST_FORMAT)


class BufferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sinked = Sinked(self, accesslog.TextLines(), textFileLogObserver)

    def request(self, reqId: int) -> None:
        accesslog.logRequest(self.sinked.log, reqId, "p:1", "done", "toy", None, 1, 1, 6, 0.1, 0.1, "", "length")

    def test_flushedByTheTimer(self) -> None:
        """Lines wait at most ``FLUSH_INTERVAL``, and one timer serves many lines; none is left when idle."""
        self.request(1)
        self.request(2)
        self.assertEqual(self.sinked.output.getvalue(), "")
        self.assertEqual(len(self.sinked.clock.getDelayedCalls()), 1)
        self.sinked.clock.advance(accesslog.FLUSH_INTERVAL)
        self.assertEqual(self.sinked.output.getvalue().count("] request "), 2)
        self.assertEqual(self.sinked.clock.getDelayedCalls(), [])

    def test_otherEventsKeepTheOrder(self) -> None:
        """Any other event flushes the buffer first, so the file keeps the order things happened in."""
        self.request(1)
        self.sinked.log.info("closing idle connection")
        self.request(2)
        self.sinked.clock.advance(accesslog.FLUSH_INTERVAL)
        lines = self.sinked.output.getvalue().splitlines()
        self.assertEqual([line.split("] ", 1)[1][:20] for line in lines], [
            "request 1 from p:1: ",
            "closing idle connect",
            "request 2 from p:1: ",
        ])

    def test_bounded(self) -> None:
        """A busy server writes every ``MAX_BUFFERED_LINES`` lines without waiting for the timer."""
        for number in range(accesslog.MAX_BUFFERED_LINES):
            self.request(number)
        self.assertEqual(self.sinked.output.getvalue().count("\n"), accesslog.MAX_BUFFERED_LINES)

    def test_jsonFlushesSooner(self) -> None:
        """
        A json line costs several times a text line to format, and lines are
        formatted at flush, on the reactor: the json observer flushes every
        ``MAX_BUFFERED_JSON_LINES`` so that one flush holds the reactor no
        longer than the text form's.
        """
        from cc50tw import logs

        self.addCleanup(setattr, accesslog, "_sink", accesslog._sink)
        logs.jsonObserver()
        assert accesslog._sink is not None
        self.assertEqual(accesslog._sink.maxBuffered, accesslog.MAX_BUFFERED_JSON_LINES)
        self.assertLess(accesslog.MAX_BUFFERED_JSON_LINES, accesslog.MAX_BUFFERED_LINES)

    def test_flushedAtShutdown(self) -> None:
        """``install`` flushes after the reactor shuts down: a drain's last lines are not lost."""
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        output = io.StringIO()
        accesslog.install(textFileLogObserver(output), output, accesslog.TextLines(), reactor)
        self.request(1)
        self.assertEqual(output.getvalue(), "")
        [trigger] = reactor.triggers["after"]["shutdown"]
        trigger[0](*trigger[1], **trigger[2])
        self.assertIn("] request 1 from p:1: done", output.getvalue())

    def test_writeFailureIsNotTheServers(self) -> None:
        """A write that fails (full disk, closed file) loses those lines, says so on stderr, and raises nothing."""
        self.request(1)
        self.sinked.output.close()
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        self.sinked.clock.advance(accesslog.FLUSH_INTERVAL)
        self.assertIn("could not write 1 request log lines", stderr.getvalue())
        self.request(2)
        self.sinked.clock.advance(accesslog.FLUSH_INTERVAL)


    def test_unformattableLineIsLostAlone(self) -> None:
        """Lines are formatted when flushed: one that cannot be is reported on stderr, the rest written."""
        self.request(1)
        # A model that is not text (a backend bug): its line cannot be formatted.
        self.sinked.sink.add(NAMESPACE, accesslog.RequestRecord(2, "p", "done", "toy", object(), 1, 1, 1, 1.0, None, "", None))  # type: ignore[arg-type]
        self.request(3)
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        self.sinked.clock.advance(accesslog.FLUSH_INTERVAL)
        self.assertIn("could not format a request log line", stderr.getvalue())
        lines = self.sinked.output.getvalue().splitlines()
        self.assertEqual([line.split("] ", 1)[1][:10] for line in lines], ["request 1 ", "request 3 "])


class TwistdLogFileTests(SynchronousTestCase):
    """The file ``textObserver`` writes to is the one twistd's own logger would have chosen."""

    def test_foregroundStdout(self) -> None:
        self.assertIs(twistdLogFile(None, True), sys.stdout)
        self.assertIs(twistdLogFile("-", True), sys.stdout)

    def test_daemonCannotLogToStdout(self) -> None:
        self.assertRaises(SystemExit, twistdLogFile, "-", False)

    def test_logfile(self) -> None:
        import signal

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = os.path.join(tempfile.mkdtemp(), "cc50.log")
        output = twistdLogFile(path, True)
        self.addCleanup(output.close)
        self.assertIsInstance(output, LogFile)
        self.assertEqual(output.path, path)  # type: ignore[attr-defined]
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))  # rotation on SIGUSR1, as twistd does


class _Recording:
    """Stands in for the sink: keeps the records the server logs."""

    def __init__(self) -> None:
        self.records: list[accesslog.RequestRecord] = []

    def add(self, namespace: str, record: accesslog.RequestRecord) -> None:
        self.records.append(record)


class LoggedLatencyTests(SynchronousTestCase):
    def test_latencyIsTheElapsedTimeTheClientReads(self) -> None:
        """
        The request line's latency is RESP_DONE's ``elapsed_us``: one clock
        reading ends both, even with a clock that moves on every reading.
        """
        from twisted.internet.testing import MemoryReactorClock

        from cc50tw.backends.lcg import CPUEngine
        from cc50tw.backends.toy import ToyBackend
        from cc50tw.codec import MessageType, decode_done, encode_infer
        from cc50tw.server import CC50ServerFactory, ServerConfig
        from cc50tw.test.fakes import Connection

        readings = iter(range(1000, 10**6, 7))  # ms: every reading 7 ms after the last

        def clock() -> float:
            return next(readings) / 1e3

        reactor = MemoryReactorClock()
        backend = ToyBackend(reactor, CPUEngine(reactor, None), 0)  # type: ignore[arg-type]
        factory = CC50ServerFactory(backend, ServerConfig(), reactor, clock=clock)
        recording = _Recording()
        self.patch(accesslog, "_sink", recording)
        connection = Connection(factory)
        connection.send(encode_infer(1, "hi", 3))
        [done] = [frame for frame in connection.received() if frame.type == MessageType.RESP_DONE]
        [record] = recording.records
        self.assertAlmostEqual(record.latencyMs * 1e3, decode_done(done).elapsed_us, places=3)
