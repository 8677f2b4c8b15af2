"""
Test doubles for the server's collaborators.

``ManualBackend`` lets a test drive a backend stream by hand (write text,
finish, fail) and observe what the server asked of it (pause, resume,
cancel), which is what the flow-control tests are about; ``ImmediateBackend``
is one that also answers at once (``IImmediateBackend``).  ``RecordingSink``
is the other side: a token sink to drive a backend with, no server needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from cc50tw.codec import (
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    decode_done,
    decode_error,
)
from cc50tw.interfaces import (
    GenerationResult,
    IBackend,
    IImmediateBackend,
    ImmediateAnswer,
    InferenceRequest,
    ITokenSink,
)
from cc50tw.server import CC50ServerFactory, CC50ServerProtocol, ServerConfig


@implementer(ITokenSink)
class RecordingSink:
    """
    An ``ITokenSink`` for testing a backend without a server: it keeps what
    the backend writes and holds its producer, and it can behave as a
    connection does, pausing the producer after every ``pauseEvery`` tokens
    (a client out of credit) and running hooks on each write and on
    registration (a connection already blocked pauses its producer there).
    """

    def __init__(self, pauseEvery: int = 0) -> None:
        self.chunks: list[str] = []
        self.producer: IPushProducer | None = None
        self.registered = 0
        self.unregistered = 0
        self.pauseEvery = pauseEvery
        #: Whether this sink paused its producer (``pauseEvery``) and has not resumed it since.
        self.paused = False
        self.onWrite: Callable[[RecordingSink], object] | None = None
        self.onRegister: Callable[[IPushProducer], object] | None = None

    def write(self, text: str) -> None:
        self.chunks.append(text)
        if self.onWrite is not None:
            self.onWrite(self)
        if self.pauseEvery and len(self.chunks) % self.pauseEvery == 0 and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()

    def writeSequence(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.write(text)

    def resume(self) -> None:
        """Give the producer credit again, as a client that reads does."""
        self.paused = False
        if self.producer is not None:
            self.producer.resumeProducing()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer = producer
        self.registered += 1
        if self.onRegister is not None:
            self.onRegister(producer)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered += 1


@implementer(IPushProducer)
class ManualStream:
    def __init__(self, request: InferenceRequest, sink: ITokenSink) -> None:
        self.request = request
        self.sink = sink
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.cancelled = False
        self.done: Deferred[GenerationResult] = Deferred(self._cancel)
        sink.registerProducer(self, True)

    def _cancel(self, _: object) -> None:
        self.cancelled = True

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.cancelled = True

    def write(self, text: str) -> None:
        self.sink.write(text)

    def finish(self, prompt_tokens: int = 1, generated_tokens: int = 1) -> None:
        self.sink.unregisterProducer()
        self.done.callback(GenerationResult(prompt_tokens, generated_tokens))

    def fail(self, error: Exception) -> None:
        self.sink.unregisterProducer()
        self.done.errback(error)


@implementer(IBackend)
class ManualBackend:
    name = "manual"

    def __init__(self) -> None:
        self.streams: dict[int, ManualStream] = {}
        self.raiseOnGenerate: Exception | None = None
        self.healthy = True

    def describe(self) -> str:
        return "manual test backend"

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        if self.raiseOnGenerate is not None:
            raise self.raiseOnGenerate
        stream = ManualStream(request, sink)
        self.streams[request.req_id] = stream
        return stream.done

    def checkHealth(self) -> Deferred[bool]:
        return succeed(self.healthy)

    def startBackend(self) -> Any:
        return None

    def stopBackend(self) -> Any:
        return None


@implementer(IImmediateBackend)
class ImmediateBackend(ManualBackend):
    """
    A ``ManualBackend`` that also answers at once (``IImmediateBackend``):
    ``answerNow`` returns ``answer``, or what ``answer(request, budget)``
    returns when it is callable; None streams through ``generate``.  Each
    question is kept in ``asked``.
    """

    name = "immediate"
    generationOptions: frozenset[str] = frozenset()

    def __init__(self, answer: Any = None) -> None:
        super().__init__()
        self.answer = answer
        self.asked: list[tuple[InferenceRequest, int]] = []

    def answerNow(self, request: InferenceRequest, budget: int) -> ImmediateAnswer | None:
        self.asked.append((request, budget))
        answer = self.answer
        if callable(answer):
            return answer(request, budget)  # type: ignore[no-any-return]
        return answer  # type: ignore[no-any-return]


class BoundedTransport(StringTransport):
    """
    A ``StringTransport`` that does what Twisted's ``FileDescriptor`` does
    where flow control is concerned, which the plain one does not:

    - past ``bufferSize`` unread bytes it pauses its registered streaming
      producer, and resumes it once the peer has read everything;
    - ``loseConnection`` waits for the buffer to drain, and when it drains a
      paused producer that is still registered is resumed *instead of*
      closing (the trap a protocol must avoid by unregistering first);
    - while paused (``pauseProducing``) it delivers nothing it receives; what
      the peer sends is kept and delivered on ``resumeProducing``.

    The peer is driven by ``peerSends`` and ``peerReads``; ``closedCleanly``
    and ``aborted`` tell how the connection ended.
    """

    def __init__(self, bufferSize: int = 65536) -> None:
        super().__init__()
        self.bufferSize = bufferSize
        self.protocol: Any = None
        self.readingPaused = False
        self.producerPaused = False
        self.closedCleanly = False
        self.aborted = False
        self._inbound: list[bytes] = []

    def attach(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    @property
    def lost(self) -> bool:
        return self.closedCleanly or self.aborted

    # The server's side ------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.lost:
            return
        super().write(data)
        self._maybePauseProducer()

    def writeSequence(self, data: Any) -> None:
        if self.lost:
            return
        super().writeSequence(data)
        self._maybePauseProducer()

    def _maybePauseProducer(self) -> None:
        if self.producer is not None and self.streaming and not self.producerPaused and len(self.io.getvalue()) > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self.producerPaused = False

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        if self.disconnecting:
            self._drained()

    def loseConnection(self) -> None:
        if self.lost or self.disconnecting:
            return
        super().loseConnection()
        self.readingPaused = True
        self._drained()

    def abortConnection(self) -> None:
        if self.lost:
            return
        self.aborted = True
        self._lose()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        self.readingPaused = True

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.disconnecting or self.lost:
            return
        self.readingPaused = False
        while self._inbound and not self.readingPaused and not self.lost:
            self.protocol.dataReceived(self._inbound.pop(0))

    # The peer's side --------------------------------------------------------

    def peerSends(self, data: bytes) -> None:
        """Bytes from the peer: delivered now, or kept while reading is paused."""
        if self.lost or self.disconnecting:
            return
        if self.readingPaused or self._inbound:
            self._inbound.append(data)
        else:
            self.protocol.dataReceived(data)

    @property
    def inboundBytes(self) -> int:
        return sum(map(len, self._inbound))

    def peerReads(self, size: int | None = None) -> bytes:
        """The peer reads ``size`` bytes (default: all) of what the server wrote."""
        buffered = self.io.getvalue()
        taken, rest = (buffered, b"") if size is None else (buffered[:size], buffered[size:])
        self.io.seek(0)
        self.io.truncate()
        self.io.write(rest)
        if not rest:
            self._drained()
        return taken

    def _drained(self) -> None:
        if self.lost or self.io.getvalue():
            return
        if self.producer is not None and (not self.streaming or self.producerPaused):
            self.producerPaused = False
            self.producer.resumeProducing()
        elif self.disconnecting:
            self.closedCleanly = True
            self._lose()

    def _lose(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(Failure(ConnectionDone()))


class ServedConnection:
    """
    A server protocol on a ``BoundedTransport`` (flow control and closing as
    Twisted's transports do them), with every frame the peer read kept in order.
    """

    def __init__(self, factory: CC50ServerFactory, bufferSize: int = 65536) -> None:
        self.factory = factory
        self.transport = BoundedTransport(bufferSize)
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, CC50ServerProtocol)
        self.protocol: CC50ServerProtocol = protocol
        self.transport.attach(protocol)
        self._decoder: FrameDecoder = FrameDecoder(1 << 30)
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        """The peer sends ``data``."""
        self.transport.peerSends(data)

    def read(self, size: int | None = None) -> list[Frame]:
        """The peer reads ``size`` bytes (default: all): the frames they complete."""
        new = [f for f in self._decoder.feed(self.transport.peerReads(size)) if isinstance(f, Frame)]
        self.frames.extend(new)
        return new

    def terminals(self, reqId: int) -> list[Frame]:
        return [
            f for f in self.frames if f.req_id == reqId and f.type in (MessageType.RESP_DONE, MessageType.RESP_ERR)
        ]


class Connection:
    """A server protocol on a StringTransport, with the frames it sent decoded."""

    def __init__(self, factory: CC50ServerFactory) -> None:
        self.factory = factory
        self.transport = StringTransport()
        protocol = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(protocol, CC50ServerProtocol)
        self.protocol: CC50ServerProtocol = protocol
        self.protocol.makeConnection(self.transport)
        self._decoder: FrameDecoder = FrameDecoder(1 << 30)
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> list[Frame]:
        """Frames written since the last call (also appended to ``frames``)."""
        data = self.transport.value()
        self.transport.clear()
        new = [item for item in self._decoder.feed(data) if isinstance(item, Frame)]
        self.frames.extend(new)
        return new


def make_factory(backend: IBackend, **config: Any) -> tuple[CC50ServerFactory, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    return CC50ServerFactory(backend, ServerConfig(**config), reactor), reactor


def chunks_text(frames: list[Frame], req_id: int) -> str:
    return "".join(
        f.payload.decode("utf-8") for f in frames if f.type == MessageType.RESP_CHUNK and f.req_id == req_id
    )


def terminal_frames(frames: list[Frame], req_id: int) -> list[Frame]:
    return [f for f in frames if f.req_id == req_id and f.type in (MessageType.RESP_DONE, MessageType.RESP_ERR)]


def error_code(frame: Frame) -> ErrorCode:
    assert frame.type == MessageType.RESP_ERR, f"expected RESP_ERR, got type {frame.type}"
    return ErrorCode(decode_error(frame).code)


__all__ = [
    "BoundedTransport",
    "ImmediateBackend",
    "ServedConnection",
    "Connection",
    "ManualBackend",
    "ManualStream",
    "chunks_text",
    "decode_done",
    "error_code",
    "make_factory",
    "terminal_frames",
]
