"""
Credit windows and backpressure: the server never sends more chunk bytes
than granted, never splits a character, and pauses the backend (and resumes
it) for lack of credit or a full socket.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import SYNCHRONOUS_BATCH_TOKENS, ToyBackend
from cc50tw.codec import (
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    decode_done,
    encode_credit,
    encode_frame,
    encode_infer,
)
from cc50tw.stream import STALL_PROGRESS_BYTES
from cc50tw.test.fakes import Connection, ManualBackend, chunks_text, error_code, make_factory, terminal_frames


class CreditTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend, stall_timeout=10.0)
        self.connection = Connection(self.factory)

    def start(self, credit: int, req_id: int = 1) -> None:
        self.connection.send(encode_infer(req_id, "p", max_tokens=10, credit_bytes=credit))

    def sentBytes(self, req_id: int = 1) -> int:
        return sum(len(f.payload) for f in self.connection.frames if f.type == MessageType.RESP_CHUNK and f.req_id == req_id)

    def test_windowIsNeverExceededAndBackendIsPaused(self) -> None:
        self.start(credit=10)
        stream = self.backend.streams[1]
        stream.write(" token")
        self.assertFalse(stream.paused)
        stream.write(" token")  # 12 bytes offered, 10 allowed
        self.connection.received()
        self.assertEqual(self.sentBytes(), 10)
        self.assertTrue(stream.paused)
        stream.write(" token")  # written after the pause: held, not sent
        self.connection.received()
        self.assertEqual(self.sentBytes(), 10)

        self.connection.send(encode_credit(1, 100))
        self.connection.received()
        self.assertEqual(self.sentBytes(), 18)
        self.assertFalse(stream.paused)
        self.assertEqual(chunks_text(self.connection.frames, 1), " token" * 3)

    def test_windowExactlySpentPausesUntilCredit(self) -> None:
        self.start(credit=6)
        stream = self.backend.streams[1]
        stream.write(" token")
        self.assertTrue(stream.paused)
        self.connection.send(encode_credit(1, 6))
        self.assertFalse(stream.paused)

    def test_charactersAreNeverSplit(self) -> None:
        self.start(credit=4)
        stream = self.backend.streams[1]
        stream.write("aé€😀")  # 1 + 2 + 3 + 4 bytes
        frames = self.connection.received()
        self.assertEqual([f.payload for f in frames], ["aé".encode()])
        self.connection.send(encode_credit(1, 2))  # 3 bytes of credit: still not enough for "€"+...
        self.connection.send(encode_credit(1, 0))
        self.assertEqual([f.payload for f in self.connection.received()], ["€".encode()])
        self.connection.send(encode_credit(1, 3))  # 3 < 4 bytes of the emoji
        self.assertEqual(self.connection.received(), [])
        self.connection.send(encode_credit(1, 1))
        self.assertEqual([f.payload for f in self.connection.received()], ["😀".encode()])
        for frame in self.connection.frames:
            frame.payload.decode("utf-8")  # every chunk is valid UTF-8 on its own

    def test_doneWaitsForTheLastBytes(self) -> None:
        self.start(credit=3)
        stream = self.backend.streams[1]
        stream.write("abcdef")
        stream.finish(generated_tokens=2)
        self.assertEqual([f.type for f in self.connection.received()], [MessageType.RESP_CHUNK])
        self.connection.send(encode_credit(1, 3))
        frames = self.connection.received()
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK, MessageType.RESP_DONE])
        self.assertEqual(decode_done(frames[-1]).tokens, 2)

    def test_stallTimeoutEndsTheRequest(self) -> None:
        self.start(credit=3)
        stream = self.backend.streams[1]
        stream.write("abcdef")
        self.clock.advance(9.9)
        self.assertFalse(stream.cancelled)
        self.clock.advance(0.2)
        self.assertTrue(stream.cancelled)
        [terminal] = terminal_frames(self.connection.received(), 1)
        self.assertEqual(error_code(terminal), ErrorCode.CREDIT_STALL)
        self.assertIn(b"REQ_CREDIT", terminal.payload)

    def test_realProgressRestartsTheStallClock(self) -> None:
        """A grant that lets at least STALL_PROGRESS_BYTES through starts the clock over."""
        self.start(credit=3)
        stream = self.backend.streams[1]
        stream.write("abc" + "d" * STALL_PROGRESS_BYTES)
        self.clock.advance(9)
        self.connection.send(encode_credit(1, STALL_PROGRESS_BYTES))
        stream.write("ghi")
        self.clock.advance(9)
        self.assertFalse(stream.cancelled)
        self.clock.advance(2)
        self.assertTrue(stream.cancelled)

    def test_creditTrickleDoesNotRestartTheStallClock(self) -> None:
        """
        A client granting a byte at a time is still blocked: it loses the
        request after --stall-timeout of waiting, however often it grants.
        """
        self.start(credit=1)
        stream = self.backend.streams[1]
        stream.write(" token")
        for _ in range(9):
            self.clock.advance(1)
            self.connection.send(encode_credit(1, 1))
            if not stream.paused:
                stream.write(" token")
        self.assertFalse(stream.cancelled)
        self.clock.advance(1.1)
        self.assertTrue(stream.cancelled)
        [terminal] = terminal_frames(self.connection.received(), 1)
        self.assertEqual(error_code(terminal), ErrorCode.CREDIT_STALL)

    def test_blockedTimeIsCountedNotWallTime(self) -> None:
        """
        A prompt client of a slow backend with a small window is blocked only
        between spending its window and its next grant: the clock counts those
        moments, so the request is never stalled.
        """
        self.start(credit=6)
        stream = self.backend.streams[1]
        for _ in range(30):  # 30 tokens over 150 s, 0.1 s blocked after each
            stream.write(" token")
            self.clock.advance(0.1)
            self.connection.send(encode_credit(1, 6))
            self.clock.advance(4.9)
        self.assertFalse(stream.cancelled)

    def test_clientThatNeverGrantsStillWorksWithinItsWindow(self) -> None:
        """The C++ client never sends REQ_CREDIT; an answer that fits its window completes."""
        self.start(credit=0)  # 0 = 262144 bytes
        stream = self.backend.streams[1]
        for _ in range(1000):
            stream.write(" token")
        stream.finish(generated_tokens=1000)
        frames = self.connection.received()
        self.assertEqual(chunks_text(frames, 1), " token" * 1000)
        self.assertEqual(frames[-1].type, MessageType.RESP_DONE)
        self.assertFalse(stream.paused)

    def test_malformedCreditEndsThatRequest(self) -> None:
        self.start(credit=10)
        self.connection.send(encode_frame(MessageType.REQ_CREDIT, 1, b"\x01"))
        [terminal] = terminal_frames(self.connection.received(), 1)
        self.assertEqual(error_code(terminal), ErrorCode.BAD_REQUEST)

    def test_creditForUnknownRequestIsIgnored(self) -> None:
        self.connection.send(encode_credit(77, 10))
        self.assertEqual(self.connection.received(), [])


class TransportBackpressureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, _ = make_factory(self.backend)
        self.connection = Connection(self.factory)

    def test_protocolIsTheTransportsStreamingProducer(self) -> None:
        transport = self.connection.transport
        self.assertIs(transport.producer, self.connection.protocol)
        self.assertTrue(transport.streaming)

    def test_fullSendBufferPausesEveryStream(self) -> None:
        self.connection.send(encode_infer(1, "a") + encode_infer(2, "b"))
        transport = self.connection.transport
        transport.producer.pauseProducing()
        self.assertTrue(self.backend.streams[1].paused)
        self.assertTrue(self.backend.streams[2].paused)
        self.connection.send(encode_infer(3, "arrives while paused"))
        self.assertNotIn(3, self.backend.streams, "a request was read while the server could not write")
        self.assertEqual(transport.producerState, "paused", "the server did not stop reading its transport")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([s.paused for s in self.backend.streams.values()], [False, False, False])

    def test_resumeLeavesCreditBlockedStreamsPaused(self) -> None:
        self.connection.send(encode_infer(1, "a", credit_bytes=2) + encode_infer(2, "b"))
        self.backend.streams[1].write("abc")
        transport = self.connection.transport
        transport.producer.pauseProducing()
        transport.producer.resumeProducing()
        self.assertTrue(self.backend.streams[1].paused)
        self.assertFalse(self.backend.streams[2].paused)

    def test_stopProducingAbandonsStreams(self) -> None:
        self.connection.send(encode_infer(1, "a"))
        self.connection.transport.producer.stopProducing()
        self.assertTrue(self.backend.streams[1].cancelled)


class BoundedTransport(StringTransport):
    """A transport whose 'socket' holds ``high`` bytes until the test reads them."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high = high
        self.paused = False
        self.peak = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self._checkHigh()

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        super().writeSequence(seq)
        self._checkHigh()

    def _checkHigh(self) -> None:
        self.peak = max(self.peak, len(self.io.getvalue()))
        if not self.paused and len(self.io.getvalue()) > self.high and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return data


