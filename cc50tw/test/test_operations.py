"""
What operators rely on: metrics, health, the per-request log line,
authentication and the graceful drain, all on fake transports and a fake clock.
"""

from __future__ import annotations

import io
import json

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from cc50tw.codec import ErrorCode, MessageType, encode_cancel, encode_frame, encode_hello, encode_infer
from cc50tw.test.fakes import Connection, ManualBackend, error_code, make_factory, terminal_frames
from cc50tw.web import _Health, readiness


def sample(factory: object, name: str, **labels: str) -> float | None:
    value = factory.metrics.registry.get_sample_value(name, labels or None)  # type: ignore[attr-defined]
    return value


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend)
        self.connection = Connection(self.factory)

    def test_requestOutcomesLatencyAndTokens(self) -> None:
        self.connection.send(encode_infer(1, "a b c") + encode_infer(2, "x"))
        self.clock.advance(0.002)
        self.backend.streams[1].write("hello")
        self.clock.advance(0.001)
        self.backend.streams[1].write("world")
        self.backend.streams[1].finish(prompt_tokens=3, generated_tokens=2)
        self.connection.send(encode_cancel(2))

        self.assertEqual(sample(self.factory, "cc50_requests_total", outcome="done"), 1)
        self.assertEqual(sample(self.factory, "cc50_requests_total", outcome="cancelled"), 1)
        self.assertEqual(sample(self.factory, "cc50_generated_tokens_total"), 2)
        self.assertEqual(sample(self.factory, "cc50_prompt_tokens_total"), 3)
        self.assertEqual(sample(self.factory, "cc50_time_to_first_token_seconds_count"), 1)
        self.assertAlmostEqual(sample(self.factory, "cc50_time_to_first_token_seconds_sum") or 0, 0.002)
        self.assertAlmostEqual(sample(self.factory, "cc50_inter_token_latency_seconds_sum") or 0, 0.001)
        self.assertEqual(sample(self.factory, "cc50_request_duration_seconds_count"), 2)
        sent = sample(self.factory, "cc50_bytes_sent_total") or 0
        self.assertEqual(sent, len(b"".join(f.payload for f in self.connection.received())) + 24 * 4)
        self.assertEqual(sample(self.factory, "cc50_connections_open"), 1)

    def test_backendErrorsByKind(self) -> None:
        from cc50tw.errors import BackendError

        self.connection.send(encode_infer(1, "a"))
        self.backend.streams[1].fail(BackendError("down", ErrorCode.UPSTREAM_UNAVAILABLE))
        self.assertEqual(sample(self.factory, "cc50_backend_errors_total", kind="upstream_unavailable"), 1)
        self.assertEqual(sample(self.factory, "cc50_requests_total", outcome="upstream_unavailable"), 1)

    def test_inFlightQueuedAndPauses(self) -> None:
        factory, _ = make_factory(self.backend, max_concurrency=1)
        connection = Connection(factory)
        connection.send(encode_infer(1, "a", credit_bytes=1) + encode_infer(2, "b"))
        self.backend.streams[1].write("xy")
        self.assertEqual(sample(factory, "cc50_requests_in_flight"), 1)
        self.assertEqual(sample(factory, "cc50_requests_queued"), 1)
        self.assertEqual(sample(factory, "cc50_flow_control_pauses_total", reason="credit"), 1)
        text = generate_latest(factory.metrics.registry).decode()
        self.assertIn("cc50_time_to_first_token_seconds_bucket", text)


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory, _ = make_factory(ManualBackend())
        self.listening = True

    def render(self) -> tuple[int, bytes]:
        request = DummyRequest([b""])
        body = _Health(lambda: readiness(self.factory, lambda: self.listening)).render_GET(request)  # type: ignore[arg-type]
        return request.responseCode or 200, body

    def test_readyWhenListeningAndHealthy(self) -> None:
        code, body = self.render()
        self.assertEqual(code, 200)
        self.assertIn(b"ok", body)

    def test_notReadyWhenBackendUnhealthyDrainingOrNotListening(self) -> None:
        self.factory.backendHealthy = False
        self.assertEqual(self.render()[0], 503)
        self.factory.backendHealthy = True
        self.listening = False
        self.assertEqual(self.render()[0], 503)
        self.listening = True
        self.factory.draining = True
        code, body = self.render()
        self.assertEqual((code, body), (503, b"unavailable: shutting down\n"))


