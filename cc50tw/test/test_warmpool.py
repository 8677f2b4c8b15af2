"""
``WarmConnectionPool``: a spare connection per upstream, made after a
request needed one and handed to the next request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from cc50tw.backends.llama_server import LlamaServerBackend
from cc50tw.backends.upstream import makeHTTPClient
from cc50tw.backends.warmpool import WARM_DELAY, WarmConnectionPool

KEY = ("http", b"llama.test", 8080)


class Endpoint:
    """Connection attempts the test completes (``connectNext``) or fails."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []
        self.refuse = False

    def endpointForURI(self, uri: Any) -> Endpoint:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        waiting: Deferred[Any] = Deferred()
        self.attempts.append((factory, waiting))
        return waiting

    def connectNext(self) -> tuple[Any, StringTransport]:
        """Complete the oldest pending attempt; its protocol and transport."""
        factory, waiting = next((f, d) for f, d in self.attempts if not d.called)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        waiting.callback(protocol)
        return protocol, transport

    @property
    def pending(self) -> int:
        return sum(1 for _, d in self.attempts if not d.called)


class WarmConnectionPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = WarmConnectionPool(self.reactor)
        self.endpoint = Endpoint()

    def get(self) -> Deferred[Any]:
        return self.pool.getConnection(KEY, self.endpoint)  # type: ignore[arg-type]

    def test_aSpareFollowsAfterTheRequestThatNeededAConnection(self) -> None:
        self.get()
        self.assertEqual(self.endpoint.pending, 1)  # the request's own connection, at once
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 2)  # then the spare
        self.endpoint.connectNext()
        spare, _ = self.endpoint.connectNext()
        self.assertEqual(self.pool.sparesMade, 1)
        taken = self.successResultOf(self.get())
        self.assertIs(getattr(taken, "_clientProtocol", taken), spare)  # no new connection waited for
        self.assertEqual(self.endpoint.pending, 0)

    def test_takingTheSpareStartsTheNext(self) -> None:
        self.get()
        self.reactor.advance(WARM_DELAY)
        self.endpoint.connectNext()
        self.endpoint.connectNext()
        self.get()
        self.assertEqual(self.endpoint.pending, 0)
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 1)
        self.endpoint.connectNext()
        self.assertEqual(self.pool.sparesMade, 2)

    def test_oneSpareAtATime(self) -> None:
        for _ in range(5):
            self.get()
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 6)  # five requests, one spare
        for _ in range(6):
            self.endpoint.connectNext()
        self.get()  # takes the spare
        self.get()  # connects
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 2)  # its own, and one new spare

    def test_aWaitingSpareIsNotDoubled(self) -> None:
        """A request served by a kept-alive connection leaves the waiting spare alone."""
        self.get()
        self.reactor.advance(WARM_DELAY)
        own, _ = self.endpoint.connectNext()
        self.pool._putConnection(KEY, own)  # its response is over: kept alive, ahead of the spare
        self.endpoint.connectNext()  # the spare, cached after it
        self.successResultOf(self.get())  # takes the kept-alive one
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 0)
        self.assertEqual(self.pool.sparesMade, 1)

    def test_anUpstreamThatKeepsConnectionsAliveGetsNoPileOfSpares(self) -> None:
        """vLLM-like: every used connection comes back alive, so spares stop once one is cached."""
        for _ in range(20):
            taken = self.get()
            while self.endpoint.pending:
                self.endpoint.connectNext()
            self.reactor.advance(WARM_DELAY)
            while self.endpoint.pending:
                self.endpoint.connectNext()
            connection = self.successResultOf(taken)
            self.pool._putConnection(KEY, getattr(connection, "_clientProtocol", connection))  # response done
        self.assertLessEqual(len(self.endpoint.attempts), 2)
        self.assertLessEqual(len(self.pool._connections[KEY]), 2)

    def test_aSpareTheUpstreamClosedIsSkippedAndReplaced(self) -> None:
        self.get()
        self.reactor.advance(WARM_DELAY)
        self.endpoint.connectNext()
        spare, _ = self.endpoint.connectNext()
        spare.connectionLost(Failure(ConnectionRefusedError()))
        connection = self.get()
        self.assertNoResult(connection)  # a new connection, not the dead spare
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 2)

    def test_aFailedSpareIsDroppedQuietly(self) -> None:
        self.get()
        self.endpoint.refuse = True
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.pool.sparesMade, 0)
        self.endpoint.refuse = False
        self.get()  # nothing cached: connects, and tries a spare again
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 3)

    def test_idleSparesCloseWithTheCacheTimeout(self) -> None:
        self.get()
        self.reactor.advance(WARM_DELAY)
        self.endpoint.connectNext()
        _, transport = self.endpoint.connectNext()
        self.reactor.advance(self.pool.cachedConnectionTimeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.endpoint.pending, 0)  # and no new one: nobody asked

    def test_closeStopsEverySpare(self) -> None:
        self.get()
        self.reactor.advance(WARM_DELAY)  # the spare is connecting
        spareAttempt = self.endpoint.attempts[1][1]
        self.assertFalse(spareAttempt.called)
        self.pool.closeCachedConnections()
        self.assertTrue(spareAttempt.called)  # cancelled
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.get()
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.pool.sparesMade, 0)

    def test_closeCancelsAScheduledSpare(self) -> None:
        self.get()
        self.pool.closeCachedConnections()
        self.reactor.advance(WARM_DELAY)
        self.assertEqual(self.endpoint.pending, 1)  # only the request's own


