"""
Adversarial tests of the request lifecycle: a hostile client and a buggy
backend against the promises of docs/protocol.md "Request lifecycle".

Tests that fail here demonstrate a bug; the others are regression tests for
attacks that held.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cc50tw.codec import (
    HEADER,
    MAGIC,
    ErrorCode,
    MessageType,
    encode_cancel,
    encode_credit,
    encode_frame,
    encode_hello,
    encode_infer,
)
from cc50tw.errors import RequestFailed
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink
from cc50tw.server import CC50ServerFactory
from cc50tw.stream import Running
from cc50tw.test.fakes import ManualBackend, ServedConnection, error_code, make_factory

TERMINAL = (MessageType.RESP_DONE, MessageType.RESP_ERR)


def Served(factory: CC50ServerFactory, bufferSize: int = 1 << 20) -> ServedConnection:
    """A served connection with room for whole answers unless a test wants the buffer to fill."""
    return ServedConnection(factory, bufferSize)


def assertLifecycle(case: SynchronousTestCase, served: ServedConnection) -> None:
    """Nothing for a req_id after its terminal frame, nothing after a req_id 0 error, slots = Running streams."""
    ended: set[int] = set()
    connectionError = False
    for frame in served.frames:
        case.assertFalse(connectionError, f"frame {frame} after a connection-level error")
        if frame.type == MessageType.RESP_ERR and frame.req_id == 0:
            connectionError = True
            continue
        if frame.type in (MessageType.RESP_CHUNK, *TERMINAL):
            case.assertNotIn(frame.req_id, ended, f"frame {frame} after req_id {frame.req_id}'s terminal frame")
        if frame.type in TERMINAL:
            ended.add(frame.req_id)
    factory = served.factory
    running = sum(type(s.state) is Running for c in factory.connections for s in c.streams.values())
    case.assertEqual(factory.admission.running, running, "admission slots do not match Running streams")


class ReturningBackend(ManualBackend):
    """generate() returns whatever ``make`` gives (a fired Deferred, a failed one, not a Deferred at all)."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Any:
        return self.make(request, sink)


# --------------------------------------------------------------------------
# Bugs: each of these fails on the code under review.
# --------------------------------------------------------------------------


