"""
A model-based test of one connection's request lifecycle.

Hypothesis drives a server protocol on a ``BoundedTransport`` with random
interleavings of what a client can do (requests, cancels, credit one byte at
a time or plenty, unknown and server-only types, oversized frames, duplicate
ids, reading a little or everything, or nothing) and what a backend can do
(write, finish, fail with text that cannot be encoded, resume eagerly from
inside ``resumeProducing``), with the clock moving forward and the monotonic
clock stepping back.  After every step it checks the promises of
docs/protocol.md; at the end, a client that reads and grants everything must
see every request it made end.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cc50tw.codec import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_ERROR_TEXT_BYTES,
    VERSION,
    Frame,
    FrameDecoder,
    MessageType,
    encode_cancel,
    encode_credit,
    encode_frame,
    encode_hello,
    encode_infer,
)
from cc50tw.errors import RequestFailed
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink
from cc50tw.server import (
    MAX_UNSOLICITED_REPLY_BYTES,
    CC50ServerFactory,
    CC50ServerProtocol,
    ConnectionState,
    ServerConfig,
)
from cc50tw.test.fakes import BoundedTransport
from cc50tw.test.optional import HYPOTHESIS

BUFFER_SIZE = 512
MAX_FRAME = 256
TEXTS = ["a", "é", "€", "😀", " token", " token" * 8]
#: The most one backend write adds to what the server holds for the client.
LARGEST_WRITE = max(len(text.encode()) for text in TEXTS)


@implementer(IPushProducer)
class ModelStream:
    """A backend stream the model drives; an eager one writes from inside resumeProducing."""

    def __init__(self, request: InferenceRequest, sink: ITokenSink, eager: bool) -> None:
        self.request = request
        self.sink = sink
        self.eager = eager
        self.paused = False
        self.stopped = False
        self.done: Deferred[GenerationResult] = Deferred(lambda _: self.stop())
        sink.registerProducer(self, True)

    def stop(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.eager and not self.stopped:
            self.sink.write(" token" * 8)

    def stopProducing(self) -> None:
        self.stopped = True


class ModelBackend:
    name = "model"

    def __init__(self) -> None:
        self.streams: list[ModelStream] = []
        self.eagerNext = False

    def describe(self) -> str:
        return "model backend"

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        stream = ModelStream(request, sink, self.eagerNext)
        self.streams.append(stream)
        return stream.done

    def live(self) -> list[ModelStream]:
        return [s for s in self.streams if not s.stopped and not s.done.called]

    def checkHealth(self) -> Any:
        return None

    def startBackend(self) -> None:
        return None

    def stopBackend(self) -> None:
        return None


# The model is a hypothesis state machine, so it is defined only where
# hypothesis imports (cc50tw.test.optional says why).
if HYPOTHESIS.available:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

    class OneConnection(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.reactor = MemoryReactorClock()
            self.monotonic = 1000.0
            self.backend = ModelBackend()
            config = ServerConfig(
                max_frame_bytes=MAX_FRAME,
                max_inflight_per_connection=4,
                max_concurrency=2,
                max_queue=2,
                idle_timeout=15.0,
                stall_timeout=10.0,
            )
            self.factory = CC50ServerFactory(self.backend, config, self.reactor, clock=lambda: self.monotonic)  # type: ignore[arg-type]
            self.transport = BoundedTransport(BUFFER_SIZE)
            protocol = self.factory.buildProtocol(None)
            assert isinstance(protocol, CC50ServerProtocol)
            self.protocol: CC50ServerProtocol = protocol
            self.transport.attach(protocol)
            self.decoder: FrameDecoder = FrameDecoder(1 << 30)
            self.nextId: int = 1
            #: req_id -> REQ_INFERs sent on it that have not been answered yet.
            self.open: dict[int, int] = {}
            self.everSent: set[int] = set()
            self.terminals: dict[int, int] = {}
            self.closedAfterError: bool = False

        # The client ---------------------------------------------------------------

        def send(self, data: bytes) -> None:
            self.transport.peerSends(data)

        @initialize()
        def start(self) -> None:
            pass

        @rule(credit=st.sampled_from([0, 1, 3, 7, 64, 4096]), eager=st.booleans())
        def infer(self, credit: int, eager: bool) -> None:
            reqId = self.nextId
            self.nextId += 1
            self.backend.eagerNext = eager
            self.open[reqId] = 1
            self.everSent.add(reqId)
            self.send(encode_infer(reqId, "p", max_tokens=5, credit_bytes=credit))

        @precondition(lambda self: bool(self.protocol.streams) and not self.transport.readingPaused)
        @rule(data=st.data())
        def duplicate(self, data: st.DataObject) -> None:
            """REQ_INFER again on a req_id that the server has in flight: one terminal frame for both."""
            reqId = data.draw(st.sampled_from(sorted(self.protocol.streams)))
            self.send(encode_infer(reqId, "again", max_tokens=5))

        def someId(self, data: st.DataObject) -> int:
            return data.draw(st.sampled_from(sorted(self.everSent | {self.nextId + 100})))

        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            self.send(encode_cancel(self.someId(data)))

        @rule(data=st.data(), amount=st.sampled_from([0, 1, 1, 2, 1024, 1 << 20]))
        def grant(self, data: st.DataObject, amount: int) -> None:
            self.send(encode_credit(self.someId(data), amount))

        @rule(
            data=st.data(),
            kind=st.sampled_from(["unknown", "server-only", "bad-credit", "oversized", "oversized-infer"]),
        )
        def junk(self, data: st.DataObject, kind: str) -> None:
            reqId = self.someId(data)
            if kind == "unknown":
                self.send(encode_frame(99, reqId, b"?"))
            elif kind == "server-only":
                self.send(encode_frame(MessageType.RESP_DONE, reqId, bytes(16)))
            elif kind == "bad-credit":
                self.send(encode_frame(MessageType.REQ_CREDIT, reqId, b"\x01"))
            else:
                type = MessageType.REQ_INFER if kind == "oversized-infer" else MessageType.REQ_CREDIT
                if type == MessageType.REQ_INFER:
                    if reqId in self.open:
                        return  # a new request on an unanswered id is req_id reuse, not junk: see duplicate
                    self.open[reqId] = 1
                    self.everSent.add(reqId)
                self.send(HEADER.pack(MAGIC, VERSION, type, reqId, 0, MAX_FRAME + 40) + bytes(MAX_FRAME + 40))

        @rule(how=st.sampled_from(["bad-magic", "bad-version"]))
        def corrupt(self, how: str) -> None:
            """Framing is lost: one connection-level error, every request abandoned, nothing after it."""
            if how == "bad-magic":
                self.send(b"XXXX" + bytes(HEADER_SIZE - 4))
            else:
                self.send(HEADER.pack(MAGIC, 2, MessageType.REQ_INFER, 0, 0, 0))

        @rule()
        def hello(self) -> None:
            self.send(encode_hello())

        @rule(size=st.one_of(st.none(), st.integers(1, 200)))
        def read(self, size: int | None) -> None:
            self.account(self.transport.peerReads(size))

        # The backend ---------------------------------------------------------------

        @precondition(lambda self: bool(self.backend.live()))
        @rule(data=st.data(), text=st.sampled_from(TEXTS))
        def backendWrites(self, data: st.DataObject, text: str) -> None:
            stream = data.draw(st.sampled_from(self.backend.live()))
            if not stream.paused:  # a well-behaved producer: no new writes while paused
                stream.sink.write(text)

        @precondition(lambda self: bool(self.backend.live()))
        @rule(data=st.data(), how=st.sampled_from(["finish", "fail", "fail-unencodable"]))
        def backendEnds(self, data: st.DataObject, how: str) -> None:
            stream = data.draw(st.sampled_from(self.backend.live()))
            stream.sink.unregisterProducer()
            if how == "finish":
                stream.done.callback(GenerationResult(1, 3))
            elif how == "fail":
                stream.done.errback(RequestFailed("upstream went away"))
            else:
                stream.done.errback(RequestFailed("bad \ud800 text" * 300))

        # Time ----------------------------------------------------------------------

        @rule(seconds=st.sampled_from([0.1, 1.0, 4.0, 11.0]))
        def advance(self, seconds: float) -> None:
            self.monotonic += seconds
            self.reactor.advance(seconds)

        @rule(seconds=st.sampled_from([0.5, 100.0]))
        def monotonicStepsBack(self, seconds: float) -> None:
            """Not a monotonic clock's behaviour, but what a wall clock does: nothing may break."""
            self.monotonic -= seconds

        # The checks ----------------------------------------------------------------

        def account(self, data: bytes) -> None:
            for frame in self.decoder.feed(data):
                assert isinstance(frame, Frame), f"the server sent an oversized frame header: {frame!r}"
                assert not self.closedAfterError, f"a frame after the connection-level error: {frame}"
                if frame.type == MessageType.HELLO:
                    continue
                assert frame.type in (MessageType.RESP_CHUNK, MessageType.RESP_DONE, MessageType.RESP_ERR), frame
                reqId = frame.req_id
                if frame.type == MessageType.RESP_ERR and reqId == 0:
                    self.closedAfterError = True
                    continue
                assert reqId in self.everSent, f"a frame for a req_id never used: {frame}"
                assert self.open.get(reqId), f"a frame for req_id {reqId} after its terminal frame: {frame}"
                if frame.type == MessageType.RESP_CHUNK:
                    assert frame.payload, "an empty RESP_CHUNK"
                    frame.payload.decode("utf-8")  # never a split character
                else:
                    self.terminals[reqId] = self.terminals.get(reqId, 0) + 1
                    del self.open[reqId]

        @invariant()
        def slotsHeldEqualRequestsRunning(self) -> None:
            running = sum(1 for stream in self.protocol.streams.values() if stream.holdsSlot)
            assert self.factory.admission.running == running, (self.factory.admission.running, running)

        @invariant()
        def heldBytesAreBounded(self) -> None:
            perStream = max((stream.pendingBytes for stream in self.protocol.streams.values()), default=0)
            assert perStream <= 2 * LARGEST_WRITE + 8 * len(" token"), perStream
            # Past the buffer's size the connection is paused: what can still be
            # written then is the write under way, one reply, and each request's
            # terminal frame.
            terminal = HEADER_SIZE + MAX_ERROR_TEXT_BYTES
            bound = (
                BUFFER_SIZE
                + 2 * (HEADER_SIZE + LARGEST_WRITE)
                + terminal * (1 + self.factory.config.max_inflight_per_connection)
            )
            assert len(self.transport.value()) <= bound, (len(self.transport.value()), bound)
            assert self.protocol.heldBytes <= MAX_FRAME + MAX_UNSOLICITED_REPLY_BYTES

        @invariant()
        def endedStreamsAreGone(self) -> None:
            for stream in self.protocol.streams.values():
                assert not stream.ended

        def teardown(self) -> None:
            """A client that now reads and grants everything sees every request it made end."""
            closingUnread = self.protocol.state is ConnectionState.CLOSING and not self.transport.lost
            for _ in range(200):
                if self.transport.lost:
                    break
                self.account(self.transport.peerReads())
                for reqId in list(self.open):
                    self.transport.peerSends(encode_credit(reqId, 1 << 20))
                for stream in self.backend.live():
                    stream.sink.unregisterProducer()
                    stream.done.callback(GenerationResult(1, 1))
                self.monotonic += 1
                self.reactor.advance(1)
                if not self.open and not self.transport.value():
                    break
            self.account(self.transport.peerReads())
            if closingUnread:
                # (Already lost: aborted because the peer had not read for --stall-timeout.)
                assert self.transport.closedCleanly, "the server closed, the peer read everything, but no FIN came"
            if not self.transport.lost and not self.closedAfterError:
                assert not self.open, f"requests that never ended: {sorted(self.open)}"
            assert self.factory.admission.running == 0 or not self.transport.lost

    OneConnection.TestCase.settings = settings(
        max_examples=150,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    class LifecycleModelTests(SynchronousTestCase):
        def test_oneConnection(self) -> None:
            OneConnection.TestCase("runTest").runTest()

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)
