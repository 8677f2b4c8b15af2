"""
Regressions from a review of the core: each test failed before its fix
(non-recursive admission releases, no idle timer after connectionLost, no
backend work started for queued requests at the drain timeout).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import SYNCHRONOUS_BATCH_TOKENS, ToyBackend
from cc50tw.codec import ErrorCode, encode_infer
from cc50tw.server import CC50ServerFactory, ServerConfig
from cc50tw.test.fakes import Connection, ManualBackend, error_code, make_factory, terminal_frames


class ConnectionLostTimerTests(SynchronousTestCase):
    def test_connectionLostWithStreamsLeavesNoIdleTimer(self) -> None:
        """
        connectionLost cancels the idle timeout and then abandons the
        streams; the last one's streamEnded re-arms it, because Twisted never
        resets Protocol.connected.  A 300 s timer outlives the connection.
        """
        factory, clock = make_factory(ManualBackend(), idle_timeout=300.0)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", max_tokens=10))
        # The idle timer may still be pending while a request is in flight
        # (it does nothing when it fires then; see test_server's IdleTimerTests).
        self.assertEqual(list(connection.protocol.streams), [1])
        connection.protocol.connectionLost()
        self.assertEqual([call for call in clock.getDelayedCalls() if call.active()], [])


class AdmissionCascadeTests(SynchronousTestCase):
    def test_queuedRequestsFinishingSynchronouslyDoNotOverflowTheStack(self) -> None:
        """
        A released slot admits the next queued request inside release(); a
        request that finishes inside generate() (the toy at --toy-iters 0 and
        max_tokens <= 16) releases its slot from there, admitting the next,
        and so on: one stack level group per queued request.  At ~100 queued
        the stack overflows inside a Deferred callback: requests never get a
        terminal frame and a slot is leaked for good (running stays 1 with
        nothing running, so with --max-concurrency=1 the server is wedged).
        """
        clock = MemoryReactorClock()
        backend = ToyBackend(clock, CPUEngine(clock, None), 0)  # type: ignore[arg-type]
        factory = CC50ServerFactory(backend, ServerConfig(max_concurrency=1, log_requests=False), clock)
        connection = Connection(factory)
        # Longer than the toy answers at once: it streams, holding the slot over a few reactor turns.
        connection.send(encode_infer(1, "p", max_tokens=SYNCHRONOUS_BATCH_TOKENS + 100))
        last = 250
        for req_id in range(2, last + 1):
            connection.send(encode_infer(req_id, "p", max_tokens=1))
        self.assertEqual(factory.admission.queued, last - 1)
        for _ in range(40):
            clock.advance(0)
        frames = connection.received()
        missing = [r for r in range(1, last + 1) if len(terminal_frames(frames, r)) != 1]
        self.flushLoggedErrors()
        self.assertEqual(missing, [])
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(connection.protocol.streams, {})


class ShutdownTests(SynchronousTestCase):
    def test_shutdownDoesNotStartQueuedRequests(self) -> None:
        """
        After the drain timeout, shutdown cancels streams in order; cancelling
        a running one releases its slot, which admits a queued one and calls
        backend.generate for it (e.g. opens an upstream HTTP request) just
        before it too is cancelled.  (Minor: terminal frames stay correct.)
        """
        backend = ManualBackend()
        factory, clock = make_factory(backend, max_concurrency=1, log_requests=False)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", max_tokens=5))
        connection.send(encode_infer(2, "p", max_tokens=5))
        Deferred.fromCoroutine(factory.shutdown(1.0))
        clock.advance(1.0)
        frames = connection.received()
        self.assertEqual(error_code(terminal_frames(frames, 2)[0]), ErrorCode.SHUTTING_DOWN)
        self.assertEqual(sorted(backend.streams), [1])