class BuggyBackendTerminalFrameTests(SynchronousTestCase):
    """A buggy backend must still leave every accepted request with exactly one terminal frame and no slot."""

    def _served(self, backend: ManualBackend, **config: Any) -> tuple[ServedConnection, CC50ServerFactory]:
        factory, self.clock = make_factory(backend, **config)
        return Served(factory), factory

    def test_resultNoneStillEndsTheRequest(self) -> None:
        """
        Was a bug: a generation Deferred that fires with None (a callback that forgot
        to return its result, the commonest Twisted slip) raises in _done before
        _finish: the request sits in Flushing for ever, no terminal frame.
        """
        backend = ManualBackend()
        served, factory = self._served(backend)
        served.send(encode_infer(1, "p"))
        backend.streams[1].sink.unregisterProducer()
        backend.streams[1].done.callback(None)  # type: ignore[arg-type]
        served.read()
        self.assertEqual(len(served.terminals(1)), 1, "no terminal frame for a request whose backend returned None")
        self.assertEqual(served.protocol.streams, {})

    def test_fractionalTokenCountStillEndsTheRequest(self) -> None:
        """
        Was a bug: GenerationResult(1, 2.5) (a plugin estimating tokens from text)
        makes encode_done's struct.pack raise, and _doneFrame's fallback
        raises the same way: no terminal frame, the request stays in Flushing.
        """
        backend = ManualBackend()
        served, factory = self._served(backend)
        served.send(encode_infer(1, "p"))
        backend.streams[1].write("hello")
        backend.streams[1].finish(prompt_tokens=1, generated_tokens=2.5)  # type: ignore[arg-type]
        served.read()
        self.assertEqual(len(served.terminals(1)), 1)
        self.assertEqual(served.protocol.streams, {})

    def test_requestFailedWithAPlainIntCodeStillEndsTheRequest(self) -> None:
        """
        Was a bug: RequestFailed("...", 13) (an int, not the enum) makes _fail's
        ``code.name`` raise inside the errback: no terminal frame, and the
        backend slot stays taken until the connection closes.
        """
        backend = ManualBackend()
        served, factory = self._served(backend)
        served.send(encode_infer(1, "p"))
        backend.streams[1].fail(RequestFailed("upstream gone", 13))  # type: ignore[arg-type]
        served.read()
        self.assertEqual(len(served.terminals(1)), 1)
        self.assertEqual(factory.admission.running, 0, "the backend slot leaked")

    def test_generateReturningNonDeferredWhileQueuedDoesNotLeakTheSlot(self) -> None:
        """
        Was a bug: _run catches exceptions *from* generate() but not from using what
        it returned.  A generate() that returns None (say an ``async def``
        plugin returning a coroutine) raises in ``generation.called``: when
        the request was queued this happens inside the admission Deferred, so
        the stream is left in Running with its slot and no terminal frame.
        """
        calls: list[int] = []

        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            calls.append(request.req_id)
            if request.req_id == 1:
                return Deferred()  # holds the only slot
            return None

        backend = ReturningBackend(make)
        served, factory = self._served(backend, max_concurrency=1)
        served.send(encode_infer(1, "p") + encode_infer(2, "p"))
        served.send(encode_cancel(1))  # frees the slot: request 2 starts inside the admission Deferred
        served.read()
        self.assertEqual(calls, [1, 2])
        self.assertEqual(len(served.terminals(2)), 1, "request 2 got no terminal frame")
        self.assertEqual(error_code(served.terminals(2)[0]), ErrorCode.BACKEND_ERROR)
        self.assertEqual(factory.admission.running, 0, "the backend slot leaked")
        self.flushLoggedErrors()

    def test_cancellerThatRaisesDoesNotLeakSlotOrConnection(self) -> None:
        """
        Was a bug: _finish calls ``generation.cancel()`` before it releases the slot
        and before ``streamEnded``.  A canceller that raises (an upstream
        backend whose abort hits a closed transport) propagates out of
        _finish: the slot is never released, the stream stays in
        ``connection.streams``, and on connection loss _abandonStreams stops at
        the first such stream, so connectionLost never reaches
        ``factory.connectionClosed``: the connection slot leaks too.
        """

        class RaisingCancel(ManualBackend):
            def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
                def canceller(_: object) -> None:
                    raise RuntimeError("abort on a closed upstream transport")

                d: Deferred[GenerationResult] = Deferred(canceller)
                self.streams[request.req_id] = d  # type: ignore[assignment]
                return d

        backend = RaisingCancel()
        served, factory = self._served(backend)
        served.send(encode_infer(1, "p") + encode_infer(2, "p"))
        try:
            served.send(encode_cancel(1))
        except RuntimeError:
            pass
        served.read()
        self.assertEqual(len(served.terminals(1)), 1)
        self.assertEqual(factory.admission.running, 1, "request 1's slot was not released")
        try:
            served.transport.abortConnection()
        except RuntimeError:
            pass
        self.assertEqual(factory.admission.running, 0, "request 2's slot was not released on connection loss")
        self.assertEqual(factory.connections, set(), "the connection was never unregistered from the factory")
        self.flushLoggedErrors()