class RequestLogTests(SynchronousTestCase):
    def test_oneLinePerRequestWithItsFields(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(9, "a"))
            for _ in range(100):
                backend.streams[9].write("tok")
            backend.streams[9].finish(prompt_tokens=1, generated_tokens=100)
        [event] = [e for e in events if e.get("req_id") == 9]
        self.assertEqual((event["outcome"], event["tokens"], event["backend"]), ("done", 100, "manual"))
        self.assertIn("request 9 from", formatEvent(event))

    def test_quietRequests(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend, log_requests=False)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(9, "a"))
            backend.streams[9].finish()
        self.assertEqual([e for e in events if e.get("req_id") == 9], [])

    def test_jsonObserverWritesOneObjectPerLine(self) -> None:
        from twisted.logger import Logger, jsonFileLogObserver

        output = io.StringIO()
        Logger(observer=jsonFileLogObserver(output, recordSeparator="")).info("hello {who}", who="you")
        [line] = output.getvalue().splitlines()
        self.assertEqual(json.loads(line)["who"], "you")


class AuthenticationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, _ = make_factory(self.backend, auth_token=b"s3cret")
        self.connection = Connection(self.factory)

    def test_requestBeforeHelloIsRefused(self) -> None:
        self.connection.send(encode_infer(4, "sneaky"))
        [frame] = self.connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (0, ErrorCode.UNAUTHORIZED))
        self.assertTrue(self.connection.transport.disconnecting)
        self.assertEqual(self.backend.streams, {})

    def test_wrongTokenIsRefused(self) -> None:
        self.connection.send(encode_hello(b"guess") + encode_infer(1, "x"))
        [frame] = self.connection.received()
        self.assertEqual(error_code(frame), ErrorCode.UNAUTHORIZED)
        self.assertTrue(self.connection.transport.disconnecting)
        self.assertEqual(self.backend.streams, {})

    def test_rightTokenThenRequests(self) -> None:
        self.connection.send(encode_hello(b"s3cret") + encode_infer(1, "x"))
        [hello] = self.connection.received()
        self.assertEqual(hello.type, MessageType.HELLO)
        self.assertTrue(hello.payload.startswith(b"cc50tw/"))
        self.assertIn(1, self.backend.streams)

    def test_withoutAuthHelloIsAnsweredAndOptional(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "no hello, like the C++ client"))
        self.assertIn(1, backend.streams)
        connection.send(encode_frame(MessageType.HELLO, 0, b"anything"))
        self.assertEqual(connection.received()[0].type, MessageType.HELLO)


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend)
        self.connection = Connection(self.factory)

    def shutdown(self, timeout: float) -> Deferred[None]:
        return Deferred.fromCoroutine(self.factory.shutdown(timeout, closeTimeout=1.0))

    def test_inFlightFinishesNewRequestsRefused(self) -> None:
        self.connection.send(encode_infer(1, "long"))
        stopped = self.shutdown(30.0)
        self.assertNoResult(stopped)
        self.connection.send(encode_infer(2, "late"))
        [refused] = self.connection.received()
        self.assertEqual((refused.req_id, error_code(refused)), (2, ErrorCode.SHUTTING_DOWN))
        self.backend.streams[1].write("still served")
        self.backend.streams[1].finish()
        self.assertEqual([f.type for f in self.connection.received()], [MessageType.RESP_CHUNK, MessageType.RESP_DONE])
        self.assertTrue(self.connection.transport.disconnecting)
        self.connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(stopped)

    def test_drainTimeoutEndsTheRestWithShuttingDown(self) -> None:
        self.connection.send(encode_infer(1, "a") + encode_infer(2, "b"))
        stopped = self.shutdown(5.0)
        self.clock.advance(4.9)
        self.assertEqual(self.connection.received(), [])
        self.clock.advance(0.2)
        frames = self.connection.received()
        for req_id in (1, 2):
            [terminal] = terminal_frames(frames, req_id)
            self.assertEqual(error_code(terminal), ErrorCode.SHUTTING_DOWN)
            self.assertTrue(self.backend.streams[req_id].cancelled)
        self.assertTrue(self.connection.transport.disconnecting)
        self.assertNoResult(stopped)
        self.clock.advance(1.1)  # the connection never closed: it is aborted
        self.successResultOf(stopped)

    def test_idleServerStopsAtOnce(self) -> None:
        stopped = self.shutdown(30.0)
        self.assertTrue(self.connection.transport.disconnecting)
        self.connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(stopped)


