"""
The pool of upstreams behind the llama_server and openai backends: routing,
passive health (back-off, one retry before the first chunk, none after),
active health polling, the per-upstream metrics, and repeatable options.

Like ``test_llama_server``, these run the real treq/Agent HTTP client over
fake connections (one ``FakeUpstream`` per upstream host), with a
``MemoryReactorClock``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from zope.interface import implementer

import cc50tw.backends
from cc50tw.backends import BackendSpec, Repeatable, installed_backends
from cc50tw.backends.http import makeHTTPClient
from cc50tw.backends.http.client import pooledConnections
from cc50tw.backends.llama_server import LlamaServerBackend
from cc50tw.backends.pool import MAX_BACKOFF_FACTOR, Upstream, UpstreamPool
from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult, IBackendMetrics, InferenceRequest
from cc50tw.metrics import registerBackendCollectors
from cc50tw.test.fakes import ManualBackend, make_factory
from cc50tw.test.test_llama_server import (
    LAST_CHUNK,
    FakeUpstream,
    RecordingSink,
    chunk,
    completionEvents,
    completionResponse,
    errorResponse,
    sseHead,
)

A, B, C = "http://a.test:8080", "http://b.test:8080", "http://c.test:8080"


class FakeUpstreams:
    """One ``FakeUpstream`` per upstream URL, behind one real ``Agent``."""

    def __init__(self, reactor: MemoryReactorClock, urls: list[str]) -> None:
        self.reactor = reactor
        self.hosts = {url: FakeUpstream(reactor) for url in urls}

    def endpointForURI(self, uri: Any) -> FakeUpstream:
        return self.hosts[f"http://{uri.host.decode()}:{uri.port}"]

    def client(self) -> Any:
        pool = pooledConnections(self.reactor)
        return makeHTTPClient(Agent.usingEndpointFactory(self.reactor, self, pool=pool), pool)

    def __getitem__(self, url: str) -> FakeUpstream:
        return self.hosts[url]


def health(code: int) -> bytes:
    """A /health answer that closes its connection, so it is never reused for a stream."""
    body = b'{"status":"ok"}' if code == 200 else b'{"error":{"code":503,"message":"Loading model"}}'
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (code, len(body), body)


class Pool:
    """A llama_server backend over several fake upstreams."""

    def __init__(self, urls: list[str] = [A, B], **options: Any) -> None:  # noqa: B006
        self.reactor = MemoryReactorClock()
        self.upstreams = FakeUpstreams(self.reactor, urls)
        options.setdefault("health_interval", 0)
        self.backend = LlamaServerBackend(self.reactor, urls, http=self.upstreams.client(), **options)
        self.results: list[list[object]] = []

    def member(self, url: str) -> Upstream:
        return next(upstream for upstream in self.backend.pool.members if upstream.url == url)

    def generate(self, prompt: str = "p", sink: RecordingSink | None = None) -> tuple[list[object], RecordingSink]:
        sink = sink or RecordingSink()
        results: list[object] = []
        self.backend.generate(InferenceRequest(len(self.results) + 1, prompt, 8), sink).addBoth(results.append)
        self.results.append(results)
        return results, sink

    def posts(self, url: str) -> int:
        """POSTs written to ``url``, on any connection."""
        return sum(t.value().count(b"POST ") for _, t in self.upstreams[url].connections)

    def complete(self, url: str, pieces: list[str] | None = None) -> None:
        self.upstreams[url].send(completionResponse(pieces or ["ok"]))


def error(results: list[object]) -> BackendError:
    assert len(results) == 1, results
    failure = results[0]
    assert isinstance(failure, Failure), failure
    assert isinstance(failure.value, BackendError), failure
    return failure.value


# Routing ---------------------------------------------------------------------------


class RoutingTests(SynchronousTestCase):
    def test_tiesGoRoundRobin(self) -> None:
        """With nothing outstanding anywhere, requests alternate."""
        p = Pool([A, B, C])
        order = []
        for _ in range(6):
            p.generate()
            busy = [url for url in (A, B, C) if p.member(url).outstanding]
            self.assertEqual(len(busy), 1)
            order.append(busy[0])
            p.complete(busy[0])
        self.assertEqual(order, [A, B, C, A, B, C])
        self.assertEqual([p.member(url).outcomes["done"] for url in (A, B, C)], [2, 2, 2])

    def test_leastOutstandingWins(self) -> None:
        p = Pool([A, B, C])
        for _ in range(3):
            p.generate()
        self.assertEqual([p.member(url).outstanding for url in (A, B, C)], [1, 1, 1])
        p.complete(B)
        p.generate()
        p.generate()
        # B had the fewest; then all three tie at 1 and the rotation goes on after B.
        self.assertEqual([p.member(url).outstanding for url in (A, B, C)], [1, 1, 2])
        self.assertEqual(p.posts(B), 2)

    def test_unevenLoadSpreadsEvenly(self) -> None:
        p = Pool()
        for _ in range(10):
            p.generate()
        self.assertEqual([p.member(url).outstanding for url in (A, B)], [5, 5])

    def test_poolOfOneIsTheOldBehaviour(self) -> None:
        p = Pool([A])
        results, sink = p.generate()
        p.complete(A, ["x"])
        self.assertEqual(sink.text, "x")
        self.assertEqual(results, [GenerationResult(4, 1, "length")])

    def test_duplicateURLsAreRefused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            LlamaServerBackend(MemoryReactorClock(), [A, A + "/"])
        self.assertIn("more than once", str(caught.exception))

    def test_describeNamesEveryUpstream(self) -> None:
        description = Pool([A, B]).backend.describe()
        self.assertIn(A, description)
        self.assertIn(B, description)
        self.assertIn("pool of 2", description)


class QuietConnectionTests(SynchronousTestCase):
    def test_connectionFactoriesLogNothing(self) -> None:
        """
        The pool makes a factory per connection, and llama-server closes its
        connection after every streamed answer: a noisy factory's "Starting
        factory" and "Stopping factory" would be two log lines per request.
        """
        given: list[Any] = []

        @implementer(IStreamClientEndpoint)
        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                given.append(factory)
                return Deferred()

        for persistent in (True, False):
            pooledConnections(MemoryReactorClock(), persistent).getConnection(("key", persistent), Endpoint())
        self.assertEqual(len(given), 2)
        with capturedLogs() as events:
            for factory in given:
                factory.doStart()
                factory.doStop()
        self.assertEqual([formatEvent(event) for event in events], [])


# Passive health ----------------------------------------------------------------------


class PassiveHealthTests(SynchronousTestCase):
    def test_connectionRefusedIsRetriedOnAnotherUpstream(self) -> None:
        p = Pool(backoff=2)
        p.upstreams[A].refuse = netError.ConnectionRefusedError("Connection refused")
        with capturedLogs() as events:
            results, sink = p.generate()
        self.assertEqual(results, [])
        self.assertEqual(p.member(B).outstanding, 1)
        p.complete(B, ["fine"])
        self.assertEqual(sink.text, "fine")
        self.assertEqual(results, [GenerationResult(4, 1, "length")])
        self.assertEqual((sink.registrations, sink.unregistrations), (1, 1))
        a = p.member(A)
        self.assertEqual((a.outcomes["failed"], a.retries, a.backoffs, a.outstanding), (1, 1, 1, 0))
        self.assertEqual(p.member(B).outcomes["done"], 1)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn(f"llama-server at {A} is down for 2s", text)
        self.assertIn(f"retrying on {B}", text)

    def test_anUpstreamBackingOffGetsNoRequestsUntilItEnds(self) -> None:
        p = Pool(backoff=2)
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        p.generate()
        p.upstreams[A].refuse = None
        for _ in range(3):
            p.generate()  # B is busier and busier, but A is backing off
        self.assertEqual((p.member(A).outstanding, p.member(B).outstanding), (0, 4))
        self.assertFalse(p.backend.pool.isUp(p.member(A)))
        p.reactor.advance(2.01)
        self.assertTrue(p.backend.pool.isUp(p.member(A)))
        p.generate()
        self.assertEqual(p.member(A).outstanding, 1)

    def test_backoffDoublesWhileFailuresContinueAndIsCapped(self) -> None:
        p = Pool(backoff=1)
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        delays = []
        for _ in range(6):
            p.generate()  # A is free, B is not: A first, then the retry lands on B
            delays.append(round(p.member(A).downUntil - p.reactor.seconds(), 6))
            p.reactor.advance(delays[-1] + 0.01)
        self.assertEqual(delays, [1, 2, 4, 8, 8, 8])
        self.assertEqual(MAX_BACKOFF_FACTOR, 8)

    def test_failuresDuringTheBackoffNeitherExtendNorDoubleIt(self) -> None:
        """An upstream that dies with eight requests in flight backs off once, not eight times."""
        p = Pool(backoff=2)
        pool = p.backend.pool
        a = p.member(A)
        pool.failed(a, "first")
        p.reactor.advance(1)
        for _ in range(7):
            pool.failed(a, "another request that was in flight")
        self.assertEqual((a.failures, a.backoffs, a.downUntil), (1, 1, 2.0))
        self.assertEqual(a.lastError, "another request that was in flight")

    def test_aStreamingAnswerEndsTheBackoff(self) -> None:
        p = Pool(backoff=5)
        pool = p.backend.pool
        pool.failed(p.member(A), "test")
        pool.failed(p.member(B), "test")
        self.assertEqual(pool.upCount(), 0)
        results, _ = p.generate()  # nothing is up: every upstream is a candidate
        self.assertEqual(p.member(A).outstanding, 1)
        p.complete(A)
        self.assertEqual(results, [GenerationResult(4, 1, "length")])
        self.assertTrue(pool.isUp(p.member(A)))
        self.assertEqual(p.member(A).failures, 0)
        self.assertFalse(pool.isUp(p.member(B)))

    def test_5xxBeforeStreamingIsRetried(self) -> None:
        """
        Both are tried elsewhere; a 503 (not ready) is held against the
        upstream, a 500 is not: one request can cause it.
        """
        for code, phrase, unhealthy in ((500, b"Internal Server Error", False), (503, b"Service Unavailable", True)):
            p = Pool()
            results, sink = p.generate()
            p.upstreams[A].send(errorResponse(code, phrase, b'{"error":{"message":"boom"}}'))
            self.assertEqual(results, [])
            p.complete(B, ["saved"])
            self.assertEqual(sink.text, "saved")
            self.assertEqual(results, [GenerationResult(4, 1, "length")])
            self.assertEqual(p.member(A).outcomes["failed" if unhealthy else "error"], 1)
            self.assertEqual(p.backend.pool.isUp(p.member(A)), not unhealthy)

    def test_4xxIsTheRequestsFaultNotTheUpstreams(self) -> None:
        p = Pool()
        results, _ = p.generate()
        p.upstreams[A].send(errorResponse(400, b"Bad Request", b'{"error":{"message":"prompt too long"}}'))
        self.assertEqual(error(results).code, ErrorCode.BAD_REQUEST)
        self.assertIn("prompt too long", error(results).message)
        self.assertEqual(p.posts(B), 0)
        self.assertTrue(p.backend.pool.isUp(p.member(A)))
        self.assertEqual(p.member(A).outcomes["error"], 1)

    def test_retriedOnlyOnce(self) -> None:
        p = Pool([A, B, C])
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        p.upstreams[B].refuse = netError.ConnectionRefusedError()
        results, sink = p.generate()
        failure = error(results)
        self.assertEqual(failure.code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn(f"llama-server at {B} is not reachable", failure.message)
        self.assertEqual(p.posts(C), 0)
        self.assertEqual(len(p.upstreams[C].connections), 0)
        self.assertEqual([p.member(url).outstanding for url in (A, B, C)], [0, 0, 0])
        self.assertEqual(sink.unregistrations, 1)

    def test_noRetryOnceTextReachedTheClient(self) -> None:
        p = Pool()
        results, sink = p.generate()
        p.upstreams[A].send(sseHead() + chunk(completionEvents(["half"])[0]))
        p.upstreams[A].lose(netError.ConnectionLost())
        self.assertEqual(sink.writes, ["half"])
        failure = error(results)
        self.assertEqual(failure.code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("mid-stream", failure.message)
        self.assertEqual(len(p.upstreams[B].connections), 0)
        # The upstream went away, though: it is backing off.
        self.assertFalse(p.backend.pool.isUp(p.member(A)))
        self.assertEqual((p.member(A).outcomes["failed"], p.member(A).retries), (1, 0))

    def test_diedAfterTheHeadersButBeforeAnyTextIsRetried(self) -> None:
        """Headers and a keep-alive ping are not text: the client has seen nothing yet."""
        p = Pool()
        results, sink = p.generate()
        p.upstreams[A].send(sseHead() + chunk(b":\n\n") + chunk(b'data: {"content":"","stop":false}\n\n'))
        p.upstreams[A].lose(netError.ConnectionLost())
        self.assertEqual(results, [])
        p.complete(B, ["whole"])
        self.assertEqual(sink.writes, ["whole"])
        self.assertEqual(results, [GenerationResult(4, 1, "length")])

    def test_lateBytesFromTheAbandonedAttemptAreIgnored(self) -> None:
        p = Pool()
        results, sink = p.generate()
        p.upstreams[A].send(errorResponse(500, b"Oops", b"{}"))
        # The error response is over; the old connection says more anyway.
        p.upstreams[A].send(chunk(completionEvents(["ghost"])[0]))
        p.complete(B, ["real"])
        self.assertEqual(sink.text, "real")
        self.assertEqual(results, [GenerationResult(4, 1, "length")])

    def test_staleKeepAliveIsRetriedOnTheSameUpstreamFirst(self) -> None:
        """A pooled connection closed under us is not the upstream's fault: new connection, same upstream."""
        p = Pool([A])
        first, _ = p.generate()
        p.complete(A, ["ok"])  # the connection goes back to the pool, kept alive
        self.assertEqual(first, [GenerationResult(4, 1, "length")])
        results, sink = p.generate()
        self.assertEqual(len(p.upstreams[A].connections), 1, "the kept-alive connection was not reused")
        p.upstreams[A].lose(netError.ConnectionDone())
        self.assertEqual(len(p.upstreams[A].connections), 2)
        p.complete(A, ["ok"])
        self.assertEqual(results, [GenerationResult(4, 1, "length")])
        self.assertTrue(p.backend.pool.isUp(p.member(A)))
        self.assertEqual(p.member(A).failures, 0)

    def test_staleThenRefusedStillMovesOn(self) -> None:
        """
        The upstream died: its kept-alive connection is dead (the one retry,
        a new connection to it) and then refused.  Refused, nothing was sent,
        so the request still goes to the other upstream: two POSTs at most.
        """
        p = Pool()
        first, _ = p.generate()
        p.complete(A, ["ok"])  # A's connection goes back to the pool
        second, _ = p.generate()
        p.complete(B, ["ok"])  # round-robin: B's turn
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        results, sink = p.generate()
        p.upstreams[A].lose(netError.ConnectionDone())  # the reused connection, dead
        p.complete(B, ["saved"])
        self.assertEqual(sink.text, "saved")
        self.assertEqual(results, [GenerationResult(4, 1, "length")])
        self.assertLessEqual(p.posts(A) + p.posts(B), 4)  # two earlier requests, then at most two POSTs

    def test_newConnectionClosedBeforeAnsweringIsTriedElsewhere(self) -> None:
        """Not a stale connection: the upstream itself closed on us, so the one retry goes to another upstream."""
        p = Pool()
        results, sink = p.generate()
        p.upstreams[A].lose(netError.ConnectionDone())
        self.assertEqual(len(p.upstreams[A].connections), 1)
        p.complete(B, ["ok"])
        self.assertEqual(results, [GenerationResult(4, 1, "length")])
        self.assertFalse(p.backend.pool.isUp(p.member(A)))

    def test_cancelledWhileTheRetryConnects(self) -> None:
        p = Pool()
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        p.upstreams[B].holdConnects = True
        sink = RecordingSink()
        results: list[object] = []
        d = p.backend.generate(InferenceRequest(1, "p", 8), sink)
        d.addBoth(results.append)
        d.cancel()
        assert isinstance(results[0], Failure)
        results[0].trap(CancelledError)
        self.assertTrue(p.upstreams[B].pending[0].called)
        self.assertEqual((p.member(A).outstanding, p.member(B).outstanding), (0, 0))
        self.assertEqual(p.member(B).outcomes["cancelled"], 1)
        self.assertEqual(p.backend.active, set())

    def test_aTimeoutIsNotRetried(self) -> None:
        p = Pool(first_event_timeout=10)
        results, _ = p.generate()
        p.reactor.advance(11)
        self.assertEqual(error(results).code, ErrorCode.TIMEOUT)
        self.assertEqual(len(p.upstreams[B].connections), 0)
        self.assertEqual(p.member(A).outcomes["error"], 1)

    def test_pausedBeforeTheRetryStaysPaused(self) -> None:
        p = Pool()
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        sink = RecordingSink()
        p.backend.generate(InferenceRequest(1, "p", 8), sink)
        assert sink.producer is not None
        sink.producer.pauseProducing()
        p.upstreams[B].send(sseHead())
        self.assertEqual(p.upstreams[B].transport().producerState, "paused")
        sink.producer.resumeProducing()
        self.assertEqual(p.upstreams[B].transport().producerState, "producing")
        p.upstreams[B].send(b"".join(chunk(e) for e in completionEvents(["z"])) + LAST_CHUNK)
        self.assertEqual(sink.text, "z")