class SlowReaderTests(SynchronousTestCase):
    """The toy backend behind a socket that fills: work stops, memory stays bounded."""

    def test_slowReaderGetsEverythingWithinBoundedMemory(self) -> None:
        factory, clock = make_factory(ManualBackend(), max_inflight_per_connection=20)
        backend = ToyBackend(clock, CPUEngine(clock, None), 0)  # type: ignore[arg-type]
        factory.backend = backend
        transport = BoundedTransport(high=4096)
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(transport)
        protocol.dataReceived(b"".join(encode_infer(i, "p", 2000, credit_bytes=0xFFFFFFFF) for i in range(1, 21)))

        # Nobody reads: after the buffer fills, the backend stops working.
        for _ in range(50):
            clock.advance(0)
        emitted = backend.tokens_emitted
        for _ in range(50):
            clock.advance(0)
        self.assertEqual(backend.tokens_emitted, emitted)
        self.assertLess(emitted, 20 * 2000)

        decoder = FrameDecoder(1 << 20)
        frames: list[Frame] = []
        for _ in range(100000):
            frames.extend(f for f in decoder.feed(transport.drain()) if isinstance(f, Frame))
            clock.advance(0)
            if len([f for f in frames if f.type == MessageType.RESP_DONE]) == 20:
                break
        # The write that crossed the high-water mark may be one whole batch of
        # a stream; every stream stops at the pause after that.
        self.assertLessEqual(transport.peak, 4096 + SYNCHRONOUS_BATCH_TOKENS * 30)
        for req_id in range(1, 21):
            self.assertEqual(chunks_text(frames, req_id), " token" * 2000)
            [terminal] = terminal_frames(frames, req_id)
            self.assertEqual(decode_done(terminal).tokens, 2000)
