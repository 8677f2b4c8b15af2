"""
The request lifecycle's promises, each tried the way an adversary breaks it:
one terminal frame per request and nothing after it, bounded memory for a
client that never reads, no backend slot kept by a stalled client, an
orderly close.  ``BoundedTransport`` stands in for Twisted's real transport
where that matters (a full buffer pauses the producer; a registered paused
producer blocks the close; a paused transport delivers nothing).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cc50tw.codec import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    decode_done,
    encode_frame,
    encode_hello,
    encode_infer,
)
from cc50tw.errors import RequestFailed
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink
from cc50tw.server import MAX_HELLO_BYTES, SERVER_NAME, CC50ServerFactory, CC50ServerProtocol, ServerConfig
from cc50tw.test.fakes import ManualBackend, ServedConnection, error_code, make_factory


def frames(data: bytes) -> list[Frame]:
    return [item for item in FrameDecoder(1 << 30).feed(data) if isinstance(item, Frame)]


def Served(factory: CC50ServerFactory, bufferSize: int = 4096) -> ServedConnection:
    """A small send buffer, so that a few writes fill it."""
    return ServedConnection(factory, bufferSize)


class CloseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = ManualBackend()
        self.factory, self.clock = make_factory(self.backend, idle_timeout=4.0, stall_timeout=5.0)

    def test_idleCloseOfAnUnreadConnectionIsOrderly(self) -> None:
        """
        The connection is closed for idleness while its send buffer is full
        (its producer paused); once the peer reads, it gets a clean close, not
        the abort that a still-registered producer used to cause.
        """
        served = Served(self.factory)
        served.transport.peerSends(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        stream = self.backend.streams[1]
        while not stream.paused:
            stream.write(" token")
        self.clock.advance(5.0)  # stalled: CREDIT_STALL written into the full buffer
        self.clock.advance(4.0)  # idle: loseConnection
        self.assertTrue(served.transport.disconnecting)
        received = served.read()
        self.assertTrue(served.transport.closedCleanly, "the peer read everything but the connection was not closed")
        self.assertFalse(served.transport.aborted)
        self.assertEqual(received[-1].type, MessageType.RESP_ERR)
        self.assertEqual(error_code(received[-1]), ErrorCode.CREDIT_STALL)

    def test_connectionErrorAbandonsEveryRequestAndNothingFollows(self) -> None:
        served = Served(self.factory)
        served.transport.peerSends(encode_infer(1, "p", credit_bytes=0xFFFFFFFF) + encode_infer(2, "q"))
        first, second = self.backend.streams[1], self.backend.streams[2]
        while not first.paused:
            first.write(" token")
        # Sent while the server cannot write: it waits unread in the socket.
        served.transport.peerSends(b"XXXX" + bytes(20))
        self.assertFalse(first.cancelled)
        received = served.read()  # the buffer drains: the server resumes, reads, and fails the connection
        self.assertTrue(first.cancelled and second.cancelled)
        first.write(" late")  # a backend write that was already under way
        received += served.read()
        self.assertEqual((received[-1].type, received[-1].req_id), (MessageType.RESP_ERR, 0))
        self.assertEqual(error_code(received[-1]), ErrorCode.BAD_FRAME)
        self.assertTrue(served.transport.closedCleanly)
        self.assertEqual(self.factory.admission.running, 0)

    def test_unreadConnectionIsAbortedAfterTheStallTimeout(self) -> None:
        served = Served(self.factory)
        served.transport.peerSends(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        stream = self.backend.streams[1]
        while not stream.paused:
            stream.write(" token")
        self.clock.advance(5.0)
        self.clock.advance(4.0)
        self.clock.advance(5.0)
        self.assertTrue(served.transport.aborted)


class InputBackpressureTests(SynchronousTestCase):
    def test_floodFromAPeerThatNeverReadsIsNotRead(self) -> None:
        """HELLO earns a reply; 100,000 of them unread: the server stops reading, its buffer stays bounded."""
        factory, _ = make_factory(ManualBackend())
        served = Served(factory, bufferSize=4096)
        # One read can bring thousands of frames: the server stops between
        # two of them, as soon as its transport is full.
        served.transport.peerSends(encode_hello() * 2000)
        reply = HEADER_SIZE + len(SERVER_NAME)
        self.assertLessEqual(len(served.transport.value()), 4096 + reply)
        for _ in range(980):
            served.transport.peerSends(encode_hello() * 100)
        self.assertTrue(served.transport.readingPaused)
        self.assertLessEqual(len(served.transport.value()), 4096 + reply)
        self.assertLessEqual(served.protocol.heldBytes, 0)
        self.assertGreater(served.transport.inboundBytes, 2_000_000, "the peer's bytes should wait in its socket")
        # Once the peer reads, every HELLO gets its reply, in order.
        replies = 0
        while served.transport.value() or served.transport.inboundBytes:
            replies += len(served.read())
        self.assertEqual(replies, 100_000)

    def test_dataDeliveredWhilePausedIsHeldThenCapped(self) -> None:
        """A transport that keeps delivering after being paused cannot make the server buffer without bound."""
        factory, _ = make_factory(ManualBackend(), max_frame_bytes=1000)
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, CC50ServerProtocol)
        protocol.makeConnection(transport)
        protocol.pauseProducing()
        protocol.dataReceived(encode_hello() * 10)
        self.assertEqual(transport.value(), b"", "a frame was answered while the transport was paused")
        for _ in range(100):
            protocol.dataReceived(encode_hello() * 100)
        self.assertTrue(transport.disconnecting, "the held input was not capped")


class StallTests(SynchronousTestCase):
    def test_reentrantResumeKeepsTheStallClock(self) -> None:
        """
        A producer whose resumeProducing writes at once can fill the socket and
        pause the connection inside the resume; the stall clock started then
        must survive the outer call.
        """
        factory, clock = make_factory(ManualBackend(), stall_timeout=5.0)
        served = Served(factory, bufferSize=100)

        @implementer(IPushProducer)
        class Eager:
            def __init__(self, sink: ITokenSink) -> None:
                self.sink = sink
                self.paused = False

            def pauseProducing(self) -> None:
                self.paused = True

            def resumeProducing(self) -> None:
                self.paused = False
                self.sink.write("x" * 500)  # fills the transport: pauses the connection re-entrantly

            def stopProducing(self) -> None:
                pass

        class EagerBackend(ManualBackend):
            def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
                self.producer = Eager(sink)
                sink.registerProducer(self.producer, True)
                return Deferred()

        backend = EagerBackend()
        factory.backend = backend
        served.transport.peerSends(encode_infer(1, "p", credit_bytes=0xFFFFFFFF))
        served.protocol.pauseProducing()
        served.transport.peerReads()
        served.protocol.resumeProducing()  # Eager writes 500 bytes: the transport pauses us inside this call
        self.assertTrue(served.protocol.transportPaused)
        self.assertTrue(backend.producer.paused)
        clock.advance(5.1)
        [terminal] = [f for f in frames(served.transport.value()) if f.type == MessageType.RESP_ERR]
        self.assertEqual(error_code(terminal), ErrorCode.CREDIT_STALL)
        self.assertEqual(factory.admission.running, 0)

    def test_maxRequestSecondsIsAHardCap(self) -> None:
        backend = ManualBackend()
        factory, clock = make_factory(backend, max_request_seconds=3.0)
        served = Served(factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_infer(1, "p"))
        for _ in range(5):
            clock.advance(0.5)
            backend.streams[1].write("steady progress " * 100)
        clock.advance(0.6)
        [terminal] = [f for f in served.read() if f.type == MessageType.RESP_ERR]
        self.assertEqual(error_code(terminal), ErrorCode.TIMEOUT)
        self.assertIn(b"--max-request-seconds", terminal.payload)
        self.assertTrue(backend.streams[1].cancelled)


class TerminalFrameTests(SynchronousTestCase):
    def test_clockSteppingBackStillEndsTheRequest(self) -> None:
        times = iter([100.0, 50.0, 10.0, 5.0, 1.0, 0.5, 0.1])
        backend = ManualBackend()
        factory = CC50ServerFactory(backend, ServerConfig(), make_factory(backend)[1], clock=lambda: next(times, 0.0))
        served = Served(factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_infer(1, "p"))
        backend.streams[1].write("a")
        backend.streams[1].finish()
        done = served.read()[-1]
        self.assertEqual(done.type, MessageType.RESP_DONE)
        stats = decode_done(done)
        self.assertEqual((stats.elapsed_us, stats.ttft_us), (0, 0))
        self.assertEqual(factory.admission.running, 0)

    def test_errorTextThatIsNotEncodableStillEndsTheRequest(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        served = Served(factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_infer(1, "p"))
        backend.streams[1].fail(RequestFailed("upstream said \ud800" + "!" * 10000, ErrorCode.BACKEND_ERROR))
        [terminal] = served.read()
        self.assertEqual(error_code(terminal), ErrorCode.BACKEND_ERROR)
        self.assertTrue(terminal.payload.startswith(b"upstream said ?"))
        self.assertLessEqual(len(terminal.payload), 4096)
        self.assertEqual(factory.admission.running, 0)

    def test_emptyTextSendsNoChunk(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        served = Served(factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_infer(1, "p"))
        sink: Any = backend.streams[1].sink
        sink.writeSequence(["", "a", ""])
        sink.writeSequence([])
        sink.write("")
        chunks = [f.payload for f in served.read() if f.type == MessageType.RESP_CHUNK]
        self.assertEqual(chunks, [b"a"])


class AuthenticationFirstTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory, _ = make_factory(ManualBackend(), auth_token=b"s3cret", max_frame_bytes=1 << 20)

    def test_oversizedFrameBeforeHelloIsRefusedAndCloses(self) -> None:
        served = Served(self.factory, bufferSize=1 << 20)
        served.transport.peerSends(HEADER.pack(MAGIC, 1, MessageType.REQ_INFER, 1, 0, MAX_HELLO_BYTES + 1))
        [refusal] = served.read()
        self.assertEqual(error_code(refusal), ErrorCode.UNAUTHORIZED)
        self.assertTrue(served.transport.closedCleanly)

    def test_wrongHelloThenGarbageGetsOneError(self) -> None:
        served = Served(self.factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_hello(b"wrong") + b"garbage garbage garbage garbage!")
        [refusal] = served.read()
        self.assertEqual(error_code(refusal), ErrorCode.UNAUTHORIZED)
        self.assertTrue(served.transport.closedCleanly)

    def test_garbageBeforeHelloIsUnauthorized(self) -> None:
        served = Served(self.factory, bufferSize=1 << 20)
        served.transport.peerSends(b"GET / HTTP/1.1\r\n\r\n" + bytes(10))
        [refusal] = served.read()
        self.assertEqual(error_code(refusal), ErrorCode.UNAUTHORIZED)

    def test_largeFramesAreAllowedOnceAuthenticated(self) -> None:
        backend = ManualBackend()
        self.factory.backend = backend
        served = Served(self.factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_hello(b"s3cret") + encode_infer(1, "x" * (MAX_HELLO_BYTES * 4)))
        self.assertEqual([f.type for f in served.read()], [MessageType.HELLO])
        self.assertEqual(len(backend.streams[1].request.prompt), MAX_HELLO_BYTES * 4)

    def test_unknownFrameBeforeHelloCloses(self) -> None:
        served = Served(self.factory, bufferSize=1 << 20)
        served.transport.peerSends(encode_frame(99, 5))
        [refusal] = served.read()
        self.assertEqual(error_code(refusal), ErrorCode.UNAUTHORIZED)
        self.assertTrue(served.transport.closedCleanly)
