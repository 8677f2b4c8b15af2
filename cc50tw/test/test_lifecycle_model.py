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

The backend also answers at once (``IImmediateBackend``): per request the
model plans what ``answerNow`` gives if the server asks (nothing, so the
request streams; a whole answer within the credit window; one over it; one
with an odd result; one with text that is not text; or an exception), and
predicts from the protocol what the client must see for it.  Every byte the
server writes is read as it is written, so each chunk is checked against the
credit the client had granted by then, and each terminal frame against what
the client and the backend did to its request.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
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
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    decode_done,
    encode_cancel,
    encode_credit,
    encode_frame,
    encode_hello,
    encode_infer,
)
from cc50tw.errors import RequestFailed
from cc50tw.interfaces import GenerationResult, IImmediateBackend, ImmediateAnswer, InferenceRequest, ITokenSink
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
#: docs/protocol.md: a REQ_INFER's ``credit_bytes`` of 0 means this window.
DEFAULT_WINDOW = 262144
#: What ``answerNow`` does when asked, per request; streaming is weighted so
#: that the backend rules keep their share of the steps.
ANSWER_KINDS = ["stream"] * 4 + ["plain", "over", "odd-pair", "odd-float", "unusable", "raise"]
#: Answers that end the request the moment they are given: the plain one in
#: RESP_DONE, the broken ones in RESP_ERR BACKEND_ERROR.
ENDED_AT_ONCE = {"plain", "unusable", "raise"}
#: Answers the client receives in full, then RESP_DONE (after credit for them).
DELIVERED = {"plain", "over", "odd-pair", "odd-float"}


class AnswerNowFailed(Exception):
    """What a backend's ``answerNow`` raises in the model."""


def prefixWithin(data: bytes, window: int) -> bytes:
    """The longest prefix of UTF-8 ``data`` of at most ``window`` bytes that ends on a character boundary."""
    cut = min(window, len(data))
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return data[:cut]


@dataclass(frozen=True)
class PlannedAnswer:
    """What ``answerNow`` gives for one request if asked, and what the client must then see."""

    kind: str
    #: What answerNow returns (None: stream through generate()).
    value: Any = None
    #: The answer's text as the client must receive it: its str parts, UTF-8.
    text: bytes = b""
    #: (prompt_tokens, generated_tokens) that RESP_DONE must report.
    counts: tuple[int, int] = (0, 0)


@implementer(IPushProducer)
class ModelStream:
    """A backend stream the model drives; an eager one writes from inside resumeProducing."""

    def __init__(self, request: InferenceRequest, sink: ITokenSink, eager: bool) -> None:
        self.request = request
        self.sink = sink
        self.eager = eager
        self.paused = False
        self.stopped = False
        #: Every byte of text this backend gave the server, and how it ended.
        self.written = bytearray()
        self.result: GenerationResult | None = None
        self.failure: RequestFailed | None = None
        self.done: Deferred[GenerationResult] = Deferred(lambda _: self.stop())
        sink.registerProducer(self, True)

    def stop(self) -> None:
        self.stopped = True

    def write(self, text: str) -> None:
        self.written += text.encode()
        self.sink.write(text)

    def finish(self, result: GenerationResult) -> None:
        self.sink.unregisterProducer()
        self.result = result
        self.done.callback(result)

    def fail(self, error: RequestFailed) -> None:
        self.sink.unregisterProducer()
        self.failure = error
        self.done.errback(error)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.eager and not self.stopped:
            self.write(" token" * 8)

    def stopProducing(self) -> None:
        self.stopped = True


def _noAnswer(request: InferenceRequest, budget: int) -> Any:
    return None


