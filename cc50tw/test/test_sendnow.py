"""
Replies sent in the read that earned them (``cc50tw.sendnow``, issue 18a),
and replies written outside a read sent as they are written (issue 18c).

The server hands what a read's replies wrote to the socket before returning
to the reactor, and a lone request's answer before the request is recorded.
These tests hold it to that on a socket double built from Twisted's own
``FileDescriptor`` (so ``write``, ``doWrite``, producer pausing and closing are
Twisted's code), and on a real loopback socket; and they try what could go
wrong with sending from inside a read: a socket that takes nothing or part, a
send that fails, a paused producer, a closing connection.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase

from cc50tw.backends.toy import build as buildToy
from cc50tw.codec import Frame, FrameDecoder, MessageType, encode_credit, encode_hello, encode_infer
from cc50tw.generation import GenerationOptions
from cc50tw.interfaces import GenerationResult, ImmediateAnswer
from cc50tw.sendnow import SendAtPassEnd, sendNowFor, writeNowFor
from cc50tw.server import CC50ServerFactory, CC50ServerProtocol, ServerConfig
from cc50tw.test.fakes import ImmediateBackend, error_code, terminal_frames


class SocketDouble(FileDescriptor):
    """
    Twisted's ``FileDescriptor`` with the socket call replaced: every send
    is kept in ``sends``, and the socket takes ``accept`` bytes per send (all
    when None), or fails when ``failing``.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.sends: list[bytes] = []
        self.accept: int | None = None
        self.failing = False
        self.aborted = False

    def writeSomeData(self, data: bytes) -> Any:
        if self.failing:
            return main.CONNECTION_LOST
        taken = len(data) if self.accept is None else min(self.accept, len(data))
        self.sends.append(bytes(data[:taken]))
        return taken

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 9199)

    def abortConnection(self) -> None:
        # As tcp.Connection does: nothing more is read or written.
        self.aborted = True
        self.stopReading()
        self.stopWriting()
        self.doWrite = lambda: None  # type: ignore[method-assign]

    def queued(self) -> int:
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def sentFrames(self) -> list[Frame]:
        return [item for item in FrameDecoder(1 << 30).feed(b"".join(self.sends)) if isinstance(item, Frame)]


def plainAnswer(texts: list[str]) -> ImmediateAnswer:
    return ImmediateAnswer(texts, GenerationResult(1, len(texts)))


def serve(backend: object, **config: Any) -> tuple[CC50ServerFactory, CC50ServerProtocol, SocketDouble]:
    reactor = MemoryReactorClock()
    factory = CC50ServerFactory(backend, ServerConfig(**config), reactor)  # type: ignore[arg-type]
    socket = SocketDouble(reactor)
    protocol = factory.buildProtocol(socket.getPeer())
    assert isinstance(protocol, CC50ServerProtocol)
    protocol.makeConnection(socket)
    return factory, protocol, socket


class SendNowForTests(TestCase):
    def test_onlyFileDescriptors(self) -> None:
        """A transport that is not a socket's FileDescriptor is left to the reactor."""
        self.assertIsNone(sendNowFor(StringTransport()))
        self.assertIsNone(sendNowFor(object()))
        self.assertIsNotNone(sendNowFor(SocketDouble(MemoryReactorClock())))

    def test_notWhileClosingPausedOrGone(self) -> None:
        """Closing, paused or disconnected, nothing is sent: the reactor's doWrite must do those."""
        for state in ("disconnecting", "producerPaused", "disconnected"):
            socket = SocketDouble(MemoryReactorClock())
            socket.write(b"reply")
            if state == "disconnected":
                socket.connected = 0
            else:
                setattr(socket, state, True)
            sendNow = sendNowFor(socket)
            assert sendNow is not None
            sendNow()
            self.assertEqual(socket.sends, [], state)
            self.assertEqual(socket.queued(), 5, state)