# Active health ------------------------------------------------------------------


class ActiveHealthTests(SynchronousTestCase):
    def started(self, interval: float = 3) -> Pool:
        p = Pool(health_interval=interval)
        p.backend.startBackend()
        for url in (A, B):
            p.upstreams[url].send(health(200))
        return p

    def probes(self, p: Pool, url: str) -> int:
        return sum(t.value().count(b"GET /health ") for _, t in p.upstreams[url].connections)

    def test_pollsEveryInterval(self) -> None:
        p = self.started(interval=3)
        self.assertEqual((self.probes(p, A), self.probes(p, B)), (1, 1))
        p.reactor.advance(3)
        self.assertEqual((self.probes(p, A), self.probes(p, B)), (2, 2))

    def test_failingCheckKeepsTrafficAwayUntilItPasses(self) -> None:
        p = self.started(interval=3)
        p.reactor.advance(3)
        with capturedLogs() as events:
            p.upstreams[A].send(health(503))
            p.upstreams[B].send(health(200))
        self.assertIn(f"llama-server at {A} health check now fails", "\n".join(formatEvent(e) for e in events))
        for _ in range(4):
            p.generate()
        self.assertEqual((p.member(A).outstanding, p.member(B).outstanding), (0, 4))
        p.reactor.advance(3)
        p.upstreams[A].send(health(200))
        p.generate()
        self.assertEqual(p.member(A).outstanding, 1)

    def test_unreachableUpstreamIsDown(self) -> None:
        p = Pool(health_interval=3)
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        probe: list[tuple[bool, str]] = []
        p.backend.probeHealth().addCallback(probe.append)
        p.upstreams[B].send(health(200))
        self.assertEqual(probe[0][0], True)
        self.assertIn(f"{A} is not reachable", probe[0][1])
        self.assertIs(p.member(A).healthy, False)

    def test_checkHealthWithChecksOffProbesNothing(self) -> None:
        """--llama-health-interval=0: readiness is whether any upstream takes requests, no probe sent."""
        p = Pool(health_interval=0)
        answers: list[bool] = []
        p.backend.checkHealth().addCallback(answers.append)
        self.assertEqual((answers, p.upstreams[A].connections), ([True], []))
        p.backend.pool.failed(p.member(A), "down")
        p.backend.pool.failed(p.member(B), "down")
        p.backend.checkHealth().addCallback(answers.append)
        self.assertEqual(answers, [True, False])

    def test_checkHealthIsAnyUpstreamHealthy(self) -> None:
        p = Pool(health_interval=5)  # checks on, the poller not started: each call probes
        answers: list[bool] = []
        p.backend.checkHealth().addCallback(answers.append)
        p.upstreams[A].send(health(503))
        p.upstreams[B].send(health(200))
        p.backend.checkHealth().addCallback(answers.append)
        p.upstreams[A].send(health(503))
        p.upstreams[B].send(health(503))
        self.assertEqual(answers, [True, False])

    def test_checkHealthUsesThePollersVerdictWhilePolling(self) -> None:
        p = self.started(interval=3)
        before = self.probes(p, A)
        answers: list[bool] = []
        p.backend.checkHealth().addCallback(answers.append)
        self.assertEqual((answers, self.probes(p, A)), ([True], before))

    def test_aSlowCheckIsNotDoubled(self) -> None:
        p = self.started(interval=3)
        p.reactor.advance(3)
        p.reactor.advance(3)  # the second round's checks have not answered yet
        self.assertEqual(self.probes(p, A), 2)

    def test_stopBackendStopsPolling(self) -> None:
        p = self.started(interval=3)
        p.backend.stopBackend()
        p.reactor.advance(30)
        self.assertEqual(self.probes(p, A), 1)

    def test_noPollingWithIntervalZero(self) -> None:
        p = self.started(interval=0)
        p.reactor.advance(30)
        self.assertEqual(self.probes(p, A), 1)