class ReqIdRuleTests(SynchronousTestCase):
    def test_headerErrorOnAFinishedReqIdIsNotASecondTerminalFrame(self) -> None:
        """
        Was a bug (docs disagree with behaviour): protocol.md says a RESP_ERR with a
        non-zero req_id answers exactly one REQ_INFER, and that other frames on
        an idle req_id are dropped.  But a header with a bad version is
        answered with RESP_ERR UNSUPPORTED_VERSION on the header's req_id:
        here request 1's, after its RESP_DONE.  Connection-level errors should
        carry req_id 0 (server.streamCorrupted: ``self._failConnection(error.req_id, ...)``).
        """
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        served = Served(factory)
        served.send(encode_infer(1, "p"))
        backend.streams[1].finish()
        served.read()
        served.send(HEADER.pack(MAGIC, 9, MessageType.REQ_CREDIT, 1, 0, 4) + bytes(4))
        served.read()
        self.assertEqual(len(served.terminals(1)), 1, [(f.type, f.req_id) for f in served.frames])

    def test_unauthorizedIsAConnectionErrorOnReqIdZero(self) -> None:
        """
        Was a bug (same rule): before authentication a REQ_CANCEL on req_id 7 gets
        RESP_ERR UNAUTHORIZED on req_id 7, a terminal frame answering no
        REQ_INFER, for an error that closes the connection.
        """
        factory, _ = make_factory(ManualBackend(), auth_token=b"tok")
        served = Served(factory)
        served.send(encode_cancel(7))
        [refusal] = served.read()
        self.assertEqual(error_code(refusal), ErrorCode.UNAUTHORIZED)
        self.assertEqual(refusal.req_id, 0)

    def test_perRequestErrorOnReqIdZeroIsNotFollowedByFrames(self) -> None:
        """
        Was a bug (protocol): req_id 0 is accepted for REQ_INFER, so a per-request
        RESP_ERR (here TOO_LARGE for max_tokens) goes out on req_id 0, which
        the docs define as the connection-level error, and the connection
        then carries on sending frames.  REQ_INFER on req_id 0 should be
        refused as a connection error (or the docs should say MUST NOT).
        """
        backend = ManualBackend()
        factory, _ = make_factory(backend, max_tokens_limit=10)
        served = Served(factory)
        served.send(encode_infer(0, "p", max_tokens=11) + encode_infer(1, "p"))
        self.assertEqual(backend.streams, {})
        served.read()
        self.assertEqual([(f.type, f.req_id, f.flags) for f in served.frames], [(MessageType.RESP_ERR, 0, ErrorCode.BAD_REQUEST)])
        self.assertTrue(served.transport.closedCleanly)
        assertLifecycle(self, served)


class UnauthenticatedHoldTests(SynchronousTestCase):
    def test_unauthenticatedPeerCannotHoldAConnectionForever(self) -> None:
        """
        Was a bug: before HELLO, every byte restarted the idle timer (then
        ``TimeoutMixin.resetTimeout``; now every byte counts as activity).
        A peer that sends one byte of a HELLO header every idle_timeout - 1
        seconds is never closed and never authenticates: --max-connections
        such peers lock every real client out.  There is no deadline for the
        handshake.
        """
        factory, clock = make_factory(ManualBackend(), auth_token=b"tok", idle_timeout=10.0)
        served = Served(factory)
        hello = encode_hello(b"tok")
        for i in range(20):  # 180 seconds
            clock.advance(9.0)
            if served.transport.lost:
                break
            served.send(hello[i : i + 1])
        self.assertTrue(served.transport.lost, "an unauthenticated peer kept its connection for 180s (idle timeout 10s)")


# --------------------------------------------------------------------------
# Attacks that held: regression tests.
# --------------------------------------------------------------------------


class OneTerminalFrameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend, stall_timeout=5.0)
        self.served = Served(self.factory)

    def tearDown(self) -> None:
        assertLifecycle(self, self.served)

    def test_everyPerFrameErrorOnALiveReqId(self) -> None:
        s = self.served
        bad = [
            lambda r: encode_frame(99, r),  # unknown type
            lambda r: encode_frame(MessageType.RESP_DONE, r),  # server-only type
            lambda r: encode_frame(MessageType.REQ_CREDIT, r, b"abc"),  # malformed credit
            lambda r: encode_infer(r, "again"),  # duplicate
            lambda r: HEADER.pack(MAGIC, 1, MessageType.REQ_CANCEL, r, 0, (1 << 20) + 1),  # oversized
        ]
        for reqId, frame in enumerate(bad, 1):
            s.send(encode_infer(reqId, "p", credit_bytes=1))
            stream = self.backend.streams[reqId]
            stream.write("abc")  # text held for credit
            s.send(frame(reqId))
            self.assertTrue(stream.cancelled)
            stream.write("late")
            s.send(encode_credit(reqId, 100) + encode_cancel(reqId) + encode_frame(99, reqId))  # all dropped
            s.read()
        self.assertEqual(len([f for f in s.frames if f.type in TERMINAL]), len(bad))
        # the unknown-type ones; after the oversized header (last) the follow-up bytes are its skipped payload
        self.assertEqual(self.served.protocol.framesDropped, len(bad) - 1)
        self.assertEqual(self.factory.admission.running, 0)

    def test_creditAndCancelOnAnIdleReqIdAreIgnoredAsDocumented(self) -> None:
        """
        REQ_CREDIT and REQ_CANCEL for a finished request cross its terminal
        frame on the wire in normal use: ignored, without a reply, a log line
        or a count (the docs said counted; they now say this).
        """
        self.served.send(encode_credit(5, 100) + encode_cancel(5))
        self.assertEqual(self.served.protocol.framesDropped, 0)
        self.assertEqual(self.served.read(), [])

    def test_cancelCreditCancelInOneRead(self) -> None:
        s = self.served
        s.send(encode_infer(1, "p") + encode_cancel(1) + encode_credit(1, 5) + encode_cancel(1) + encode_infer(1, "q"))
        s.read()
        self.assertEqual([f.type for f in s.frames], [MessageType.RESP_ERR])
        self.backend.streams[1].finish()
        s.read()
        self.assertEqual(len(s.terminals(1)), 2)  # two REQ_INFERs, two answers
        self.served = Served(self.factory)  # req_id reuse: the tearDown check does not model it

    def test_grantThatFlushesAfterDoneIsOneDone(self) -> None:
        s = self.served
        s.send(encode_infer(1, "p", credit_bytes=2))
        stream = self.backend.streams[1]
        stream.write("hello")
        stream.finish()
        s.send(encode_credit(1, 3) + encode_credit(1, 3) + encode_credit(1, 0))
        s.read()
        self.assertEqual([f.type for f in s.frames], [MessageType.RESP_CHUNK] * 2 + [MessageType.RESP_DONE])

    def test_backendWritesAfterItsDeferredFired(self) -> None:
        s = self.served
        s.send(encode_infer(1, "p"))
        stream = self.backend.streams[1]
        stream.finish()
        stream.write("late")
        stream.sink.writeSequence(["x", "y"])
        stream.sink.registerProducer(stream, True)
        s.read()
        self.assertEqual([f.type for f in s.frames], [MessageType.RESP_DONE])

    def test_requestEndedRaising(self) -> None:
        def boom(*a: object) -> None:
            raise RuntimeError("metrics broke")

        self.factory.services = attrs.evolve(self.factory.services, requestEnded=boom)
        s = Served(self.factory)
        s.send(encode_infer(1, "p") + encode_infer(2, "p"))
        self.backend.streams[1].finish()
        s.send(encode_cancel(2))
        s.read()
        self.assertEqual([f.type for f in s.frames], [MessageType.RESP_DONE, MessageType.RESP_ERR])
        self.assertEqual(self.factory.admission.running, 0)
        self.flushLoggedErrors(RuntimeError)
        assertLifecycle(self, s)