class ServerSendsInTheReadTests(TestCase):
    def sendsWhenLogged(self, socket: SocketDouble) -> dict[int, int]:
        """req_id -> sends the socket had made when that request's log line was made, kept as the test runs."""
        sendsSoFar: dict[int, int] = {}

        def see(event: dict[str, Any]) -> None:
            if "request" in str(event.get("log_format", "")) and event.get("req_id") is not None:
                sendsSoFar[event["req_id"]] = len(socket.sends)

        observer = cast(ILogObserver, see)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return sendsSoFar

    def test_oneRequestOneSend(self) -> None:
        """A lone request's whole answer has left, in one send, when dataReceived returns."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a", " b"])))
        protocol.dataReceived(encode_infer(1, "hi", 2))
        self.assertEqual(len(socket.sends), 1)
        frames = socket.sentFrames()
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK] * 2 + [MessageType.RESP_DONE])
        self.assertEqual(socket.queued(), 0)
        self.assertNotIn(socket, socket.reactor.getWriters())  # nothing left for the reactor

    def test_sentBeforeTheLogLine(self) -> None:
        """With the request log on, the answer is on the socket before its log line is made."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])))
        sentWhenLogged = self.sendsWhenLogged(socket)
        protocol.dataReceived(encode_infer(1, "first", 1))  # a connection's first read takes the receiver's loop
        protocol.dataReceived(encode_infer(7, "hi", 1))
        self.assertEqual(sentWhenLogged, {1: 1, 7: 2})

    def test_sentBeforeTheMetricsRecord(self) -> None:
        """Quiet, the answer is on the socket before the metrics keep its record."""
        factory, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])), log_requests=False)
        sentWhenRecorded: list[int] = []
        record = factory.services.requestEnded

        def spy(*args: Any, **kwargs: Any) -> Any:
            sentWhenRecorded.append(len(socket.sends))
            return record(*args, **kwargs)

        protocol.dataReceived(encode_infer(1, "first", 1))  # a connection's first read takes the receiver's loop
        factory.services = attrs.evolve(factory.services, requestEnded=spy)
        protocol.dataReceived(encode_infer(3, "hi", 1))
        self.assertEqual(sentWhenRecorded, [2])
        self.assertEqual(len(socket.sends), 2)  # and no third, empty, send after it

    def test_firstReadSentBeforeTheLogLine(self) -> None:
        """
        A connection's first read, one request, is answered before its log
        line too: a client that connects, asks once and leaves is the
        commonest there is.  (The adversarial review found the first read
        going through the receiver's loop, its line made before the send.)
        """
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])))
        sentWhenLogged = self.sendsWhenLogged(socket)
        protocol.dataReceived(encode_infer(7, "hi", 1))
        self.assertEqual(sentWhenLogged, {7: 1})

    def test_firstReadUnderAuthentication(self) -> None:
        """With --auth-token the first read is a HELLO; the request after it is still sent before it is recorded."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])), auth_token=b"secret")
        protocol.dataReceived(encode_hello(b"secret"))
        self.assertEqual(len(socket.sends), 1)  # the HELLO reply, in the read
        sentWhenLogged = self.sendsWhenLogged(socket)
        protocol.dataReceived(encode_infer(2, "hi", 1))
        self.assertEqual(sentWhenLogged, {2: 2})

    def test_loneRequestWithOptionsSentBeforeTheLogLine(self) -> None:
        """
        A read of one REQ_INFER carrying options (which the one-step decode
        leaves to the receiver's loop) is answered before its log line too.
        (The new-user review found it logged first.)  A read of two still
        makes one send, after both lines.
        """
        backend = ImmediateBackend(plainAnswer([" a"]))
        backend.generationOptions = frozenset({"seed"})
        _, protocol, socket = serve(backend)
        sentWhenLogged = self.sendsWhenLogged(socket)
        protocol.dataReceived(encode_infer(7, "hi", 1))
        protocol.dataReceived(encode_infer(8, "hi", 1, options=GenerationOptions(seed=1)))
        self.assertEqual(sentWhenLogged, {7: 1, 8: 2})
        protocol.dataReceived(encode_infer(9, "hi", 1, options=GenerationOptions(seed=2)) + encode_infer(10, "hi", 1))
        self.assertEqual(sentWhenLogged, {7: 1, 8: 2, 9: 2, 10: 2})
        self.assertEqual(len(socket.sends), 3)
        done = [f.req_id for f in socket.sentFrames() if f.type == MessageType.RESP_DONE]
        self.assertEqual(done, [7, 8, 9, 10])

    def test_pipelinedReadOneSend(self) -> None:
        """Many requests in one read: every answer, in order, in a single send at the read's end."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" x"])))
        protocol.dataReceived(b"".join(encode_infer(reqId, "p", 1) for reqId in range(1, 6)))
        self.assertEqual(len(socket.sends), 1)
        done = [f.req_id for f in socket.sentFrames() if f.type == MessageType.RESP_DONE]
        self.assertEqual(done, [1, 2, 3, 4, 5])

    def test_refusalSentInTheRead(self) -> None:
        """A refused request's RESP_ERR leaves in the read too."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" x"])), max_tokens_limit=4)
        protocol.dataReceived(encode_infer(2, "p", 5))
        self.assertEqual(len(socket.sends), 1)
        [terminal] = terminal_frames(socket.sentFrames(), 2)
        self.assertEqual(terminal.type, MessageType.RESP_ERR)

    def test_nothingWrittenNothingSent(self) -> None:
        """A read that earns no reply makes no send."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" x"])))
        protocol.dataReceived(encode_credit(9, 100))  # no request on 9: dropped
        self.assertEqual(socket.sends, [])

    def test_streamedRequestLeftToTheReactor(self) -> None:
        """A request the backend streams later writes nothing in the read: nothing is sent."""
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 3))
        self.assertEqual(socket.sends, [])
        self.assertEqual(len(backend.streams), 1)

    def test_socketTakesNothing(self) -> None:
        """A client that does not read: the answer stays queued, whole, for the reactor to send."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a", " b"])))
        socket.accept = 0
        protocol.dataReceived(encode_infer(1, "hi", 2))
        queued = socket.queued()
        self.assertGreater(queued, 0)
        self.assertIn(socket, socket.reactor.getWriters())
        socket.accept = None
        socket.doWrite()  # the reactor, once the socket is writable
        self.assertEqual(socket.queued(), 0)
        self.assertEqual(len(b"".join(socket.sends)), queued)
        self.assertEqual([f.type for f in socket.sentFrames()][-1], MessageType.RESP_DONE)

    def test_socketTakesPart(self) -> None:
        """Part sent in the read, the rest by the reactor, in order, nothing lost or repeated."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" one", " two", " three"])))
        socket.accept = 10
        protocol.dataReceived(encode_infer(1, "hi", 3))
        self.assertEqual(len(socket.sends), 1)
        self.assertIn(socket, socket.reactor.getWriters())
        socket.accept = None
        socket.doWrite()
        self.assertEqual([f.payload for f in socket.sentFrames()][:3], [b" one", b" two", b" three"])

    def test_failedSendLeftToTheReactor(self) -> None:
        """A send that fails raises nothing in the read; the socket stays for the reactor to find the error."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])))
        socket.failing = True
        protocol.dataReceived(encode_infer(1, "hi", 1))
        self.assertIn(socket, socket.reactor.getWriters())
        self.assertIs(socket.doWrite(), main.CONNECTION_LOST)  # what the reactor's own doWrite meets

    def test_notWhileTheTransportIsPaused(self) -> None:
        """
        A write that fills the buffer pauses the connection; nothing is sent
        from the read then, so the connection is not resumed from inside its
        own read: the reactor's doWrite does that.
        """
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])))
        socket.bufferSize = 1
        protocol.dataReceived(encode_infer(1, "hi", 1))
        self.assertTrue(protocol.transportPaused)
        self.assertEqual(socket.sends, [])
        socket.doWrite()
        self.assertFalse(protocol.transportPaused)
        self.assertEqual(terminal_frames(socket.sentFrames(), 1)[0].type, MessageType.RESP_DONE)

    def test_notWhileClosing(self) -> None:
        """
        A read that closes the connection (REQ_INFER on req_id 0) sends
        nothing itself: a doWrite then would finish the close where the
        reactor could not hear of it.  The reactor's doWrite sends the error
        and closes.
        """
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])))
        protocol.dataReceived(encode_infer(0, "hi", 1))
        self.assertTrue(socket.disconnecting)
        self.assertEqual(socket.sends, [])
        self.assertIs(socket.doWrite(), main.CONNECTION_DONE)
        self.assertEqual(error_code(socket.sentFrames()[0]).name, "BAD_REQUEST")

    def test_abortedConnectionSendsNothing(self) -> None:
        """A connection aborted in the read (it kept sending while unwritable) sends nothing after."""
        _, protocol, socket = serve(ImmediateBackend(plainAnswer([" a"])))
        protocol._abort("a test")
        protocol.dataReceived(encode_infer(1, "hi", 1))
        self.assertTrue(socket.aborted)
        self.assertEqual(socket.sends, [])


class WriteNowTests(TestCase):
    """``writeNowFor``: a write sent at once when nothing is queued, else queued behind what is."""

    def writeNow(self, socket: SocketDouble) -> Any:
        writeNow = writeNowFor(socket)
        assert writeNow is not None
        return writeNow

    def test_onlyFileDescriptors(self) -> None:
        self.assertIsNone(writeNowFor(StringTransport()))
        self.assertIsNone(writeNowFor(object()))

    def test_sentAtOnceNotRegistered(self) -> None:
        """A write to an idle socket is one send; the reactor is not asked to watch for writability."""
        socket = SocketDouble(MemoryReactorClock())
        writeNow = self.writeNow(socket)
        writeNow(b"one")
        writeNow(b"two")
        self.assertEqual(socket.sends, [b"one", b"two"])
        self.assertEqual(socket.queued(), 0)
        self.assertNotIn(socket, socket.reactor.getWriters())

    def test_partQueuedAndLaterWritesBehindIt(self) -> None:
        """What the socket does not take is queued; later writes wait behind it, so the bytes keep their order."""
        socket = SocketDouble(MemoryReactorClock())
        writeNow = self.writeNow(socket)
        socket.accept = 2
        writeNow(b"abcdef")
        self.assertEqual(socket.sends, [b"ab"])
        self.assertEqual(socket.queued(), 4)
        self.assertIn(socket, socket.reactor.getWriters())
        socket.accept = None
        writeNow(b"gh")
        self.assertEqual(socket.sends, [b"ab"], "sent ahead of the queued bytes")
        socket.doWrite()
        self.assertEqual(b"".join(socket.sends), b"abcdefgh")
        self.assertNotIn(socket, socket.reactor.getWriters())

    def test_socketTakesNothing(self) -> None:
        socket = SocketDouble(MemoryReactorClock())
        socket.accept = 0
        self.writeNow(socket)(b"abc")
        self.assertEqual(socket.queued(), 3)
        self.assertIn(socket, socket.reactor.getWriters())

    def test_failedSendQueuedForTheReactor(self) -> None:
        """A send that fails leaves the bytes queued and the socket watched: the reactor meets the error and closes."""
        socket = SocketDouble(MemoryReactorClock())
        socket.failing = True
        self.writeNow(socket)(b"abc")
        self.assertEqual(socket.queued(), 3)
        self.assertIn(socket, socket.reactor.getWriters())
        self.assertIs(socket.doWrite(), main.CONNECTION_LOST)

    def test_raisingSendLoggedAndQueued(self) -> None:
        socket = RaisingSocket(MemoryReactorClock())
        socket.failing = True
        self.writeNow(socket)(b"abc")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(socket.queued(), 3)

    def test_notWhileClosingPausedHalfClosedOrGone(self) -> None:
        """Closing, half-closed or paused the bytes are queued (the reactor's doWrite must see them); gone, dropped."""
        for state in ("disconnecting", "_writeDisconnecting", "producerPaused", "disconnected"):
            socket = SocketDouble(MemoryReactorClock())
            if state == "disconnected":
                socket.connected = 0
            else:
                setattr(socket, state, True)
            self.writeNow(socket)(b"abc")
            self.assertEqual(socket.sends, [], state)
            self.assertEqual(socket.queued(), 0 if state == "disconnected" else 3, state)


def clockOf(socket: SocketDouble) -> MemoryReactorClock:
    reactor = socket.reactor
    assert isinstance(reactor, MemoryReactorClock)
    return reactor


class ServerWritesOutsideAReadTests(TestCase):
    """
    A stream's writes outside a read (a backend's later tokens) are
    gathered per connection and leave at the end of the reactor's pass, in
    one send per connection.
    """

    def test_laterTokensSentAtPassEnd(self) -> None:
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 3))
        stream = backend.streams[4]
        stream.write(" a")
        stream.write(" b")
        self.assertEqual(socket.sends, [], "sent before the pass ended")
        self.assertEqual(protocol.queuedBytes, 2 * 26)
        clockOf(socket).advance(0)
        self.assertEqual(len(socket.sends), 1)
        stream.finish(generated_tokens=2)
        clockOf(socket).advance(0)
        self.assertEqual(len(socket.sends), 2)
        self.assertEqual(socket.queued(), 0)
        self.assertNotIn(socket, socket.reactor.getWriters())
        frames = socket.sentFrames()
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK] * 2 + [MessageType.RESP_DONE])
        self.assertEqual([f.payload for f in frames[:2]], [b" a", b" b"])

    def test_manyRequestsOneConnectionOneSend(self) -> None:
        """Sixty-four requests' tokens written in one pass leave in one send, not one per token."""
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(b"".join(encode_infer(n, "p", 3) for n in range(1, 65)))
        sendsBefore = len(socket.sends)
        for n in range(1, 65):
            backend.streams[n].write(f" {n}")
        clockOf(socket).advance(0)
        self.assertEqual(len(socket.sends), sendsBefore + 1)
        chunks = [f for f in socket.sentFrames() if f.type == MessageType.RESP_CHUNK]
        self.assertEqual([(f.req_id, f.payload) for f in chunks], [(n, f" {n}".encode()) for n in range(1, 65)])

    def test_manyConnectionsOneCall(self) -> None:
        """Every connection that wrote in a pass is sent by one delayed call at its end."""
        reactor = MemoryReactorClock()
        backend = ImmediateBackend(None)
        factory = CC50ServerFactory(backend, ServerConfig(), reactor)  # type: ignore[arg-type]
        sockets: list[SocketDouble] = []
        for n in range(1, 4):
            socket = SocketDouble(reactor)
            protocol = factory.buildProtocol(socket.getPeer())
            assert isinstance(protocol, CC50ServerProtocol)
            protocol.makeConnection(socket)
            protocol.dataReceived(encode_infer(n, "p", 3))
            sockets.append(socket)
        callsBefore = len(reactor.getDelayedCalls())
        for n in range(1, 4):
            backend.streams[n].write(" t")
        self.assertEqual(len(reactor.getDelayedCalls()), callsBefore + 1)
        reactor.advance(0)
        self.assertEqual([len(socket.sends) for socket in sockets], [1, 1, 1])

    def test_writtenBeforeAReadGoesFirst(self) -> None:
        """
        Tokens gathered outside a read, then a read whose replies are written
        before the pass ends: the gathered ones are on the wire first, and
        the read's end sends both.
        """
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 5, credit_bytes=2))
        stream = backend.streams[4]
        stream.write(" a")  # within the window: gathered
        stream.write(" held")  # beyond it: held by the stream for credit
        protocol.dataReceived(encode_credit(4, 100))  # releases " held" inside the read
        self.assertEqual(b"".join(f.payload for f in socket.sentFrames()), b" a held")
        clockOf(socket).advance(0)
        self.assertEqual(b"".join(f.payload for f in socket.sentFrames()), b" a held")

    def test_closeSendsWhatWasGatheredFirst(self) -> None:
        """A graceful close queues what was gathered ahead of the FIN."""
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 5))
        backend.streams[4].write(" last")
        protocol.close()
        self.assertEqual(socket.queued(), 24 + 5)
        clockOf(socket).advance(0)
        socket.doWrite()
        self.assertEqual([f.payload for f in socket.sentFrames() if f.type == MessageType.RESP_CHUNK], [b" last"])

    def test_pastTheBufferSizeToTheTransportAtOnce(self) -> None:
        """
        Past 64 KiB gathered in a pass, the bytes go to the transport at
        once, so that a socket that takes nothing pauses the connection (and
        stops the fair round in ``resumeProducing``) as a plain write would.
        """
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 100, credit_bytes=1 << 20))
        socket.accept = 0
        stream = backend.streams[4]
        stream.write(" " + "x" * 30_000)
        stream.write(" " + "y" * 30_000)
        self.assertEqual(socket.queued(), 0)
        self.assertFalse(protocol.transportPaused)
        stream.write(" " + "z" * 30_000)
        self.assertEqual(socket.queued(), 3 * (24 + 30_001))
        self.assertTrue(protocol.transportPaused)
        stream.write(" w")
        clockOf(socket).advance(0)
        socket.accept = None
        socket.doWrite()
        payloads = [f.payload[:2] for f in socket.sentFrames()]
        self.assertEqual(payloads, [b" x", b" y", b" z", b" w"])

    def test_abortDropsWhatWasGathered(self) -> None:
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 5))
        backend.streams[4].write(" gone")
        protocol._abort("a test")
        clockOf(socket).advance(0)
        self.assertEqual(socket.sends, [])
        self.assertEqual(protocol.queuedBytes, 0)

    def test_inAReadQueuedUntilItEnds(self) -> None:
        """Writes a read causes (here: credit that lets held text go) still leave in one send at the read's end."""
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 3, credit_bytes=1))
        stream = backend.streams[4]
        stream.write(" abc")
        clockOf(socket).advance(0)
        sendsBefore = len(socket.sends)
        writes: list[int] = []
        original = socket.writeSomeData

        def counted(data: bytes) -> Any:
            writes.append(len(data))
            return original(data)

        socket.writeSomeData = counted  # type: ignore[method-assign]
        protocol.dataReceived(encode_credit(4, 10) + encode_credit(4, 10))
        self.assertEqual(len(writes), 1)
        self.assertEqual(len(socket.sends), sendsBefore + 1)
        self.assertEqual(b"".join(f.payload for f in socket.sentFrames()), b" abc")

    def test_pausedTransportQueuesThenResumes(self) -> None:
        """While the transport has paused the connection, writes queue; its own doWrite sends them in order."""
        backend = ImmediateBackend(None)
        _, protocol, socket = serve(backend)
        protocol.dataReceived(encode_infer(4, "p", 1000))
        stream = backend.streams[4]
        socket.accept = 0
        socket.bufferSize = 8
        stream.write(" " + "x" * 40)
        clockOf(socket).advance(0)  # queued whole, past bufferSize: the transport pauses its producer
        self.assertTrue(socket.producerPaused)
        socket.accept = None
        stream.write(" y")
        clockOf(socket).advance(0)
        self.assertEqual(socket.sends, [b""], "sent while paused")
        socket.doWrite()
        self.assertEqual(b"".join(f.payload for f in socket.sentFrames()), b" " + b"x" * 40 + b" y")


