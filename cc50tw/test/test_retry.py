"""
``RetryPolicy`` and ``ClientPool`` (issue 17) with a fake clock, fake
connections (``StringTransport``) and a fake random source: which failures
are retried, how long the pool waits, that attempts are bounded, and that a
request that received text is never sent twice.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.client import (
    CC50ClientProtocol,
    ClientPool,
    ClientTimeout,
    PooledCompletion,
    RetryPolicy,
)
from cc50tw.codec import DoneStats, ErrorCode, Frame, FrameDecoder, MessageType, encode_chunk, encode_done, encode_error
from cc50tw.errors import ClientError


def sentInfers(transport: StringTransport) -> list[int]:
    """The req_ids of the REQ_INFER frames written so far (and forgets them)."""
    frames = [f for f in FrameDecoder(1 << 20).feed(transport.value()) if isinstance(f, Frame)]
    transport.clear()
    return [f.req_id for f in frames if f.type == MessageType.REQ_INFER]


class FakeServers:
    """A connector: each call is a new connection over a ``StringTransport``, or a scripted failure."""

    def __init__(self) -> None:
        self.connections: list[tuple[str, CC50ClientProtocol, StringTransport]] = []
        self.refusals: list[str] = []
        self.refuse = 0

    def __call__(self, address: str) -> Deferred[CC50ClientProtocol]:
        if self.refuse:
            self.refuse -= 1
            self.refusals.append(address)
            return fail(ConnectionRefusedError(address))
        client = CC50ClientProtocol()
        transport = StringTransport()
        client.makeConnection(transport)
        self.connections.append((address, client, transport))
        return succeed(client)

    def last(self) -> tuple[CC50ClientProtocol, int]:
        """The newest connection and the req_id of the request it was sent."""
        _, client, transport = self.connections[-1]
        [reqId] = sentInfers(transport)
        return client, reqId


def done(reqId: int, tokens: int = 3) -> bytes:
    return encode_done(reqId, DoneStats(tokens, 10))


class RetryPolicyTests(SynchronousTestCase):
    def test_retryableBeforeAnyChunk(self) -> None:
        """
        SHUTTING_DOWN, OVERLOADED and a failed connection are retried; what
        the server may have run already (a connection lost after sending,
        UPSTREAM_UNAVAILABLE) only with ``retryMaybeExecuted``.
        """
        policy = RetryPolicy()
        for code in (ErrorCode.SHUTTING_DOWN, ErrorCode.OVERLOADED):
            self.assertTrue(policy.retryable(ClientError(1, code, "x"), streamed=False), code)
        self.assertTrue(policy.retryable(ConnectionRefusedError(), streamed=False))
        self.assertFalse(policy.retryable(ClientError(1, ErrorCode.UPSTREAM_UNAVAILABLE, "x"), streamed=False))
        self.assertFalse(policy.retryable(ConnectionLost(), streamed=False))
        bold = RetryPolicy(retryMaybeExecuted=True)
        self.assertTrue(bold.retryable(ClientError(1, ErrorCode.UPSTREAM_UNAVAILABLE, "x"), streamed=False))
        self.assertTrue(bold.retryable(ConnectionLost(), streamed=False))
        self.assertFalse(bold.retryable(ConnectionLost(), streamed=True))

    def test_neverAfterAChunk(self) -> None:
        """Text already delivered would be repeated or contradicted: nothing is retried once streaming began."""
        policy = RetryPolicy()
        for error in (ClientError(1, ErrorCode.UPSTREAM_UNAVAILABLE, "x"), ConnectionLost()):
            self.assertFalse(policy.retryable(error, streamed=True))

    def test_answersAreNotRetried(self) -> None:
        """Errors that are the request's answer (or may have left work running) are final."""
        policy = RetryPolicy()
        for code in (ErrorCode.BAD_REQUEST, ErrorCode.BACKEND_ERROR, ErrorCode.TIMEOUT, ErrorCode.CANCELLED):
            self.assertFalse(policy.retryable(ClientError(1, code, "x"), streamed=False), code)
        self.assertFalse(policy.retryable(ClientTimeout(1, 1.0, "slow"), streamed=False))
        self.assertFalse(policy.retryable(ValueError("bug"), streamed=False))

    def test_connectRetryable(self) -> None:
        policy = RetryPolicy()
        self.assertTrue(policy.connectRetryable(ConnectionRefusedError()))
        self.assertTrue(policy.connectRetryable(ClientTimeout(0, 1.0, "no connection")))
        self.assertFalse(policy.connectRetryable(ClientError(0, ErrorCode.UNAUTHORIZED, "wrong token")))

    def test_delayDoublesWithEqualJitterUpToTheCap(self) -> None:
        policy = RetryPolicy(attempts=10, initialDelay=0.1, maxDelay=0.5)
        self.assertEqual([policy.delay(n, lambda: 0.0) for n in (1, 2, 3, 4, 5)], [0.05, 0.1, 0.2, 0.25, 0.25])
        self.assertAlmostEqual(policy.delay(2, lambda: 0.999999), 0.2, places=5)
        self.assertEqual(policy.delay(1000, lambda: 0.0), 0.25)  # no overflow far out

    def test_validation(self) -> None:
        for bad in ({"attempts": 0}, {"attempts": True}, {"initialDelay": -1.0}, {"maxDelay": float("nan")}):
            self.assertRaises(ValueError, RetryPolicy, **bad)


class ClientPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.servers = FakeServers()

    def pool(self, addresses: Any = "tcp:lb:9199", **kwargs: Any) -> ClientPool:
        kwargs.setdefault("policy", RetryPolicy(attempts=3, initialDelay=0.1, maxDelay=1.0))
        return ClientPool(self.clock, addresses, connector=self.servers, random=lambda: 0.5, **kwargs)

    def test_shuttingDownRetriesOnANewConnection(self) -> None:
        """
        SHUTTING_DOWN retires the connection (a balancer sends the next one
        elsewhere) and the request is sent again after the backoff.
        """
        pool = self.pool()
        result: Deferred[PooledCompletion] = Deferred.fromCoroutine(pool.infer("p", 3))
        first, reqId = self.servers.last()
        first.dataReceived(encode_error(reqId, ErrorCode.SHUTTING_DOWN, "draining"))
        self.assertNoResult(result)
        self.assertEqual(len(self.servers.connections), 1)
        self.assertTrue(first.transport.disconnecting)  # type: ignore[union-attr]  # idle, so closed at once
        self.clock.advance(0.074)  # 0.1 * (0.5 + 0.5 * 0.5) = 0.075
        self.assertEqual(len(self.servers.connections), 1)
        self.clock.advance(0.002)
        second, reqId = self.servers.last()
        self.assertIsNot(second, first)
        second.dataReceived(encode_chunk(reqId, b"abc") + done(reqId))
        completion = self.successResultOf(result)
        self.assertEqual((completion.text, completion.stats.tokens, completion.attempts), ("abc", 3, 2))
        self.assertEqual((pool.retries, pool.retriedRequests), (1, 1))

    def test_retiredConnectionFinishesItsRequestsFirst(self) -> None:
        """A draining server's requests in flight are not cut: the connection closes after the last one."""
        pool = self.pool(connections=1)
        running: Deferred[PooledCompletion] = Deferred.fromCoroutine(pool.infer("long", 3))
        refused: Deferred[PooledCompletion] = Deferred.fromCoroutine(pool.infer("new", 3))
        _, client, transport = self.servers.connections[0]
        longId, newId = sentInfers(transport)
        client.dataReceived(encode_chunk(longId, b"a") + encode_error(newId, ErrorCode.SHUTTING_DOWN, "draining"))
        self.assertFalse(transport.disconnecting)
        self.assertEqual(pool.connected(), [])
        client.dataReceived(done(longId))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.successResultOf(running).attempts, 1)
        self.clock.advance(1)
        again, reqId = self.servers.last()
        again.dataReceived(done(reqId))
        self.assertEqual(self.successResultOf(refused).attempts, 2)

    def test_noRetryAfterAChunk(self) -> None:
        """UPSTREAM_UNAVAILABLE mid-stream is the request's end: one attempt, the error raised."""
        pool = self.pool()
        chunks: list[str] = []
        result = Deferred.fromCoroutine(pool.infer("p", 3, onChunk=chunks.append))
        client, reqId = self.servers.last()
        client.dataReceived(encode_chunk(reqId, b"half") + encode_error(reqId, ErrorCode.UPSTREAM_UNAVAILABLE, "cut"))
        error = self.failureResultOf(result, ClientError).value
        self.assertEqual(error.code, ErrorCode.UPSTREAM_UNAVAILABLE)  # type: ignore[attr-defined]
        self.assertEqual(chunks, ["half"])
        self.assertEqual(pool.retries, 0)
        self.assertEqual(len(self.servers.connections), 1)

    def test_connectionLostBeforeAnyChunkIsRetriedWhenAllowed(self) -> None:
        pool = self.pool(policy=RetryPolicy(attempts=3, initialDelay=0.1, maxDelay=1.0, retryMaybeExecuted=True))
        result = Deferred.fromCoroutine(pool.infer("p", 3))
        client, _ = self.servers.last()
        client.connectionLost(Failure(ConnectionLost("reset")))
        self.clock.advance(1)
        again, reqId = self.servers.last()
        self.assertIsNot(again, client)
        again.dataReceived(done(reqId))
        self.assertEqual(self.successResultOf(result).attempts, 2)

    def test_attemptsAreBounded(self) -> None:
        """OVERLOADED every time: three attempts, two waits, then the last error."""
        pool = self.pool()
        result = Deferred.fromCoroutine(pool.infer("p", 3))
        waits = []
        for _ in range(3):
            _, client, transport = self.servers.connections[-1]
            [reqId] = sentInfers(transport)
            client.dataReceived(encode_error(reqId, ErrorCode.OVERLOADED, "busy"))
            calls = self.clock.getDelayedCalls()
            waits.append(round(calls[0].getTime() - self.clock.seconds(), 6) if calls else None)
            self.clock.advance(10)
        self.assertEqual(waits, [0.075, 0.15, None])
        error = self.failureResultOf(result, ClientError).value
        self.assertEqual(error.code, ErrorCode.OVERLOADED)  # type: ignore[attr-defined]
        self.assertEqual(pool.retries, 2)
        # OVERLOADED does not retire a connection: the server is up, only busy.
        self.assertEqual(len(self.servers.connections), 1)

    def test_answersAreNotRetried(self) -> None:
        pool = self.pool()
        result = Deferred.fromCoroutine(pool.infer("p", 3))
        client, reqId = self.servers.last()
        client.dataReceived(encode_error(reqId, ErrorCode.BAD_REQUEST, "no"))
        self.failureResultOf(result, ClientError)
        self.assertEqual(pool.retries, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusedConnectionsBackOff(self) -> None:
        """A balancer with no server up refuses: the pool waits and connects again."""
        pool = self.pool()
        self.servers.refuse = 2
        result = Deferred.fromCoroutine(pool.infer("p", 3))
        self.assertEqual(len(self.servers.refusals), 1)
        self.clock.advance(0.0751)
        self.assertEqual(len(self.servers.refusals), 2)
        self.clock.advance(0.1501)
        client, reqId = self.servers.last()
        client.dataReceived(done(reqId))
        self.assertEqual(self.successResultOf(result).attempts, 3)

    def test_retryGoesToAnotherAddress(self) -> None:
        """With several servers listed, the retry is sent to the next one."""
        pool = self.pool(["tcp:a:1", "tcp:b:1"])
        result = Deferred.fromCoroutine(pool.infer("p", 3))
        client, reqId = self.servers.last()
        client.dataReceived(encode_error(reqId, ErrorCode.OVERLOADED, "busy"))
        self.clock.advance(1)
        again, reqId = self.servers.last()
        again.dataReceived(done(reqId))
        self.successResultOf(result)
        self.assertEqual([address for address, _, _ in self.servers.connections], ["tcp:a:1", "tcp:b:1"])

    def test_requestsShareAConnectionBeingMade(self) -> None:
        """Requests that arrive while their slot connects wait for that one connection."""
        pending: Deferred[CC50ClientProtocol] = Deferred()
        pool = ClientPool(self.clock, "tcp:lb:1", connector=lambda address: pending)
        first = Deferred.fromCoroutine(pool.infer("a", 1))
        second = Deferred.fromCoroutine(pool.infer("b", 1))
        client, transport = CC50ClientProtocol(), StringTransport()
        client.makeConnection(transport)
        pending.callback(client)
        ids = sentInfers(transport)
        self.assertEqual(len(ids), 2)
        client.dataReceived(b"".join(done(reqId) for reqId in ids))
        self.successResultOf(first)
        self.successResultOf(second)

    def test_closeStopsRetrying(self) -> None:
        pool = self.pool()
        result = Deferred.fromCoroutine(pool.infer("p", 3))
        client, _ = self.servers.last()
        pool.close()
        client.connectionLost(Failure(ConnectionLost("closed")))
        self.failureResultOf(result, ConnectionLost)
        self.assertEqual(pool.retries, 0)

    def test_addressesRequired(self) -> None:
        self.assertRaises(ValueError, ClientPool, self.clock, [])