@implementer(IImmediateBackend)
class ModelBackend:
    name = "model"

    def __init__(self) -> None:
        self.streams: list[ModelStream] = []
        self.eagerNext = False
        #: The model's answerNow and its watch on generate (set by the state machine).
        self.onAnswerNow: Any = _noAnswer
        self.onGenerate: Any = lambda stream: None

    def describe(self) -> str:
        return "model backend"

    def answerNow(self, request: InferenceRequest, budget: int) -> ImmediateAnswer | None:
        return self.onAnswerNow(request, budget)  # type: ignore[no-any-return]

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        stream = ModelStream(request, sink, self.eagerNext)
        self.streams.append(stream)
        self.onGenerate(stream)
        return stream.done

    def live(self) -> list[ModelStream]:
        return [s for s in self.streams if not s.stopped and not s.done.called]

    def checkHealth(self) -> Any:
        return None

    def startBackend(self) -> None:
        return None

    def stopBackend(self) -> None:
        return None


class TappedTransport(BoundedTransport):
    """A ``BoundedTransport`` that shows every byte the server writes, in order, as it is written."""

    def __init__(self, bufferSize: int, onWrite: Any) -> None:
        super().__init__(bufferSize)
        self.onWrite = onWrite

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.onWrite(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        if not self.lost:
            self.onWrite(b"".join(data))
        super().writeSequence(data)


@dataclass
class ModelRequest:
    """One REQ_INFER as its client knows it, and what the protocol lets the server answer it."""

    reqId: int
    #: The initial credit window (``credit_bytes``, 0 read as the default).
    window: int
    #: The reactor's time when it was sent.
    sentAt: float
    #: What answerNow gives if asked; None for a request refused outright (an oversized REQ_INFER).
    answer: PlannedAnswer | None
    #: Credit the client granted on the req_id since.
    granted: int = 0
    #: Whether the server asked answerNow for it.
    asked: bool = False
    stream: ModelStream | None = None
    #: Chunk bytes the server wrote for it, and its terminal frame.
    chunks: bytearray = field(default_factory=bytearray)
    terminal: Frame | None = None
    #: Codes its terminal frame may carry because of frames the client sent on its req_id after it.
    errors: set[int] = field(default_factory=set)

    @property
    def answeredAtOnce(self) -> bool:
        """The server took the answer answerNow gave (no generate())."""
        return self.asked and self.answer is not None and self.answer.kind != "stream"

    def expectedText(self) -> bytes | None:
        """The whole text the client must receive before RESP_DONE (None: no RESP_DONE is possible)."""
        if self.answer is None:
            return None
        if self.answeredAtOnce:
            return self.answer.text if self.answer.kind in DELIVERED else None
        if self.stream is not None and self.stream.result is not None:
            return bytes(self.stream.written)
        return None

    def textSoFar(self) -> bytes | None:
        """What the chunks must be a prefix of (None: nothing to say)."""
        if self.answeredAtOnce:
            return self.answer.text if self.answer is not None else None
        if self.stream is not None:
            return bytes(self.stream.written)
        return None

    def expectedCounts(self) -> tuple[int, int] | None:
        if self.answeredAtOnce and self.answer is not None:
            return self.answer.counts
        if self.stream is not None and self.stream.result is not None:
            return (self.stream.result.prompt_tokens, self.stream.result.generated_tokens)
        return None

    def allowedErrors(self, now: float, stallTimeout: float) -> set[int]:
        """The RESP_ERR codes docs/protocol.md allows as this request's terminal frame now."""
        if self.answer is None:
            return {ErrorCode.TOO_LARGE}  # refused outright (rule 2); nothing else can reach it
        if self.answeredAtOnce:
            kind = self.answer.kind
            if kind == "plain":
                return set()  # answered in full, at once: RESP_DONE before anything else is read
            if kind in ("unusable", "raise"):
                return {ErrorCode.BACKEND_ERROR}  # ended at once, before anything else is read
        codes = set(self.errors)
        if not self.asked:
            # Asked means accepted and running; otherwise it may have been refused.
            codes |= {ErrorCode.TOO_MANY_REQUESTS, ErrorCode.OVERLOADED}
        if self.stream is not None and self.stream.failure is not None:
            codes.add(self.stream.failure.code)
        if now - self.sentAt >= stallTimeout - 1e-6:
            codes.add(ErrorCode.CREDIT_STALL)  # blocked by its client for the stall timeout, at most since sent
        return codes


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
            self.backend.onAnswerNow = self.answerNow
            self.backend.onGenerate = self.generated
            config = ServerConfig(
                max_frame_bytes=MAX_FRAME,
                max_inflight_per_connection=4,
                max_concurrency=2,
                max_queue=2,
                idle_timeout=15.0,
                stall_timeout=10.0,
            )
            self.factory = CC50ServerFactory(self.backend, config, self.reactor, clock=lambda: self.monotonic)  # type: ignore[arg-type]
            #: What the server wrote, read as it is written; and what that broke.
            self.wire: FrameDecoder = FrameDecoder(1 << 30)
            self.problems: list[str] = []
            #: req_id -> the latest REQ_INFER sent on it.
            self.requests: dict[int, ModelRequest] = {}
            self.transport = TappedTransport(BUFFER_SIZE, self.written)
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

        def deliveredAtOnce(self) -> bool:
            """Whether the next frame the client sends is read (and handled) before ``send`` returns."""
            transport, protocol = self.transport, self.protocol
            return (
                protocol.state is ConnectionState.OPEN
                and not transport.lost
                and not transport.disconnecting
                and not transport.readingPaused
                and not transport.inboundBytes
                and not protocol.readingPaused
                and not protocol.bufferedBytes
            )

        @initialize()
        def start(self) -> None:
            pass

        @rule(
            credit=st.sampled_from([0, 1, 3, 7, 64, 4096]),
            eager=st.booleans(),
            kind=st.sampled_from(ANSWER_KINDS),
            texts=st.lists(st.sampled_from([*TEXTS, ""]), max_size=2),
            counts=st.tuples(st.integers(0, 5), st.integers(0, 5)),
            smallCredit=st.sampled_from([1, 3, 7]),
            at=st.integers(0, 2),
        )
        def infer(
            self,
            credit: int,
            eager: bool,
            kind: str,
            texts: list[str],
            counts: tuple[int, int],
            smallCredit: int,
            at: int,
        ) -> None:
            if kind == "over" and credit not in (1, 3, 7, 64):
                credit = smallCredit  # an answer of a few tokens can only be over a small window
            window = credit or DEFAULT_WINDOW
            answer = self.planAnswer(kind, window, texts, counts, at)
            reqId = self.nextId
            self.nextId += 1
            self.backend.eagerNext = eager
            self.open[reqId] = 1
            self.everSent.add(reqId)
            request = self.requests[reqId] = ModelRequest(reqId, window, self.reactor.seconds(), answer)
            # The interface's rule: answerNow is asked when the request would start at once.
            admission = self.factory.admission
            handledNow = self.deliveredAtOnce()
            startsNow = (
                handledNow
                and len(self.protocol.streams) < self.factory.config.max_inflight_per_connection
                and admission.running < admission.max_concurrency
                and not admission.queued
                and not self.protocol.transportPaused
            )
            self.send(encode_infer(reqId, "p", max_tokens=5, credit_bytes=credit))
            if not handledNow:
                return
            assert request.asked == startsNow, (request.asked, startsNow)
            if request.asked and kind in DELIVERED:
                # Text within the window goes out at once; RESP_DONE too, if all of it fit.
                assert bytes(request.chunks) == prefixWithin(answer.text, window), (bytes(request.chunks), answer)
                assert (request.terminal is not None) == (len(answer.text) <= window), (request.terminal, answer)

        def planAnswer(
            self, kind: str, window: int, texts: list[str], counts: tuple[int, int], at: int
        ) -> PlannedAnswer:
            texts = list(texts)
            prompt, generated = counts
            if kind == "plain":
                while len("".join(texts).encode()) > window:
                    texts.pop()
            elif kind == "over":
                size = len("".join(texts).encode())
                if size <= window:
                    texts.append("x" * (window + 1 - size))
            text = "".join(texts).encode()
            result: Any = GenerationResult(prompt, generated)
            if kind == "odd-pair":
                result = (prompt, generated)  # a plain (prompt, generated) tuple
            elif kind == "odd-float":
                result = GenerationResult(float(prompt), float(generated))  # type: ignore[arg-type]
            value: Any = None
            if kind == "unusable":
                broken: list[Any] = list(texts)
                broken.insert(min(at, len(broken)), b"bytes")  # not text
                value = ImmediateAnswer(broken, result)
            elif kind not in ("stream", "raise"):
                value = ImmediateAnswer(texts, result)
            return PlannedAnswer(kind, value, text, counts)

        @precondition(lambda self: bool(self.protocol.streams) and not self.transport.readingPaused)
        @rule(data=st.data())
        def duplicate(self, data: st.DataObject) -> None:
            """REQ_INFER again on a req_id that the server has in flight: one terminal frame for both."""
            reqId = data.draw(st.sampled_from(sorted(self.protocol.streams)))
            self.sentOn(reqId, ErrorCode.DUPLICATE_REQ_ID)
            self.send(encode_infer(reqId, "again", max_tokens=5))

        def someId(self, data: st.DataObject, zero: bool = True) -> int:
            """A req_id in use, once used, never used, or (``zero``) 0, which no request has."""
            return data.draw(st.sampled_from(sorted(self.everSent | {self.nextId + 100} | ({0} if zero else set()))))

        def sentOn(self, reqId: int, code: int) -> None:
            """The client sent a frame on ``reqId`` that ends its request in flight with ``code``."""
            request = self.requests.get(reqId)
            if request is not None:
                request.errors.add(code)

        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            reqId = self.someId(data)
            self.sentOn(reqId, ErrorCode.CANCELLED)
            self.send(encode_cancel(reqId))

        @rule(data=st.data(), amount=st.sampled_from([0, 1, 1, 2, 1024, 1 << 20]))
        def grant(self, data: st.DataObject, amount: int) -> None:
            reqId = self.someId(data)
            request = self.requests.get(reqId)
            if request is not None:
                request.granted += amount
            self.send(encode_credit(reqId, amount))

        @rule(
            data=st.data(),
            kind=st.sampled_from(["unknown", "server-only", "bad-credit", "oversized", "oversized-infer"]),
        )
        def junk(self, data: st.DataObject, kind: str) -> None:
            reqId = self.someId(data, zero=kind != "oversized-infer")  # REQ_INFER on 0 closes the connection
            if kind == "unknown":
                self.sentOn(reqId, ErrorCode.UNKNOWN_TYPE)
                self.send(encode_frame(99, reqId, b"?"))
            elif kind == "server-only":
                self.sentOn(reqId, ErrorCode.UNKNOWN_TYPE)
                self.send(encode_frame(MessageType.RESP_DONE, reqId, bytes(16)))
            elif kind == "bad-credit":
                self.sentOn(reqId, ErrorCode.BAD_REQUEST)
                self.send(encode_frame(MessageType.REQ_CREDIT, reqId, b"\x01"))
            else:
                type = MessageType.REQ_INFER if kind == "oversized-infer" else MessageType.REQ_CREDIT
                if type == MessageType.REQ_INFER:
                    if reqId in self.open:
                        return  # a new request on an unanswered id is req_id reuse, not junk: see duplicate
                    self.open[reqId] = 1
                    self.everSent.add(reqId)
                    self.requests[reqId] = ModelRequest(reqId, 0, self.reactor.seconds(), None)
                else:
                    self.sentOn(reqId, ErrorCode.TOO_LARGE)
                self.send(HEADER.pack(MAGIC, VERSION, type, reqId, 0, MAX_FRAME + 40) + bytes(MAX_FRAME + 40))

        @rule(how=st.sampled_from(["bad-magic", "bad-version"]), now=st.integers(0, 3))
        def corrupt(self, how: str, now: int) -> None:
            """
            Framing is lost: one connection-level error, every request abandoned, nothing after it.

            It acts one time in four: every step after it goes to a closed
            connection, so at the other rules' rate it would end most runs
            before their requests and answers got far.
            """
            if now:
                return
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

        def answerNow(self, request: InferenceRequest, budget: int) -> Any:
            """IImmediateBackend.answerNow: what the model planned for this request."""
            planned = self.requests.get(request.req_id)
            if planned is None or planned.answer is None or planned.asked or planned.terminal is not None:
                self.problems.append(f"answerNow asked for request {request.req_id}, which is not waiting to start")
                return None
            planned.asked = True
            # The interface's promises: asked with the client's window as the budget, only
            # while a backend slot is free, nobody queued for one, and the connection writable.
            admission = self.factory.admission
            if budget != planned.window:
                self.problems.append(f"answerNow's budget {budget} is not request {request.req_id}'s window")
            if admission.queued:
                self.problems.append(f"answerNow asked with {admission.queued} requests queued for a slot")
            if len(self.backend.live()) >= admission.max_concurrency:
                self.problems.append("answerNow asked with every backend slot running")
            if self.protocol.transportPaused:
                self.problems.append("answerNow asked while the connection is paused")
            answer = planned.answer
            if answer.kind == "raise":
                raise AnswerNowFailed("cache corrupt")
            return answer.value

        def generated(self, stream: ModelStream) -> None:
            request = self.requests.get(stream.request.req_id)
            if request is None or request.answer is None or request.terminal is not None:
                self.problems.append(f"generate() for request {stream.request.req_id}, which is not in flight")
            elif request.answeredAtOnce:
                self.problems.append(f"generate() for request {request.reqId}, which answerNow answered")
            else:
                request.stream = stream

        @precondition(lambda self: bool(self.backend.live()))
        @rule(data=st.data(), text=st.sampled_from(TEXTS))
        def backendWrites(self, data: st.DataObject, text: str) -> None:
            stream = data.draw(st.sampled_from(self.backend.live()))
            if not stream.paused:  # a well-behaved producer: no new writes while paused
                stream.write(text)

        @precondition(lambda self: bool(self.backend.live()))
        @rule(data=st.data(), how=st.sampled_from(["finish", "fail", "fail-unencodable"]))
        def backendEnds(self, data: st.DataObject, how: str) -> None:
            stream = data.draw(st.sampled_from(self.backend.live()))
            if how == "finish":
                stream.finish(GenerationResult(1, 3))
            elif how == "fail":
                stream.fail(RequestFailed("upstream went away"))
            else:
                stream.fail(RequestFailed("bad \ud800 text" * 300))

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

        def written(self, data: bytes) -> None:
            """
            Every byte the server writes, as it writes it: each request's chunks
            within the credit its client has granted, and its terminal frame
            one the protocol allows after what happened to it.  (Recorded, not
            raised: this runs inside the server, which may catch exceptions.)
            """
            for frame in self.wire.feed(data):
                if not isinstance(frame, Frame) or frame.req_id == 0:
                    continue
                if frame.type not in (MessageType.RESP_CHUNK, MessageType.RESP_DONE, MessageType.RESP_ERR):
                    continue
                request = self.requests.get(frame.req_id)
                if request is None or request.terminal is not None:
                    self.problems.append(f"{frame} for a req_id with no request in flight")
                    continue
                if frame.type == MessageType.RESP_CHUNK:
                    request.chunks += frame.payload
                    if len(request.chunks) > request.window + request.granted:
                        self.problems.append(
                            f"request {request.reqId}: {len(request.chunks)} chunk bytes sent with only "
                            f"{request.window + request.granted} bytes of credit granted"
                        )
                    text = request.textSoFar()
                    if text is not None and not text.startswith(bytes(request.chunks)):
                        self.problems.append(
                            f"request {request.reqId}: {bytes(request.chunks)!r} is not the start of {text!r}"
                        )
                    continue
                request.terminal = frame
                if frame.type == MessageType.RESP_DONE:
                    self.checkDone(request, frame)
                else:
                    allowed = request.allowedErrors(self.reactor.seconds(), self.factory.config.stall_timeout)
                    if frame.flags not in allowed:
                        self.problems.append(
                            f"request {request.reqId} ({request.answer}, asked={request.asked}) ended with code "
                            f"{frame.flags}, not one of {sorted(allowed)}: {frame.payload[:200]!r}"
                        )

        def checkDone(self, request: ModelRequest, frame: Frame) -> None:
            text = request.expectedText()
            if text is None:
                self.problems.append(f"request {request.reqId} ({request.answer}) ended in RESP_DONE, which it cannot")
                return
            if bytes(request.chunks) != text:
                self.problems.append(
                    f"request {request.reqId}: RESP_DONE after {bytes(request.chunks)!r}, not {text!r}"
                )
            stats = decode_done(frame)
            counts = request.expectedCounts()
            reported = (stats.prompt_tokens, stats.generated_tokens)
            if reported != counts or stats.tokens != stats.generated_tokens:
                self.problems.append(f"request {request.reqId}: RESP_DONE reports {stats}, expected counts {counts}")

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
        def nothingWrongWasWritten(self) -> None:
            assert not self.problems, self.problems

        @invariant()
        def slotsHeldEqualRequestsRunning(self) -> None:
            running = sum(1 for stream in self.protocol.streams.values() if stream.holdsSlot)
            assert self.factory.admission.running == running, (self.factory.admission.running, running)
            # A slot is backend work under way: an answer given at once holds none afterwards,
            # whether it went out whole or waits for credit.
            live = len(self.backend.live())
            assert self.factory.admission.running == live, (self.factory.admission.running, live)

        @invariant()
        def answersGivenAtOnceLeaveNothingBehind(self) -> None:
            for request in self.requests.values():
                if not request.asked or request.answer is None:
                    continue
                kind = request.answer.kind
                if kind == "stream":
                    assert request.stream is not None, f"answerNow said stream, but no generate() for {request.reqId}"
                elif kind in ENDED_AT_ONCE or (kind in DELIVERED and len(request.answer.text) <= request.window):
                    assert request.terminal is not None, f"request {request.reqId} ({kind}) was not ended at once"
            for reqId in self.protocol.streams:
                current = self.requests.get(reqId)
                assert current is not None and current.terminal is None, (
                    f"a stream left behind for ended request {reqId}"
                )

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
                    request = self.requests.get(reqId)
                    if request is not None:
                        request.granted += 1 << 20
                    self.transport.peerSends(encode_credit(reqId, 1 << 20))
                for stream in self.backend.live():
                    stream.finish(GenerationResult(1, 1))
                self.monotonic += 1
                self.reactor.advance(1)
                if not self.open and not self.transport.value():
                    break
            self.account(self.transport.peerReads())
            assert not self.problems, self.problems
            if closingUnread:
                # (Already lost: aborted because the peer had not read for --stall-timeout.)
                assert self.transport.closedCleanly, "the server closed, the peer read everything, but no FIN came"
            if not self.transport.lost and not self.closedAfterError:
                assert not self.open, f"requests that never ended: {sorted(self.open)}"
            assert self.factory.admission.running == 0 or not self.transport.lost
            running, live = self.factory.admission.running, len(self.backend.live())
            assert running == live, f"{running} backend slots held at the end, {live} backend calls running"

    OneConnection.TestCase.settings = settings(
        max_examples=150,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    class LifecycleModelTests(SynchronousTestCase):
        def test_oneConnection(self) -> None:
            try:
                OneConnection.TestCase("runTest").runTest()
            except Exception as e:
                # Trial prints neither the notes hypothesis adds (the failing
                # steps) nor what a failing teardown happened during.
                sys.stderr.write("".join(traceback.format_exception(e)))
                raise
            finally:
                # What a broken answerNow logs: its exception, and text that is not text.
                self.flushLoggedErrors(AnswerNowFailed)
                for failure in self.flushLoggedErrors(AttributeError):
                    assert "'bytes' object has no attribute 'encode'" in str(failure.value), failure

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)