class SendAtPassEndTests(TestCase):
    def test_oneCallPerPassAndEachSendOnce(self) -> None:
        reactor = MemoryReactorClock()
        passEnd = SendAtPassEnd(reactor)
        sent: list[str] = []
        passEnd.add(lambda: sent.append("a"))
        passEnd.add(lambda: sent.append("b"))
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.advance(0)
        self.assertEqual(sent, ["a", "b"])
        reactor.advance(0)
        self.assertEqual(sent, ["a", "b"])
        passEnd.add(lambda: sent.append("c"))
        reactor.advance(0)
        self.assertEqual(sent, ["a", "b", "c"])

    def test_aFailingSendDoesNotKeepTheOthersBack(self) -> None:
        reactor = MemoryReactorClock()
        passEnd = SendAtPassEnd(reactor)
        sent: list[str] = []

        def fails() -> None:
            raise RuntimeError("a broken connection")

        passEnd.add(fails)
        passEnd.add(lambda: sent.append("b"))
        reactor.advance(0)
        self.assertEqual(sent, ["b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _Collect(Protocol):
    """A client that keeps what it reads until a RESP_DONE arrives."""

    def __init__(self) -> None:
        self.data = b""
        self.answered: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        frames = FrameDecoder(1 << 30).feed(self.data)
        if not self.answered.called and any(isinstance(f, Frame) and f.type == MessageType.RESP_DONE for f in frames):
            self.answered.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class RealSocketTests(TestCase):
    """On the test's real reactor, over loopback, with the toy answering at once."""

    async def clientOf(self, factory: CC50ServerFactory) -> _Collect:
        """A client connected over loopback to ``factory``, listening on the test's reactor."""
        from twisted.internet import reactor

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = _Collect()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        return client

    async def test_answerLeftTheServerInTheRead(self) -> None:
        from twisted.internet import reactor

        backend = buildToy({"toy-iters": 0, "toy-device": "cpu"}, reactor)
        factory = CC50ServerFactory(backend, ServerConfig(log_requests=False))
        queuedAfterRead: list[int] = []
        serverLost: Deferred[None] = Deferred()

        class Watched(CC50ServerProtocol):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                transport: Any = self.transport  # a tcp.Server: what it still holds to send
                queuedAfterRead.append(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)

            def connectionLost(self, reason: Any = None) -> None:
                super().connectionLost(reason)
                serverLost.callback(None)

        factory.protocol = Watched  # type: ignore[assignment]
        client = await self.clientOf(factory)
        assert client.transport is not None
        client.transport.write(encode_infer(1, "hi", 2))
        await client.answered
        client.transport.loseConnection()
        await client.lost
        await serverLost
        self.assertEqual(queuedAfterRead, [0])
        self.assertEqual(factory.counters.answeredAtOnce, 1)
        done = [f for f in FrameDecoder(1 << 30).feed(client.data) if isinstance(f, Frame)]
        self.assertEqual([f.type for f in done], [MessageType.RESP_CHUNK] * 2 + [MessageType.RESP_DONE])

    async def test_laterTokensLeftTheServerAsWritten(self) -> None:
        """Written outside a read, on a real socket, a token leaves at the pass's end, never queued for the reactor."""
        from twisted.internet import reactor

        backend = ImmediateBackend(None)
        factory = CC50ServerFactory(backend, ServerConfig(log_requests=False))
        servers: list[CC50ServerProtocol] = []

        class Kept(CC50ServerProtocol):
            def connectionMade(self) -> None:
                super().connectionMade()
                servers.append(self)

        factory.protocol = Kept  # type: ignore[assignment]
        client = await self.clientOf(factory)
        assert client.transport is not None
        client.transport.write(encode_infer(1, "hi", 5))
        while 1 not in backend.streams:
            await deferLater(reactor, 0.001, lambda: None)
        transport: Any = servers[0].transport  # a tcp.Server
        watched: list[int] = []
        startWriting = transport.startWriting

        def counted() -> None:
            watched.append(1)
            startWriting()

        transport.startWriting = counted  # registering for writability: what sending at once avoids
        queued = []
        for text in (" a", " b"):
            backend.streams[1].write(text)
            await deferLater(reactor, 0, lambda: None)  # the pass ends
            queued.append(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)
        backend.streams[1].finish(generated_tokens=2)
        await client.answered
        self.assertEqual(queued, [0, 0])
        self.assertEqual(watched, [])
        frames = [f for f in FrameDecoder(1 << 30).feed(client.data) if isinstance(f, Frame)]
        self.assertEqual([f.payload for f in frames[:2]], [b" a", b" b"])
        client.transport.loseConnection()
        await client.lost


class RaisingSocket(SocketDouble):
    """A FileDescriptor whose send raises, as no Twisted socket does, but a subclass might."""

    def writeSomeData(self, data: bytes) -> Any:
        if self.failing:
            raise RuntimeError("a socket that raises")
        return super().writeSomeData(data)


class RaisingSendTests(TestCase):
    def test_raisingSendIsNotTheAnswersFailure(self) -> None:
        """A send that raises is logged; the answer written stays queued for the reactor and counts as done."""
        reactor = MemoryReactorClock()
        factory = CC50ServerFactory(ImmediateBackend(plainAnswer([" a"])), ServerConfig(), reactor)
        socket = RaisingSocket(reactor)
        protocol = factory.buildProtocol(socket.getPeer())
        assert isinstance(protocol, CC50ServerProtocol)
        protocol.makeConnection(socket)
        socket.failing = True
        protocol.dataReceived(encode_infer(1, "hi", 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertGreater(socket.queued(), 0)
        socket.failing = False
        socket.doWrite()
        self.assertEqual(terminal_frames(socket.sentFrames(), 1)[0].type, MessageType.RESP_DONE)
        self.assertEqual(factory.metrics.registry.get_sample_value("cc50_requests_total", {"outcome": "done"}), 1)