# Metrics ---------------------------------------------------------------------------


class MetricsTests(SynchronousTestCase):
    def test_perUpstreamGaugesAndCounters(self) -> None:
        p = Pool()
        factory, _ = make_factory(p.backend)
        registry = factory.metrics.registry
        p.upstreams[A].refuse = netError.ConnectionRefusedError()
        p.generate()  # fails on A, moves to B
        p.upstreams[A].refuse = None
        p.generate()  # A is backing off: B again

        def value(name: str, url: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"url": url, **labels})

        self.assertEqual(value("cc50_upstream_up", A), 0)
        self.assertEqual(value("cc50_upstream_up", B), 1)
        self.assertEqual(value("cc50_upstream_health_check_ok", A), 1)
        self.assertEqual(value("cc50_upstream_outstanding", B), 2)
        self.assertEqual(value("cc50_upstream_requests_total", A, outcome="failed"), 1)
        self.assertEqual(value("cc50_upstream_retries_total", A), 1)
        self.assertEqual(value("cc50_upstream_backoffs_total", A), 1)
        self.assertEqual(value("cc50_upstream_requests_total", B, outcome="done"), 0)
        p.complete(B)
        self.assertEqual(value("cc50_upstream_requests_total", B, outcome="done"), 1)
        self.assertEqual(value("cc50_upstream_outstanding", B), 1)

    def test_backendsWithoutCollectorsAddNothing(self) -> None:
        registry = CollectorRegistry()
        registerBackendCollectors(registry, ManualBackend())
        self.assertEqual(list(registry.collect()), [])

    def test_aClashingCollectorIsSkipped(self) -> None:
        class Clashing:
            def describe(self) -> list[Any]:
                return [GaugeMetricFamily("cc50_requests_total", "a name the server's counter has")]

            def collect(self) -> list[Any]:
                return self.describe()

        @implementer(IBackendMetrics)
        class Backend(ManualBackend):
            def collectors(self) -> list[Any]:
                return [Clashing()]

        with capturedLogs() as events:
            factory, _ = make_factory(Backend())
        self.assertIn("not exporting backend metrics", "\n".join(formatEvent(e) for e in events))
        self.assertIsNone(factory.metrics.registry.get_sample_value("cc50_requests_total"))


