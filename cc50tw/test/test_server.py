"""
The server protocol against a StringTransport: framing, multiplexing,
errors, limits and timeouts, with a hand-driven backend and a fake clock.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import ToyBackend
from cc50tw.codec import (
    HEADER,
    MAGIC,
    ErrorCode,
    MessageType,
    decode_done,
    encode_cancel,
    encode_credit,
    encode_frame,
    encode_infer,
)
from cc50tw.errors import BackendError
from cc50tw.test.fakes import (
    Connection,
    ManualBackend,
    chunks_text,
    error_code,
    make_factory,
    terminal_frames,
)


class ImmediateToy(ToyBackend):
    """The real toy backend with zero work, so it completes on the fake clock."""

    def __init__(self, reactor: object) -> None:
        super().__init__(reactor, CPUEngine(reactor, None), iters=0)  # type: ignore[arg-type]


class ToyServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        factory, self.clock = make_factory(ManualBackend(), default_max_tokens=3)
        factory.backend = ImmediateToy(self.clock)
        self.connection = Connection(factory)

    def test_streamsTokensThenDone(self) -> None:
        self.connection.send(encode_infer(7, "two words", max_tokens=5))
        frames = self.connection.received()
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK] * 5 + [MessageType.RESP_DONE])
        self.assertEqual(chunks_text(frames, 7), " token" * 5)
        stats = decode_done(frames[-1])
        self.assertEqual((stats.tokens, stats.generated_tokens, stats.prompt_tokens), (5, 5, 2))

    def test_zeroMaxTokensMeansServerDefault(self) -> None:
        self.connection.send(encode_infer(1, "x", max_tokens=0))
        self.assertEqual(chunks_text(self.connection.received(), 1), " token" * 3)

    def test_longStreamSpreadsOverReactorTurns(self) -> None:
        """A long answer yields the reactor between batches instead of monopolising it."""
        self.connection.send(encode_infer(1, "x", max_tokens=1000))
        first = self.connection.received()
        self.assertLess(len(first), 1000)
        for _ in range(100):
            self.clock.advance(0)
        frames = first + self.connection.received()
        self.assertEqual(chunks_text(frames, 1), " token" * 1000)
        self.assertEqual(decode_done(terminal_frames(frames, 1)[0]).tokens, 1000)

    def test_interleavedRequestsEachGetTheirOwnAnswer(self) -> None:
        self.connection.send(encode_infer(1, "a", max_tokens=2000) + encode_infer(2, "b", max_tokens=3))
        for _ in range(20):
            self.clock.advance(0)
        frames = self.connection.received()
        self.assertEqual(chunks_text(frames, 1), " token" * 2000)
        self.assertEqual(chunks_text(frames, 2), " token" * 3)
        self.assertEqual(len(terminal_frames(frames, 1)), 1)
        self.assertEqual(len(terminal_frames(frames, 2)), 1)
        # The short answer finished before the long one: it was not starved.
        order = [f.req_id for f in frames if f.type == MessageType.RESP_DONE]
        self.assertEqual(order, [2, 1])

    def test_cancelStopsTheToyWork(self) -> None:
        backend = self.connection.factory.backend
        assert isinstance(backend, ToyBackend)
        self.connection.send(encode_infer(1, "a", max_tokens=100000))
        self.connection.send(encode_cancel(1))
        emitted = backend.tokens_emitted
        for _ in range(10):
            self.clock.advance(0)
        self.assertEqual(backend.tokens_emitted, emitted)
        frames = self.connection.received()
        [terminal] = terminal_frames(frames, 1)
        self.assertEqual(error_code(terminal), ErrorCode.CANCELLED)


class ProtocolErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend, max_frame_bytes=1000)
        self.connection = Connection(self.factory)

    def assertStillServing(self, req_id: int = 99) -> None:
        self.connection.send(encode_infer(req_id, "still there?", max_tokens=1))
        self.backend.streams[req_id].write("yes")
        self.backend.streams[req_id].finish()
        frames = self.connection.received()
        self.assertEqual(chunks_text(frames, req_id), "yes")
        self.assertEqual(terminal_frames(frames, req_id)[0].type, MessageType.RESP_DONE)

    def test_badMagicErrorsAndCloses(self) -> None:
        self.connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [frame] = self.connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (0, ErrorCode.BAD_FRAME))
        self.assertIn(b"bad magic", frame.payload)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_wrongVersionErrorsAndCloses(self) -> None:
        self.connection.send(HEADER.pack(MAGIC, 2, MessageType.REQ_INFER, 5, 0, 0))
        [frame] = self.connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (0, ErrorCode.UNSUPPORTED_VERSION))
        self.assertTrue(self.connection.transport.disconnecting)

    def test_nothingIsProcessedAfterCorruption(self) -> None:
        self.connection.send(b"\x00" * 24 + encode_infer(1, "late"))
        self.assertEqual(self.backend.streams, {})

    def test_unknownTypeOnAnIdleReqIdIsDroppedAndCounted(self) -> None:
        """No request on req_id 3, so there is nothing to answer for: dropped, counted, the connection goes on."""
        self.connection.send(encode_frame(42, 3, b"whatever"))
        self.assertEqual(self.connection.received(), [])
        self.assertEqual(self.factory.counters.framesDropped, 1)
        self.assertFalse(self.connection.transport.disconnecting)
        self.assertStillServing()

    def test_unknownTypeOnALiveReqIdEndsThatRequestOnly(self) -> None:
        self.connection.send(encode_infer(3, "in flight") + encode_infer(4, "neighbour"))
        self.connection.send(encode_frame(42, 3, b"whatever"))
        [frame] = self.connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (3, ErrorCode.UNKNOWN_TYPE))
        self.assertTrue(self.backend.streams[3].cancelled)
        self.assertFalse(self.backend.streams[4].cancelled)
        self.assertStillServing()

    def test_serverFrameTypeFromClientIsRejected(self) -> None:
        self.connection.send(encode_infer(4, "in flight"))
        self.connection.send(encode_frame(MessageType.RESP_CHUNK, 4, b"x"))
        [frame] = self.connection.received()
        self.assertEqual(error_code(frame), ErrorCode.UNKNOWN_TYPE)
        self.assertIn(b"RESP_CHUNK", frame.payload)
        self.assertStillServing()

    def test_junkOnALiveReqIdGivesOneTerminalFrame(self) -> None:
        """Unknown type, oversized frame, bad credit, all on one live req_id: one RESP_ERR, nothing after."""
        self.connection.send(encode_infer(7, "p", credit_bytes=1))
        self.backend.streams[7].write("abc")
        self.connection.send(encode_frame(99, 7))
        self.connection.send(HEADER.pack(MAGIC, 1, MessageType.REQ_CREDIT, 7, 0, 5000) + b"\0" * 5000)
        self.connection.send(encode_frame(MessageType.REQ_CREDIT, 7, b"\x01"))
        self.connection.send(encode_credit(7, 100))
        frames = [f for f in self.connection.received() if f.req_id == 7]
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK, MessageType.RESP_ERR])
        self.assertEqual(error_code(frames[-1]), ErrorCode.UNKNOWN_TYPE)
        self.assertStillServing()

    def test_oversizedFrameIsRefusedWithoutBuffering(self) -> None:
        self.connection.send(HEADER.pack(MAGIC, 1, MessageType.REQ_INFER, 8, 0, 5000))
        [frame] = self.connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (8, ErrorCode.TOO_LARGE))
        for _ in range(5):
            self.connection.send(b"\xff" * 1000)
            self.assertEqual(self.connection.protocol.bufferedBytes, 0)
        self.assertFalse(self.connection.transport.disconnecting)
        self.assertStillServing()

    def test_badInferPayload(self) -> None:
        self.connection.send(encode_frame(MessageType.REQ_INFER, 6, b"\x01\x00"))
        self.connection.send(encode_frame(MessageType.REQ_INFER, 7, b"\x01\x00\x00\x00" * 2 + b"\x09\x00\x00\x00abc"))
        self.connection.send(encode_frame(MessageType.REQ_INFER, 8, b"\x01\x00\x00\x00" * 2 + b"\x02\x00\x00\x00\xc3\x28"))
        codes = [(f.req_id, error_code(f)) for f in self.connection.received()]
        self.assertEqual(codes, [(6, ErrorCode.BAD_REQUEST), (7, ErrorCode.BAD_REQUEST), (8, ErrorCode.BAD_REQUEST)])
        self.assertStillServing()

    def test_duplicateInFlightReqId(self) -> None:
        """
        A second REQ_INFER on a live req_id ends the request on it: the
        client reads one terminal frame for that req_id, never an error
        followed by the first request's RESP_DONE.
        """
        self.connection.send(encode_infer(1, "first"))
        first = self.backend.streams[1]
        self.connection.send(encode_infer(1, "second"))
        [frame] = self.connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (1, ErrorCode.DUPLICATE_REQ_ID))
        self.assertTrue(first.cancelled, "the first request's backend work was not cancelled")
        self.assertEqual(self.backend.streams[1].request.prompt, "first", "the duplicate was started")
        # Once ended, the id may be used again.
        self.connection.send(encode_infer(1, "third"))
        self.assertEqual(self.backend.streams[1].request.prompt, "third")

    def test_truncatedFrameThenDisconnect(self) -> None:
        self.connection.send(encode_infer(1, "in flight"))
        self.connection.send(encode_infer(2, "never finished")[:30])
        self.connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(self.backend.streams[1].cancelled)
        self.assertNotIn(2, self.backend.streams)
        self.assertEqual(self.connection.protocol.streams, {})

    def test_oneConnectionsMistakesDoNotDisturbAnother(self) -> None:
        other = Connection(self.factory)
        other.send(encode_infer(5, "fine"))
        self.connection.send(b"garbage garbage garbage garbage")
        self.backend.streams[5].write("ok")
        self.backend.streams[5].finish()
        frames = other.received()
        self.assertEqual(chunks_text(frames, 5), "ok")
        self.assertFalse(other.transport.disconnecting)


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend, stall_timeout=10.0, idle_timeout=30.0)
        self.connection = Connection(self.factory)

    def test_backendErrorBecomesOneErr(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.backend.streams[1].write("partial")
        self.backend.streams[1].fail(BackendError("llama-server is not reachable", ErrorCode.UPSTREAM_UNAVAILABLE))
        frames = self.connection.received()
        [terminal] = terminal_frames(frames, 1)
        self.assertEqual(error_code(terminal), ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn(b"not reachable", terminal.payload)

    def test_unexpectedBackendExceptionIsReportedNotFatal(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.backend.streams[1].fail(ZeroDivisionError("oops"))
        [terminal] = terminal_frames(self.connection.received(), 1)
        self.assertEqual(error_code(terminal), ErrorCode.BACKEND_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_generateRaisingSynchronously(self) -> None:
        self.backend.raiseOnGenerate = RuntimeError("broken backend")
        self.connection.send(encode_infer(1, "x"))
        [terminal] = terminal_frames(self.connection.received(), 1)
        self.assertEqual(error_code(terminal), ErrorCode.BACKEND_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.factory.admission.running, 0)

    def test_cancelEndsWithOneCancelledErr(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        stream = self.backend.streams[1]
        self.connection.send(encode_cancel(1))
        self.assertTrue(stream.cancelled)
        stream.write("too late")  # a backend that has not noticed yet
        frames = self.connection.received()
        self.assertEqual([error_code(f) for f in frames], [ErrorCode.CANCELLED])
        self.connection.send(encode_cancel(1))  # already finished: ignored
        self.connection.send(encode_cancel(12345))  # unknown: ignored
        self.assertEqual(self.connection.received(), [])

    def test_doneBeforeCancelWins(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.backend.streams[1].finish()
        self.connection.send(encode_cancel(1))
        self.assertEqual([f.type for f in self.connection.received()], [MessageType.RESP_DONE])

    def test_elapsedAndTimeToFirstChunk(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.clock.advance(0.25)
        self.backend.streams[1].write("a")
        self.clock.advance(0.5)
        self.backend.streams[1].finish(prompt_tokens=4, generated_tokens=9)
        stats = decode_done(terminal_frames(self.connection.received(), 1)[0])
        self.assertEqual((stats.ttft_us, stats.elapsed_us), (250000, 750000))
        self.assertEqual((stats.tokens, stats.prompt_tokens, stats.generated_tokens), (9, 4, 9))

    def test_idleConnectionIsClosed(self) -> None:
        self.clock.advance(29)
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_busyConnectionIsNotIdle(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.clock.advance(100)
        self.assertFalse(self.connection.transport.disconnecting)
        self.backend.streams[1].finish()
        self.clock.advance(29)
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_idleTimeCountsFromTheLastRequestsEnd(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.clock.advance(20)
        self.backend.streams[1].finish()
        self.clock.advance(29)  # the timer set at the start fires at 30, and sleeps again
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_bytesWhileIdleRestartTheClock(self) -> None:
        """An authenticated peer that sends anything is not idle, even before a whole frame."""
        self.clock.advance(20)
        self.connection.send(encode_infer(1, "x")[:10])
        self.clock.advance(29)
        self.assertFalse(self.connection.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.connection.transport.disconnecting)

    def test_idleTimerIsGoneAfterClose(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.backend.streams[1].finish()
        self.connection.protocol.close()
        self.connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual([call for call in self.clock.getDelayedCalls() if call.active()], [])

    def test_connectionLostCancelsEverything(self) -> None:
        self.connection.send(encode_infer(1, "x") + encode_infer(2, "y"))
        self.connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(self.backend.streams[1].cancelled)
        self.assertTrue(self.backend.streams[2].cancelled)
        self.assertEqual(self.factory.admission.running, 0)
        self.assertEqual(self.factory.connections, set())

    def test_cancellationFailureIsNotLoggedAsUnhandled(self) -> None:
        self.connection.send(encode_infer(1, "x"))
        self.connection.send(encode_cancel(1))
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])


class LimitTests(SynchronousTestCase):
    def test_maxInflightPerConnection(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend, max_inflight_per_connection=2)
        connection = Connection(factory)
        connection.send(encode_infer(1, "a") + encode_infer(2, "b") + encode_infer(3, "c"))
        [frame] = connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (3, ErrorCode.TOO_MANY_REQUESTS))
        backend.streams[1].finish()
        connection.send(encode_infer(4, "d"))
        self.assertIn(4, backend.streams)

    def test_concurrencyAndQueue(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend, max_concurrency=1, max_queue=1)
        connection = Connection(factory)
        connection.send(encode_infer(1, "runs") + encode_infer(2, "waits") + encode_infer(3, "refused"))
        self.assertEqual(sorted(backend.streams), [1])
        [frame] = connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (3, ErrorCode.OVERLOADED))
        backend.streams[1].finish()
        self.assertEqual(sorted(backend.streams), [1, 2])

    def test_cancelWhileQueuedLeavesTheQueue(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend, max_concurrency=1, max_queue=1)
        connection = Connection(factory)
        connection.send(encode_infer(1, "runs") + encode_infer(2, "waits") + encode_cancel(2))
        self.assertEqual(error_code(connection.received()[0]), ErrorCode.CANCELLED)
        self.assertEqual(factory.admission.queued, 0)
        connection.send(encode_infer(3, "now fits in the queue"))
        self.assertEqual(connection.received(), [])
        backend.streams[1].finish()
        self.assertEqual(sorted(backend.streams), [1, 3])

    def test_maxConnections(self) -> None:
        factory, _ = make_factory(ManualBackend(), max_connections=1)
        first = Connection(factory)
        second = Connection(factory)
        [frame] = second.received()
        self.assertEqual((frame.req_id, error_code(frame)), (0, ErrorCode.OVERLOADED))
        self.assertTrue(second.transport.disconnecting)
        self.assertFalse(first.transport.disconnecting)
        second.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(len(factory.connections), 1)
        first.protocol.connectionLost(None)  # type: ignore[arg-type]
        third = Connection(factory)
        self.assertEqual(third.received(), [])

    def test_frameAtTheLimitIsAccepted(self) -> None:
        backend = ManualBackend()
        frame = encode_infer(1, "p" * 88)
        factory, _ = make_factory(backend, max_frame_bytes=len(frame) - 24)
        connection = Connection(factory)
        connection.send(frame)
        self.assertIn(1, backend.streams)
        connection.send(encode_infer(2, "p" * 89))
        self.assertEqual(error_code(connection.received()[0]), ErrorCode.TOO_LARGE)


class MaxTokensLimitTests(SynchronousTestCase):
    def test_limitIsInclusive(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend, max_tokens_limit=100)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", max_tokens=100) + encode_infer(2, "p", max_tokens=101))
        self.assertEqual(backend.streams[1].request.max_tokens, 100)
        [frame] = connection.received()
        self.assertEqual((frame.req_id, error_code(frame)), (2, ErrorCode.TOO_LARGE))
        self.assertIn(b"--max-tokens-limit", frame.payload)