class ReentrantBackendTests(SynchronousTestCase):
    def _serve(self, make: Any, **config: Any) -> tuple[ServedConnection, CC50ServerFactory]:
        factory, self.clock = make_factory(ReturningBackend(make), **config)
        served = Served(factory)
        served.send(encode_infer(1, "p", credit_bytes=4))
        served.read()
        return served, factory

    def test_generateReturnsAFiredDeferred(self) -> None:
        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            sink.write("hello world")
            return succeed(GenerationResult(1, 2))

        served, factory = self._serve(make, stall_timeout=3.0)
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(served.terminals(1), [])  # DONE waits behind held text
        self.clock.advance(3.0)
        served.read()
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CREDIT_STALL)
        assertLifecycle(self, served)

    def test_generateReturnsAFailedDeferred(self) -> None:
        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            sink.write("hi")
            return fail(CancelledError())

        served, factory = self._serve(make)
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CANCELLED)
        self.assertEqual(factory.admission.running, 0)
        assertLifecycle(self, served)

    def test_producerThatFinishesInsidePauseProducing(self) -> None:
        @implementer(IPushProducer)
        class Finisher:
            def __init__(self, sink: ITokenSink) -> None:
                self.sink = sink
                self.done: Deferred[GenerationResult] = Deferred()

            def pauseProducing(self) -> None:
                self.sink.write("more")
                self.sink.unregisterProducer()
                self.done.callback(GenerationResult(1, 1))

            def resumeProducing(self) -> None:
                self.sink.write("x")

            def stopProducing(self) -> None:
                pass

        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            p = Finisher(sink)
            sink.registerProducer(p, True)
            sink.write("hello")  # past the window: pauses, and the producer finishes inside the pause
            return p.done

        served, factory = self._serve(make, stall_timeout=3.0)
        self.assertEqual(factory.admission.running, 0)
        served.send(encode_credit(1, 100))
        served.read()
        self.assertEqual(b"".join(f.payload for f in served.frames if f.type == MessageType.RESP_CHUNK), b"hellomore")
        self.assertEqual(served.terminals(1)[0].type, MessageType.RESP_DONE)
        assertLifecycle(self, served)

    def test_producerThatFailsInsideResumeProducing(self) -> None:
        @implementer(IPushProducer)
        class Failer:
            def __init__(self, sink: ITokenSink) -> None:
                self.sink = sink
                self.done: Deferred[GenerationResult] = Deferred()

            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                self.sink.write("zz")
                self.done.errback(RequestFailed("gone", ErrorCode.UPSTREAM_UNAVAILABLE))
                self.sink.write("after")

            def stopProducing(self) -> None:
                pass

        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            p = Failer(sink)
            sink.registerProducer(p, True)
            sink.write("12345")
            return p.done

        served, factory = self._serve(make)
        served.send(encode_credit(1, 100))
        served.read()
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertEqual(factory.admission.running, 0)
        assertLifecycle(self, served)

    def test_cancellerThatNeitherFiresNorRaises(self) -> None:
        cancelled: list[bool] = []

        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            return Deferred(lambda d: cancelled.append(True))

        served, factory = self._serve(make)
        served.send(encode_cancel(1))
        served.read()
        self.assertEqual(cancelled, [True])
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CANCELLED)
        self.assertEqual(factory.admission.running, 0)
        assertLifecycle(self, served)

    def test_cancellerThatCallsBackWithAResult(self) -> None:
        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            return Deferred(lambda d: d.callback(GenerationResult(1, 1)))

        served, factory = self._serve(make)
        served.send(encode_cancel(1))
        served.read()
        self.assertEqual([f.type for f in served.frames], [MessageType.RESP_ERR])
        self.assertEqual(factory.admission.running, 0)


class StallAccountingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend, stall_timeout=10.0)

    def test_grantsOfExactlyTheHeldTextDoNotKeepTheSlot(self) -> None:
        served = Served(self.factory)
        served.send(encode_infer(1, "p", credit_bytes=1))
        stream = self.backend.streams[1]
        for _ in range(100):
            stream.write("tok ")
            self.clock.advance(1.0)
            live = served.protocol.streams.get(1)
            if live is not None:
                served.send(encode_credit(1, live.pendingBytes + 1))
            served.read()
            if served.terminals(1):
                break
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CREDIT_STALL)
        self.assertEqual(self.factory.admission.running, 0)

    def test_zeroGrantsAndOneByteGrantsDoNotResetTheClock(self) -> None:
        served = Served(self.factory)
        served.send(encode_infer(1, "p", credit_bytes=1))
        self.backend.streams[1].write("x" * 5000)
        for _ in range(30):
            self.clock.advance(1.0)
            served.send(encode_credit(1, 0) + encode_credit(1, 1))
        served.read()
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CREDIT_STALL)

    def test_backendFinishesWhileTextHeldThenClientTrickles(self) -> None:
        served = Served(self.factory)
        served.send(encode_infer(1, "p", credit_bytes=1))
        stream = self.backend.streams[1]
        stream.write("y" * 5000)
        stream.finish()
        self.assertEqual(self.factory.admission.running, 0)
        for _ in range(30):
            self.clock.advance(1.0)
            served.send(encode_credit(1, 100))
        served.read()
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CREDIT_STALL)

    def test_unregisteredProducerWithHeldTextIsStillTimed(self) -> None:
        """The backend unregisters (done producing) but its Deferred fires late: the clock keeps running."""
        served = Served(self.factory)
        served.send(encode_infer(1, "p", credit_bytes=1))
        stream = self.backend.streams[1]
        stream.write("z" * 50)
        stream.sink.unregisterProducer()
        self.clock.advance(11.0)
        served.read()
        self.assertEqual(error_code(served.terminals(1)[0]), ErrorCode.CREDIT_STALL)
        self.assertEqual(self.factory.admission.running, 0)

    def test_transportPauseResumeCyclesWithTinyReads(self) -> None:
        """A client that reads only what makes the transport resume, one small chunk each time, still stalls."""
        served = Served(self.factory, bufferSize=100)
        served.send(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        stream = self.backend.streams[1]
        stream.write("a" * 200)  # pauses the transport
        for _ in range(40):
            self.clock.advance(1.0)
            if served.terminals(1):
                break
            served.read()  # drains: resume
            stream.write("b")  # one byte, then the client...
            served.protocol.pauseProducing()  # ...stops reading (its socket fills with other traffic)
            served.read()
        self.assertTrue(served.terminals(1) or 1 not in served.protocol.streams)

    def test_unreadSocketWithCreditStalls(self) -> None:
        served = Served(self.factory, bufferSize=100)
        served.send(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        stream = self.backend.streams[1]
        stream.write("a" * 200)
        self.assertTrue(stream.paused)
        self.clock.advance(10.0)
        self.assertTrue(stream.cancelled)
        self.assertEqual(self.factory.admission.running, 0)


class AdmissionTests(SynchronousTestCase):
    def test_slotsUnderQueueCancelLossAndDrain(self) -> None:
        backend = ManualBackend()
        factory, clock = make_factory(backend, max_concurrency=2, max_queue=3, stall_timeout=5.0)
        a, b = Served(factory), Served(factory)
        a.send(encode_infer(1, "p") + encode_infer(2, "p") + encode_infer(3, "p"))
        b.send(encode_infer(1, "p") + encode_infer(2, "p") + encode_infer(3, "p"))  # 3: OVERLOADED
        assertLifecycle(self, a)
        self.assertEqual(factory.admission.queued, 3)
        a.send(encode_cancel(3))  # cancelled while queued
        assertLifecycle(self, a)
        a.transport.abortConnection()  # loses running 1, 2: b's 1 and 2 start
        self.assertEqual(factory.admission.running, 2)
        assertLifecycle(self, b)
        d = Deferred.fromCoroutine(factory.shutdown(drainTimeout=1.0, closeTimeout=1.0))
        b.send(encode_infer(9, "late"))
        clock.advance(1.0)
        b.read()
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(factory.admission.queued, 0)
        codes = [error_code(f) for f in b.frames if f.type == MessageType.RESP_ERR]
        self.assertEqual(sorted(codes), sorted([ErrorCode.OVERLOADED] + [ErrorCode.SHUTTING_DOWN] * 3))
        self.assertTrue(b.transport.closedCleanly)
        self.successResultOf(d)
        assertLifecycle(self, b)

    def test_queuedRequestAdmittedByASynchronouslyFinishingBackendChain(self) -> None:
        def make(request: InferenceRequest, sink: ITokenSink) -> Any:
            if request.req_id == 1:
                return Deferred()
            sink.write("x")
            return succeed(GenerationResult(1, 1))

        factory, _ = make_factory(ReturningBackend(make), max_concurrency=1, max_queue=2000)
        served = Served(factory)
        served.send(b"".join(encode_infer(i, "p") for i in range(1, 201)))
        served.send(encode_cancel(1))
        served.read()
        self.assertEqual(len([f for f in served.frames if f.type == MessageType.RESP_DONE]), 199)
        self.assertEqual(factory.admission.running, 0)
        assertLifecycle(self, served)


class CloseTests(SynchronousTestCase):
    def test_closeWhilePausedThenAbortTimerAfterLoss(self) -> None:
        backend = ManualBackend()
        factory, clock = make_factory(backend, stall_timeout=5.0, idle_timeout=2.0)
        served = Served(factory, bufferSize=100)
        served.send(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        backend.streams[1].write("a" * 300)
        served.send(b"XXXX" + bytes(20))  # held: the transport is paused
        served.protocol.close()
        self.assertIsNone(served.transport.producer)
        served.read()
        self.assertTrue(served.transport.closedCleanly)
        clock.advance(100)
        self.assertFalse(served.transport.aborted)
        self.assertEqual(clock.getDelayedCalls(), [])
        assertLifecycle(self, served)

    def test_drainWhileAConnectionIsAlreadyClosing(self) -> None:
        backend = ManualBackend()
        factory, clock = make_factory(backend, stall_timeout=50.0)
        served = Served(factory, bufferSize=100)
        served.send(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        backend.streams[1].write("a" * 300)
        served.send(b"XXXX" + bytes(20))
        served.protocol.resumeProducing()  # reads the garbage: BAD_FRAME and closing, never read
        d = Deferred.fromCoroutine(factory.shutdown(drainTimeout=1.0, closeTimeout=1.0))
        clock.advance(1.0)
        clock.advance(1.0)
        self.successResultOf(d)
        self.assertTrue(served.transport.aborted)
        self.assertEqual(factory.connections, set())


class AuthTests(SynchronousTestCase):
    def test_nothingAnsweredBeforeAGoodHello(self) -> None:
        factory, _ = make_factory(ManualBackend(), auth_token=b"tok")
        for pre in [encode_infer(1, "p"), encode_credit(1, 5), encode_hello(b"to"), encode_hello(b"tok" * 2000)]:
            served = Served(factory)
            served.send(pre + encode_hello(b"tok") + encode_infer(2, "p"))
            served.read()
            self.assertEqual([error_code(f) for f in served.frames], [ErrorCode.UNAUTHORIZED])
            self.assertTrue(served.transport.closedCleanly)

    def test_helloAfterAuthenticationIsJustAnswered(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend, auth_token=b"tok")
        served = Served(factory)
        served.send(encode_hello(b"tok") + encode_hello(b"wrong") + encode_hello(b"x" * 100_000) + encode_infer(1, "p"))
        served.read()
        self.assertEqual([f.type for f in served.frames], [MessageType.HELLO] * 3)
        self.assertIn(1, backend.streams)