# Options ----------------------------------------------------------------------------


class OptionsTests(SynchronousTestCase):
    def options(self, *argv: str) -> Any:
        from cc50tw.tap import Options

        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_llamaURLRepeats(self) -> None:
        options = self.options("--backend=llama_server", f"--llama-url={A}", f"--llama-url={B}/")
        self.assertEqual(options["llama-url"], [A, B + "/"])
        backend = options.backend
        assert isinstance(backend, LlamaServerBackend)
        self.assertEqual(backend.urls, [A, B])

    def test_defaultIsOneURL(self) -> None:
        options = self.options("--backend=llama_server")
        self.assertEqual(options["llama-url"], ["http://127.0.0.1:8080"])

    def test_aBadURLAmongSeveralIsNamed(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--backend=llama_server", f"--llama-url={A}", "--llama-url=b.test:8080")
        self.assertIn("--llama-url", str(caught.exception))
        self.assertIn("b.test:8080", str(caught.exception))

    def test_duplicateURL(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--backend=llama_server", f"--llama-url={A}", f"--llama-url={A}")
        self.assertIn("more than once", str(caught.exception))

    def test_healthAndBackoffOptions(self) -> None:
        backend = self.options("--backend=llama_server", "--llama-health-interval=0.5", "--llama-backoff=7").backend
        self.assertEqual((backend.health_interval, backend.pool.backoff), (0.5, 7.0))
        self.assertEqual(self.options("--backend=llama_server", "--llama-health-interval=0").backend.health_interval, 0)
        with self.assertRaises(usage.UsageError):
            self.options("--backend=llama_server", "--llama-health-interval=-1")
        with self.assertRaises(usage.UsageError):
            self.options("--backend=llama_server", "--llama-backoff=0")

    def test_repeatableOptionOfAThirdParty(self) -> None:
        """``Repeatable`` is for any plugin: the value is the list, the default a list of one."""
        self.assertEqual(Repeatable(int)("5"), 5)
        from cc50tw.tap import Options

        self.assertIn("llama-url", Options.repeatable)
        self.assertIn("openai-url", Options.repeatable)
        self.assertNotIn("llama-endpoint", Options.repeatable)


class PrecedenceTests(SynchronousTestCase):
    def test_builtinBackendsWinCollisions(self) -> None:
        """A plugin that reuses one of our option names is the one skipped, whatever its name."""
        import cc50tw.plugins.cc50_backends as ours

        def build(options: Any, reactor: Any) -> Any:
            raise AssertionError("not built")

        intruder = BackendSpec("aaa", "a plugin with --model", [["model", None, None, "mine"]], build)
        self.patch(
            cc50tw.backends,
            "getPlugins",
            lambda interface, package: [intruder, ours.openai, ours.llama_server, ours.toy],
        )
        with capturedLogs() as events:
            found = installed_backends()
        self.assertEqual(sorted(found), ["llama_server", "openai", "toy"])
        self.assertIn("ignoring backend plugin 'aaa'", "\n".join(formatEvent(e) for e in events))


class PoolUnitTests(SynchronousTestCase):
    """``UpstreamPool`` on its own."""

    def test_emptyPoolIsRefused(self) -> None:
        with self.assertRaises(ValueError):
            UpstreamPool([], MemoryReactorClock())

    def test_excludingTheOnlyUpstreamLeavesNone(self) -> None:
        pool = UpstreamPool([A], MemoryReactorClock())
        self.assertIsNone(pool.choose(exclude=pool.members[0]))

    def test_retryPrefersAnUpstreamThatIsUp(self) -> None:
        clock = MemoryReactorClock()
        pool = UpstreamPool([A, B, C], clock)
        a, b, c = pool.members
        pool.failed(b, "test")
        self.assertIs(pool.choose(exclude=a), c)
        pool.failed(c, "test")
        # Nothing else is up: any other upstream will do.
        self.assertIn(pool.choose(exclude=a), (b, c))

    def test_healthyUnknownCountsAsUp(self) -> None:
        pool = UpstreamPool([A], MemoryReactorClock())
        self.assertTrue(pool.isUp(pool.members[0]))
        self.assertFalse(pool.anyHealthy())
        self.assertFalse(pool.allChecked())