class OrderedTransport(StringTransport):
    """Records writes and the close in one sequence, so their order can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.events.append("close-then-write" if self.disconnecting else "write")
        super().write(data)

    def loseConnection(self) -> None:
        self.events.append("close")
        super().loseConnection()


class DrainOrderTests(SynchronousTestCase):
    def test_lastTerminalFrameIsWrittenBeforeTheDrainCloses(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        transport = OrderedTransport()
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(transport)
        protocol.dataReceived(encode_infer(1, "last one"))
        stopped = Deferred.fromCoroutine(factory.shutdown(30.0))
        backend.streams[1].finish()
        self.assertEqual(transport.events[-2:], ["write", "close"])
        self.assertNotIn("close-then-write", transport.events)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(stopped)


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """``histogram_quantile`` over cumulative ``(upper bound, count)`` pairs, as PromQL interpolates it."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class StandardMetricsTests(SynchronousTestCase):
    """Issue #16: the series every dashboard expects, and TTFT buckets fine enough to read."""

    def test_processAndPythonSeries(self) -> None:
        factory, _ = make_factory(ManualBackend())
        text = generate_latest(factory.metrics.registry).decode()
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info", "python_gc_objects_collected_total"):
            self.assertIn(name, text)

    def test_ttftQuantileOfA51msRequest(self) -> None:
        backend = ManualBackend()
        factory, clock = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "a"))
        clock.advance(0.051)
        backend.streams[1].write("x")
        backend.streams[1].finish(prompt_tokens=1, generated_tokens=1)
        registry = factory.metrics.registry
        buckets = [
            (float(s.labels["le"]), s.value)
            for metric in registry.collect()
            if metric.name == "cc50_time_to_first_token_seconds"
            for s in metric.samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
        ]
        p50 = quantile(buckets, 0.5)
        self.assertLess(abs(p50 - 0.051) / 0.051, 0.1, p50)


class StartupLineAndExposureTests(SynchronousTestCase):
    """Issue #16: the start-up line names the metrics endpoint; plain TCP beyond loopback without auth warns."""

    def service(self, descriptions: list[str], authenticated: bool = False, metrics: str | None = None) -> object:
        from twisted.internet.testing import MemoryReactorClock

        from cc50tw.tap import CC50Service

        reactor = MemoryReactorClock()
        factory, _ = make_factory(ManualBackend())
        return CC50Service(
            factory.backend, factory, descriptions, reactor, metricsDescription=metrics, authenticated=authenticated
        )

    def start(self, service: object) -> str:
        with capturedLogs() as events:
            service.startService()  # type: ignore[attr-defined]
        return "\n".join(formatEvent(event) for event in events)

    def test_startLineNamesMetrics(self) -> None:
        text = self.start(self.service(["tcp:9199:interface=127.0.0.1"], metrics="tcp:9100:interface=127.0.0.1"))
        self.assertIn("on tcp:9199:interface=127.0.0.1; metrics on tcp:9100:interface=127.0.0.1", text)

    def test_everyInterfaceWithoutAuthWarns(self) -> None:
        for description, warned in [
            ("tcp:9199", "0.0.0.0:9199"),
            ("tcp:9199:interface=10.1.2.3", "10.1.2.3:9199"),
            ("tcp6:9199", ":::9199"),
            ("haproxy:tcp:9199", "0.0.0.0:9199"),
        ]:
            self.assertIn(f"cc50 is serving {warned} beyond this host", self.start(self.service([description])))

    def test_loopbackUnixOrAuthDoNotWarn(self) -> None:
        for description in ["tcp:9199:interface=127.0.0.1", r"tcp6:9199:interface=\:\:1", "unix:/tmp/cc50-test.sock"]:
            self.assertNotIn("beyond this host", self.start(self.service([description])))
        self.assertNotIn("beyond this host", self.start(self.service(["tcp:9199"], authenticated=True)))