class PreconnectBackendTests(SynchronousTestCase):
    def test_optionChoosesTheWarmPool(self) -> None:
        reactor = MemoryReactorClock()
        self.assertIsInstance(LlamaServerBackend(reactor, preconnect=True).connectionPool, WarmConnectionPool)
        self.assertNotIsInstance(LlamaServerBackend(reactor).connectionPool, WarmConnectionPool)
        self.assertIn("spare connection", LlamaServerBackend(reactor, preconnect=True).describe())
        self.assertNotIn("spare connection", LlamaServerBackend(reactor).describe())

    def test_healthChecksHaveAPlainPoolOfTheirOwn(self) -> None:
        """A probe every few seconds must not keep a spare open on an idle bridge."""
        reactor = MemoryReactorClock()
        warm = LlamaServerBackend(reactor, preconnect=True)
        self.assertIsNot(warm.healthHTTP, warm.http)
        self.assertIsNotNone(warm.healthPool)
        self.assertNotIsInstance(warm.healthPool, WarmConnectionPool)
        plain = LlamaServerBackend(reactor)
        self.assertIs(plain.healthHTTP, plain.http)
        self.assertIsNone(plain.healthPool)

    def test_bothHTTPBackendsTakeTheFlag(self) -> None:
        from cc50tw.tap import Options

        for argv, flag in (
            (["--backend=llama_server"], "--llama-preconnect"),
            (["--backend=openai", "--openai-url=http://h:1"], "--openai-preconnect"),
        ):
            for extra, expected in (([], False), ([flag], True)):
                options = Options()
                options.parseOptions([*argv, *extra])
                pool = getattr(options.backend, "connectionPool", None)
                self.assertEqual(isinstance(pool, WarmConnectionPool), expected, (argv, extra))

    def test_secondRequestWritesOnTheSpareAtOnce(self) -> None:
        """Through a real Agent: the next request is written without waiting for a connection."""
        reactor = MemoryReactorClock()
        pool = WarmConnectionPool(reactor)
        endpoint = Endpoint()
        http = makeHTTPClient(Agent.usingEndpointFactory(reactor, endpoint, pool=pool))  # type: ignore[arg-type]
        headers = Headers({b"Accept": [b"text/event-stream"]})
        http.postStream(b"http://llama.test:8080/completion", headers, b"{}")
        endpoint.connectNext()
        reactor.advance(WARM_DELAY)
        _, spareTransport = endpoint.connectNext()
        self.assertEqual(spareTransport.value(), b"")
        http.postStream(b"http://llama.test:8080/completion", headers, b'{"n": 2}')
        self.assertTrue(spareTransport.value().startswith(b"POST /completion HTTP/1.1\r\n"))
        self.assertTrue(spareTransport.value().endswith(b'{"n": 2}'))
