"""
The CC50 server: one protocol instance per connection, many requests each.

Requests are multiplexed by req_id.  The protocol is also the transport's
push producer: when the socket's send buffer fills, Twisted pauses it and it
pauses every request's backend; when the buffer drains, they resume.  That
keeps the server's memory per connection bounded whatever the client does.
"""

from __future__ import annotations

import enum
import hmac
import itertools
import json
import time
import typing
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cc50tw import __version__
from cc50tw.accesslog import logRequest
from cc50tw.admission import Admission
from cc50tw.codec import (
    DEFAULT_CREDIT_BYTES,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    Oversized,
    ProtocolError,
    chunk_frame_pieces,
    decode_credit,
    decode_infer,
    encode_error,
    encode_frame,
    new_tuple,
)
from cc50tw.generation import NO_OPTIONS, GenerationOptions
from cc50tw.immediate import AnswerNow, readAnswer, sendAnswer
from cc50tw.interfaces import GenerationResult, IBackend, IImmediateBackend, ImmediateAnswer, InferenceRequest
from cc50tw.metrics import ServerMetrics, requestFigures, routedModel
from cc50tw.receiver import CC50Receiver, setTcpNoDelay
from cc50tw.sendnow import SendAtPassEnd, sendNowFor, writeNowFor
from cc50tw.stream import EndedRequest, FlowCounters, RequestStream, StreamServices

SERVER_NAME = f"cc50tw/{__version__}".encode()


@attrs.frozen
class ServerConfig:
    """Limits and defaults; every field is a ``twistd cc50`` option."""

    default_max_tokens: int = 256
    max_tokens_limit: int = 1 << 24
    max_frame_bytes: int = 1 << 20
    max_inflight_per_connection: int = 256
    max_connections: int = 10000
    max_concurrency: int = 1024
    max_queue: int = 4096
    idle_timeout: float = 300.0
    stall_timeout: float = 60.0
    #: Hard cap on one request's life, in seconds; 0 = no cap.
    max_request_seconds: float = 0.0
    #: Shared secret a client must present in HELLO before anything else; None = no authentication.
    auth_token: bytes | None = None
    #: One log line per finished request (off for benchmarks that measure the server alone).
    log_requests: bool = True


#: Before authentication the only frame worth reading is a HELLO with a token,
#: so an unauthenticated peer cannot make the server buffer a large frame.
MAX_HELLO_BYTES = 4096

#: Bytes of replies that no request's credit governs (per-frame errors, HELLO)
#: the server queues for a connection whose transport is paused before it gives
#: up on the connection, as ``twisted.web._http2`` does for control frames.
#: Reading stops while the transport is paused, so only a transport that keeps
#: delivering data regardless can reach it.
MAX_UNSOLICITED_REPLY_BYTES = 64 * 1024

#: Most bytes a connection gathers outside a read before it hands them to the
#: transport without waiting for the pass's end (``cc50tw.sendnow``): Twisted's
#: socket buffer size, past which the transport pauses the connection.
MAX_GATHERED_BYTES = 64 * 1024

#: Dropped frames logged per connection; the rest are counted (``cc50_frames_dropped_total``).
LOGGED_DROPS_PER_CONNECTION = 5


_REQ_INFER = int(MessageType.REQ_INFER)  # a plain int compares faster than the enum member


class ConnectionState(enum.Enum):
    #: Reading frames and writing replies.
    OPEN = "open"
    #: Closing after a connection-level error, an idle timeout or a drain:
    #: every request is abandoned, nothing more is read or written.
    CLOSING = "closing"
    #: connectionLost has run.
    CLOSED = "closed"


class _ServerTransport(typing.Protocol):
    """What the protocol uses of its transport: TCP, TLS and unix ones all have it."""

    disconnecting: bool

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: object, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def getPeer(self) -> IAddress: ...


@implementer(IPushProducer)
class CC50ServerProtocol(CC50Receiver):
    """
    One client connection: frames in, many multiplexed request streams out.

    It is the transport's push producer.  While the socket's send buffer is
    full it pauses every stream's backend and also stops reading, so a client
    that sends without reading cannot make replies queue without bound.
    """

    log = Logger()
    factory: CC50ServerFactory
    transport: _ServerTransport  # type: ignore[assignment]  # set by makeConnection, before any call

    def __init__(self) -> None:
        self.streams: dict[int, RequestStream] = {}
        self.state = ConnectionState.OPEN
        self.transportPaused = False
        self.rejected = False
        self.authenticated = False
        self.bytesSent = 0
        self.bytesReceived = 0
        self.peer = ""
        self._rotation = itertools.count()
        self._abortTimer: IDelayedCall | None = None
        self._unsolicitedWhilePaused = 0
        self.framesDropped = 0
        self._peerKnown = False
        self._idleTimer: IDelayedCall | None = None
        #: When the idle time now being counted began (the reactor's seconds).
        self._idleFrom = 0.0
        #: The req_id whose backend ``answerNow`` is running (0: none, and
        #: never a request's: every test of it checks the req_id first), so that
        #: frames for it that arrive meanwhile (a backend calling back into the
        #: connection) are treated as for a request in flight: an error or a
        #: cancel ends it, credit adds to its window.
        self._answering = 0
        self._answeringEnd: tuple[ErrorCode, str] | None = None
        self._answeringCredit = 0
        #: Sends the replies a read wrote before the reactor turns (``cc50tw.sendnow``); None: the reactor sends them.
        self._sendNow: Callable[[], None] | None = None
        #: Sends what was gathered outside a read, at the pass's end (``cc50tw.sendnow``); None: the reactor sends it.
        self._writeNow: Callable[[bytes], None] | None = None
        #: What was written outside a read this reactor pass, sent at its end in one ``_writeNow``.
        self._outgoing: list[bytes] = []
        #: Their size (counted afresh when the first is gathered).
        self._outgoingBytes = 0
        #: In ``dataReceived``: what it writes is sent once, when the read ends.
        self._reading = False
        #: ``bytesSent`` when the replies were last sent now: more than that is waiting.
        self._sentNowUpTo = 0
        #: True while a read of one frame is handled: the terminal frame it
        #: earns is sent as soon as it is written, before the request is
        #: recorded (the log line, the metrics), which then costs the client
        #: no time.
        self._terminalLeavesAtOnce = False

    # Connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        config = self.factory.config
        # Behind the haproxy: endpoint the wrapper has not read the PROXY
        # header yet: the peer is HAProxy's side until the first data, when it
        # is taken again (``dataReceived``).
        self.peer = describePeer(self.transport)
        self._peerKnown = False
        self.authenticated = config.auth_token is None
        self.MAX_LENGTH = config.max_frame_bytes if self.authenticated else min(MAX_HELLO_BYTES, config.max_frame_bytes)
        # Made now, not at the first read, so that the first read can take
        # the one-request path (``dataReceived``) as every later one does.
        self._decoder = FrameDecoder(self.MAX_LENGTH)
        setTcpNoDelay(self.transport)
        self._sendNow = sendNowFor(self.transport)
        self._writeNow = writeNowFor(self.transport)
        self.transport.registerProducer(self, True)
        if not self.factory.connectionOpened(self):
            self.rejected = True
            limit = config.max_connections
            self._failConnection(ErrorCode.OVERLOADED, f"server has {limit} connections open (--max-connections); retry later")
            return
        self._startIdleClock()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Mark the connection gone first: ending the streams below must not
        # restart the idle timer (Protocol.connected is never reset).
        self.state = ConnectionState.CLOSED
        self._abandonStreams()
        self._outgoing = []
        self._stopIdleClock()
        if self._abortTimer is not None:
            if self._abortTimer.active():
                self._abortTimer.cancel()
            self._abortTimer = None
        if not self.rejected:
            self.factory.connectionClosed(self)
        self.factory.bytesSent += self.bytesSent
        self.factory.bytesReceived += self.bytesReceived
        self.bytesSent = self.bytesReceived = 0

    def callLater(self, delay: float, call: Callable[..., object], *args: object, **kwargs: object) -> IDelayedCall:
        """The connection's clock: the factory's reactor, so tests can use a fake one."""
        return self.factory.reactor.callLater(delay, call, *args, **kwargs)

    # Idle timeout ----------------------------------------------------------
    #
    # TimeoutMixin would cancel its timer when a request starts and schedule a
    # new one when the last one ends: a DelayedCall made, pushed on the
    # reactor's heap and later swept out, for every request.  Here one timer
    # runs while the connection is open; activity only records when the idle
    # time began, and the timer, when it fires, sleeps again for what is left.

    def _startIdleClock(self) -> None:
        """Count idle time from now (nothing in flight, or bytes from an unauthenticated peer)."""
        self._idleFrom = self.factory.reactor.seconds()
        if self._idleTimer is None:
            self._idleTimer = self.callLater(self.factory.config.idle_timeout, self._idleTimerFired)

    def _stopIdleClock(self) -> None:
        timer, self._idleTimer = self._idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _idleTimerFired(self) -> None:
        self._idleTimer = None
        if self.state is not ConnectionState.OPEN or self.streams:
            return  # busy: the last request to end starts the clock again
        left = self._idleFrom + self.factory.config.idle_timeout - self.factory.reactor.seconds()
        if left > 0:
            self._idleTimer = self.callLater(left, self._idleTimerFired)
        else:
            self.timeoutConnection()

    def timeoutConnection(self) -> None:
        """Nothing was in flight for ``--idle-timeout`` seconds."""
        self.log.info("closing idle connection from {peer}", peer=self.peer)
        self.close()

    def close(self, abortAfter: float | None = None) -> None:
        """
        Close in order: abandon every request, stop producing, then
        ``loseConnection``, so the peer gets what was already written and a
        FIN.  The transport must not still hold us as its producer: it would
        resume us when its buffer drains instead of closing.  A peer that
        reads nothing would keep a graceful close waiting forever, so it is
        cut off ``abortAfter`` seconds later (default: ``--stall-timeout``).
        """
        if self.state is not ConnectionState.OPEN:
            return
        self.state = ConnectionState.CLOSING
        self._stopIdleClock()
        self.discardInput()
        self._abandonStreams()
        self._queueOutgoing()  # what was written goes before the FIN
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        delay = self.factory.config.stall_timeout if abortAfter is None else abortAfter
        if self._abortTimer is None and self.state is ConnectionState.CLOSING:
            self._abortTimer = self.callLater(delay, self._abortUnreadConnection, delay)

    def _abortUnreadConnection(self, waited: float) -> None:
        self._abortTimer = None
        if self.state is ConnectionState.CLOSING:
            self.log.info(
                "aborting connection from {peer}: it read nothing for {timeout:g}s after being closed",
                peer=self.peer,
                timeout=waited,
            )
            self.transport.abortConnection()

    def _abandonStreams(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            try:
                stream.abandon()
            except Exception:  # one request's teardown must not leave the others (or the connection) behind
                self.log.failure("abandoning request {req_id} from {peer} failed", req_id=stream.reqId, peer=self.peer)
        if streams:
            self.factory.checkQuiet()

    def _failConnection(self, code: ErrorCode, message: str) -> None:
        """
        A connection-level error: one RESP_ERR on req_id 0 (so it is never
        mistaken for a request's terminal frame), then an orderly close;
        nothing follows it.
        """
        if self.state is not ConnectionState.OPEN:
            return
        self.log.info("closing connection from {peer}: {message}", peer=self.peer, message=message)
        self.sendFrame(encode_error(0, code, message))
        self.close()

    @property
    def queuedBytes(self) -> int:
        """
        Bytes this connection holds for its client: the transport's send
        buffer plus text held back for lack of credit.  This is the figure the
        flow control exists to bound.
        """
        transport = self.transport
        # FileDescriptor keeps its buffer in ``dataBuffer`` (from ``offset``)
        # and ``_tempDataLen``; other transports may have neither.
        buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
        buffered += getattr(transport, "_tempDataLen", 0) + (self._outgoingBytes if self._outgoing else 0)
        return buffered + sum(stream.pendingBytes for stream in self.streams.values())

    # Receiving -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        self._reading = True
        try:
            self._readReceived(data)
        finally:
            self._reading = False

    def _readReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        if not self._peerKnown:
            self._peerKnown = True
            self.peer = describePeer(self.transport)
        if self.authenticated:
            if not self.streams:
                # Unauthenticated, the idle timeout runs from the connection's
                # start: a peer trickling a byte at a time cannot keep it open.
                self._idleFrom = self.factory.reactor.seconds()
            decoder = self._decoder
            if decoder is not None and not self.readingPaused:
                # One read, one plain REQ_INFER (a client waiting for each
                # answer): decoded in one step and straight to ``_request``,
                # past the receiver's loop and ``_infer``.  Any other read is
                # the receiver's, as below.
                plain = decoder.wholeInfer(data)
                if plain is not None:
                    if not self.transport.disconnecting:  # type: ignore[attr-defined]
                        self._sentNowUpTo = self.bytesSent
                        reqId, maxTokens, creditBytes, prompt = plain
                        if reqId and reqId not in self.streams and reqId != self._answering and not self.factory.draining:
                            self._terminalLeavesAtOnce = self._sendNow is not None
                            try:
                                self._request(reqId, maxTokens, creditBytes, prompt, NO_OPTIONS)
                            finally:
                                self._terminalLeavesAtOnce = False
                        else:  # refused by _infer's first checks, before it reads the payload
                            self._infer(new_tuple(Frame, (_REQ_INFER, reqId, 0, b"")))
                        if self.bytesSent != self._sentNowUpTo and self._sendNow is not None:
                            self._sendNow()
                    return
        self._sentNowUpTo = self.bytesSent
        CC50Receiver.dataReceived(self, data)
        if self.bytesSent != self._sentNowUpTo and self._sendNow is not None:
            # Every reply this read wrote, in one send (``cc50tw.sendnow``).
            self._sendNow()
        if self._heldSize > self.MAX_LENGTH + MAX_UNSOLICITED_REPLY_BYTES:
            self._abort("it kept sending while the server could not write to it")

    def wholeFrameReceived(self, frame: Frame) -> None:
        """
        A read of one frame that the path above does not take (a request
        with options, say): as there, the terminal frame it earns leaves
        before the request is recorded.
        """
        self._terminalLeavesAtOnce = self._sendNow is not None
        try:
            self.frameReceived(frame)
        finally:
            self._terminalLeavesAtOnce = False

    def frameReceived(self, frame: Frame) -> None:
        if self.state is not ConnectionState.OPEN:
            return
        if not self.authenticated and frame.type != MessageType.HELLO:
            self._failConnection(ErrorCode.UNAUTHORIZED, "authentication required: send HELLO with the shared token first")
            return
        handler = self._handlers.get(frame.type)
        if handler is None:
            self.frameRefused(
                frame.req_id, ErrorCode.UNKNOWN_TYPE, f"unknown frame type {frame.type}; this server knows types 1-7"
            )
            return
        handler(self, frame)

    def lengthLimitExceeded(self, header: Oversized) -> None:
        if not self.authenticated:
            self._failConnection(
                ErrorCode.UNAUTHORIZED,
                f"authentication required: a frame of {header.length} bytes before HELLO (at most {self.MAX_LENGTH})",
            )
            return
        if header.type == MessageType.REQ_INFER and header.req_id == 0:
            # Refused on req_id 0 it would read as a connection-level error: make it one.
            self._failConnection(ErrorCode.BAD_REQUEST, "REQ_INFER on req_id 0, which is reserved for connection-level errors")
            return
        self.frameRefused(
            header.req_id,
            ErrorCode.TOO_LARGE,
            f"frame of {header.length} bytes exceeds this server's limit of {self.MAX_LENGTH} (--max-frame-bytes)",
            startsRequest=header.type == MessageType.REQ_INFER,
        )

    def streamCorrupted(self, error: ProtocolError) -> None:
        if not self.authenticated:
            self._failConnection(ErrorCode.UNAUTHORIZED, f"authentication required: {error.message}")
            return
        self._failConnection(error.code, error.message + "; closing the connection")

    def frameRefused(self, reqId: int, code: ErrorCode, message: str, startsRequest: bool = False) -> None:
        """
        A per-frame error, answered so that a terminal frame always answers
        exactly one REQ_INFER and no client reads two for one req_id:

        - on the req_id of a live request it ends that request (one RESP_ERR,
          its backend work cancelled);
        - a REQ_INFER refused outright gets its own RESP_ERR;
        - any other frame on a req_id with nothing in flight has no request
          to answer for: it is dropped, with a log line (the first few per
          connection) and a count on ``/metrics``.
        """
        stream = self.streams.get(reqId)
        if stream is not None:
            stream.fail(code, message)
        elif reqId and reqId == self._answering:
            # Called back from inside answerNow: the request ends with this
            # error once answerNow returns, its answer unsent.
            if self._answeringEnd is None:
                self._answeringEnd = (code, message)
        elif startsRequest:
            self.sendUnsolicited(encode_error(reqId, code, message))
        else:
            self.factory.counters.framesDropped += 1
            self.framesDropped += 1
            if self.framesDropped <= LOGGED_DROPS_PER_CONNECTION:
                self.log.info(
                    "dropped a frame from {peer} on req_id {req_id}, which has no request in flight: {message}"
                    "{more}",
                    peer=self.peer,
                    req_id=reqId,
                    message=message,
                    more=" (further drops on this connection are only counted)"
                    if self.framesDropped == LOGGED_DROPS_PER_CONNECTION
                    else "",
                )

    def _hello(self, frame: Frame) -> None:
        expected = self.factory.config.auth_token
        if expected is not None and not self.authenticated:
            if not hmac.compare_digest(frame.payload, expected):
                self._failConnection(ErrorCode.UNAUTHORIZED, "authentication failed: wrong token")
                return
            self.authenticated = True
            self.setMaxLength(self.factory.config.max_frame_bytes)
        self.sendUnsolicited(encode_frame(MessageType.HELLO, frame.req_id, self.factory.helloReply))

    def _infer(self, frame: Frame) -> None:
        req_id = frame.req_id
        if req_id == 0:
            self._failConnection(ErrorCode.BAD_REQUEST, "REQ_INFER on req_id 0, which is reserved for connection-level errors"
            )
            return
        streams, factory = self.streams, self.factory
        if req_id in streams or req_id == self._answering:
            self.frameRefused(
                req_id,
                ErrorCode.DUPLICATE_REQ_ID,
                f"req_id {req_id} was sent again while in flight on this connection; the request is ended",
            )
            return
        if factory.draining:
            self.frameRefused(req_id, ErrorCode.SHUTTING_DOWN, "server is shutting down; send new requests elsewhere", True)
            return
        try:
            decoded = decode_infer(frame)
        except ProtocolError as error:
            self.frameRefused(req_id, error.code, error.message, True)
            return
        self._request(req_id, *decoded)

    def _request(self, req_id: int, maxTokens: int, creditBytes: int, prompt: str, options: GenerationOptions) -> None:
        """A decoded REQ_INFER on a req_id free for it: refused by the limits, answered at once, or streamed."""
        streams, factory = self.streams, self.factory
        config = factory.config
        if len(streams) >= config.max_inflight_per_connection:
            self.frameRefused(
                req_id,
                ErrorCode.TOO_MANY_REQUESTS,
                f"{len(streams)} requests already in flight on this connection "
                f"(--max-inflight-per-connection={config.max_inflight_per_connection})",
                True,
            )
            return
        if maxTokens > config.max_tokens_limit:
            self.frameRefused(
                req_id,
                ErrorCode.TOO_LARGE,
                f"max_tokens {maxTokens} exceeds this server's limit of {config.max_tokens_limit} "
                "(--max-tokens-limit)",
                True,
            )
            return
        if options is not NO_OPTIONS:
            backend = factory.backend
            unsupported = unsupportedOptions(backend, options)
            if unsupported:
                self.frameRefused(
                    req_id,
                    ErrorCode.BAD_REQUEST,
                    f"option {unsupported[0]!r} is not supported by the {backend.name} backend",
                    True,
                )
                return
            unknown = unknownModel(backend, options)
            if unknown:
                self.frameRefused(req_id, ErrorCode.BAD_REQUEST, unknown, True)
                return
        request: InferenceRequest = new_tuple(
            InferenceRequest, (req_id, prompt, maxTokens or config.default_max_tokens, options)
        )
        credit = creditBytes or DEFAULT_CREDIT_BYTES
        answerNow = factory.answerNow
        if answerNow is not None and not self.transportPaused:
            credit = self._answerAtOnce(answerNow, request, credit)
            if not credit:
                return
        stream = RequestStream(self, factory.services, request, credit, self.peer)
        self.streams[req_id] = stream
        stream.start()

    def _answerAtOnce(self, answerNow: AnswerNow, request: InferenceRequest, credit: int) -> int:
        """
        Offer the request to the backend's ``answerNow`` (``cc50tw.immediate``):
        0 when it has been dealt with, answered in one write or handed to a
        stream holding the slot; else the credit window it is to start with
        as usual (what the client granted meanwhile included).
        """
        services = self.factory.services
        admission = services.admission
        if not admission.tryAcquire():
            return credit  # busy, or others queued ahead: this request queues behind them
        startedAt = services.clock()
        reqId = request.req_id
        # A request sent from inside another's answerNow is asked in turn:
        # the outer one's frames-meanwhile are kept aside, not mixed with its.
        outer = self._answering
        if outer:
            outerCredit, outerEnd = self._answeringCredit, self._answeringEnd
            self._answeringCredit, self._answeringEnd = 0, None
        self._answering = reqId
        answer: object
        try:
            answer = answerNow(request, credit)
        except Exception:
            answer = Failure()
            self.log.failure("answerNow raised for request {req_id}", answer, req_id=reqId)
        finally:
            self._answering = outer
            granted, overtaken = self._answeringCredit, self._answeringEnd
            if outer:
                self._answeringCredit, self._answeringEnd = outerCredit, outerEnd
            elif granted or overtaken is not None:
                self._answeringCredit, self._answeringEnd = 0, None
        if answer is None:
            admission.release()  # the backend would rather stream
        if granted:
            credit = min(credit + granted, 1 << 62)
        if overtaken is not None or self.state is not ConnectionState.OPEN:
            self._answerOvertaken(answer is not None, request, credit, startedAt, overtaken)
            return 0
        if answer is None:
            return credit
        if sendAnswer(self, services, request, self.peer, answer, credit, startedAt):
            return 0
        answer = readAnswer(answer, reqId)
        if type(answer) is ImmediateAnswer and sendAnswer(self, services, request, self.peer, answer, credit, startedAt):
            return 0  # its texts came as something other than a list, now read
        stream = RequestStream(self, services, request, credit, self.peer)
        self.streams[reqId] = stream
        stream.startWith(answer, startedAt)
        return 0

    def _answerOvertaken(
        self,
        holdingSlot: bool,
        request: InferenceRequest,
        credit: int,
        startedAt: float,
        overtaken: tuple[ErrorCode, str] | None,
    ) -> None:
        """
        ``answerNow`` called back into this connection, and the request
        (``overtaken``: the error that ended it) or the connection ended
        meanwhile: the answer has nowhere to go.
        """
        services = self.factory.services
        if holdingSlot:
            services.admission.release()
        stream = RequestStream(self, services, request, credit, self.peer)
        stream.startedAt = startedAt
        if self.state is ConnectionState.OPEN and overtaken is not None:
            stream.endUnstarted(*overtaken)
        else:
            stream.endUnstarted(None)  # the connection is gone: nothing to write

    def _cancel(self, frame: Frame) -> None:
        stream = self.streams.get(frame.req_id)
        if stream is not None:
            stream.fail(ErrorCode.CANCELLED, "request cancelled by the client (REQ_CANCEL)")
        elif frame.req_id and frame.req_id == self._answering and self._answeringEnd is None:
            self._answeringEnd = (ErrorCode.CANCELLED, "request cancelled by the client (REQ_CANCEL)")

    def _credit(self, frame: Frame) -> None:
        stream = self.streams.get(frame.req_id)
        if stream is None:
            if frame.req_id and frame.req_id == self._answering:
                try:
                    self._answeringCredit += decode_credit(frame)
                except ProtocolError as error:
                    self.frameRefused(frame.req_id, error.code, error.message)
            return  # else the request may have ended while the credit was in flight
        try:
            credit = decode_credit(frame)
        except ProtocolError as error:
            stream.fail(error.code, error.message)
            return
        stream.grant(credit)

    def _serverOnly(self, frame: Frame) -> None:
        self.frameRefused(
            frame.req_id,
            ErrorCode.UNKNOWN_TYPE,
            f"frame type {MessageType(frame.type).name} is sent by servers, not to them",
        )

    _handlers: dict[int, Callable[[CC50ServerProtocol, Frame], None]] = {
        MessageType.HELLO: _hello,
        MessageType.REQ_INFER: _infer,
        MessageType.REQ_CANCEL: _cancel,
        MessageType.REQ_CREDIT: _credit,
        MessageType.RESP_CHUNK: _serverOnly,
        MessageType.RESP_DONE: _serverOnly,
        MessageType.RESP_ERR: _serverOnly,
    }

    # Sending ---------------------------------------------------------------

    def sendChunk(self, reqId: int, data: bytes) -> None:
        self.bytesSent += HEADER_SIZE + len(data)
        # One joined write: for token-sized chunks the copy costs less than
        # the transport's handling of a second object.
        self._write(HEADER.pack(MAGIC, VERSION, MessageType.RESP_CHUNK, reqId, 0, len(data)) + data)

    def sendChunks(self, reqId: int, datas: list[bytes]) -> None:
        """Several chunk frames for one request in a single write: one frame each, never merged."""
        if len(datas) == 1:
            self.sendChunk(reqId, datas[0])
            return
        data = b"".join(chunk_frame_pieces(reqId, datas))
        self.bytesSent += len(data)
        # One joined write: the transport checks and queues one object rather
        # than two per frame (measured: about 0.4 µs less per frame).
        self._write(data)

    def sendTerminal(self, reqId: int, frame: bytes) -> None:
        if self.state is ConnectionState.OPEN:
            self.bytesSent += len(frame)
            self._write(frame)
            if self._terminalLeavesAtOnce:
                self._terminalLeavesAtOnce = False
                self._sentNowUpTo = self.bytesSent
                self._sendNow()  # type: ignore[misc]  # set only where there is one

    def sendUnsolicited(self, frame: bytes) -> None:
        """A reply no request's credit governs; capped while the transport is paused."""
        if self.state is not ConnectionState.OPEN:
            return
        if self.transportPaused:
            self._unsolicitedWhilePaused += len(frame)
            if self._unsolicitedWhilePaused > MAX_UNSOLICITED_REPLY_BYTES:
                self._abort(f"over {MAX_UNSOLICITED_REPLY_BYTES} bytes of replies queued that it does not read")
                return
        self.sendFrame(frame)

    def sendFrame(self, frame: bytes) -> None:
        self.bytesSent += len(frame)
        self._write(frame)

    def _write(self, data: bytes) -> None:
        """
        Queued in a read (the read's end sends all it wrote at once);
        outside one, gathered and sent at the end of the reactor's pass,
        where the transport allows (``cc50tw.sendnow``).
        """
        if self._writeNow is None:
            self.transport.write(data)
        elif self._reading:
            if self._outgoing:  # written before this read: it goes first
                self._queueOutgoing()
            self.transport.write(data)
        else:
            outgoing = self._outgoing
            if not outgoing:
                self._outgoingBytes = 0
                self.factory.sendAtPassEnd.add(self._sendOutgoing)
            outgoing.append(data)
            self._outgoingBytes += len(data)
            if self._outgoingBytes > MAX_GATHERED_BYTES:
                # Into the transport now: past its buffer size it pauses this
                # connection, which stops the fair round in ``resumeProducing``
                # as a plain write would.
                self._queueOutgoing()

    def _sendOutgoing(self) -> None:
        outgoing = self._outgoing
        if outgoing and self._writeNow is not None:
            self._outgoing = []
            self._writeNow(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def _queueOutgoing(self) -> None:
        """What was gathered outside a read, into the transport's queue, ahead of whatever follows."""
        outgoing, self._outgoing = self._outgoing, []
        if outgoing:
            self.transport.write(b"".join(outgoing))

    def _abort(self, why: str) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.log.info("aborting connection from {peer}: {why}", peer=self.peer, why=why)
        self.state = ConnectionState.CLOSING
        self.discardInput()
        self._abandonStreams()
        self._outgoing = []
        self.transport.abortConnection()

    def streamEnded(self, stream: RequestStream) -> None:
        if self.streams.get(stream.reqId) is stream:
            del self.streams[stream.reqId]
            if not self.streams:
                if self.state is ConnectionState.OPEN:
                    self._startIdleClock()
                self.factory.checkQuiet()

    # IPushProducer (towards the transport) ----------------------------------

    def pauseProducing(self) -> None:
        if self.transportPaused:
            return
        self.transportPaused = True
        self.factory.counters.transportPauses += 1
        self.pauseReading()
        for stream in list(self.streams.values()):
            stream.connectionFlowChanged()

    def resumeProducing(self) -> None:
        if not self.transportPaused:
            return
        self.transportPaused = False
        self._unsolicitedWhilePaused = 0
        streams = list(self.streams.values())
        if streams:
            # Start the round at a different stream each time, so that no
            # stream is always first to refill the send buffer.
            start = next(self._rotation) % len(streams)
            for stream in streams[start:] + streams[:start]:
                if self.transportPaused:
                    break
                stream.connectionFlowChanged()
        if not self.transportPaused and self.state is ConnectionState.OPEN:
            self.resumeReading()

    def stopProducing(self) -> None:
        self._abandonStreams()


def unsupportedOptions(backend: object, options: GenerationOptions) -> list[str]:
    """The options set in a request that ``backend`` does not say it honours, by name."""
    if options.empty:
        return []
    honoured: frozenset[str] = frozenset(getattr(backend, "generationOptions", ()))
    return [name for name in options.given() if name not in honoured]


def unknownModel(backend: object, options: GenerationOptions) -> str:
    """Why the model a request names is not served here ("" when it is, or when the backend does not say)."""
    models = getattr(backend, "models", None)
    if options.model is None or not callable(models):
        return ""
    served = list(models())
    if not served or options.model in served:
        return ""
    return f"unknown model {options.model!r}; this server serves {', '.join(repr(m) for m in served)}"


def modelForOf(backend: object) -> Callable[[GenerationOptions], str | None] | None:
    """The backend's ``modelFor`` (the model it routes a request to), if it has one."""
    modelFor = getattr(backend, "modelFor", None)
    return modelFor if callable(modelFor) else None


def answerNowOf(backend: object) -> AnswerNow | None:
    """The backend's ``answerNow``, if it provides ``IImmediateBackend`` (asked once, not per request)."""
    provider = IImmediateBackend(backend, None)
    return provider.answerNow if provider is not None else None  # type: ignore[no-any-return]


def servedModels(backend: object) -> frozenset[str]:
    """The models ``backend`` says it serves (none, when it does not say)."""
    models = getattr(backend, "models", None)
    return frozenset(models() if callable(models) else ())


def helloReply(backend: object) -> bytes:
    """
    The server's HELLO payload: its name, then (after a newline) a JSON object
    of capabilities: the generation options the backend honours and the
    models it serves (docs/protocol.md, "HELLO").
    """
    capabilities: dict[str, object] = {"options": sorted(getattr(backend, "generationOptions", ()))}
    models = getattr(backend, "models", None)
    if callable(models):
        capabilities["models"] = list(models())
    return SERVER_NAME + b"\n" + json.dumps(capabilities, separators=(",", ":")).encode("utf-8")


def describePeer(transport: object) -> str:
    """``host:port`` of the client, or the address's own text (unix sockets)."""
    getPeer = getattr(transport, "getPeer", None)
    address: IAddress | None = getPeer() if getPeer is not None else None
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def _isRealReactor(reactor: object) -> bool:
    """A reactor with a real clock (wall time), as opposed to a test's fake one."""
    return isinstance(reactor, ReactorBase)


class CC50ServerFactory(Factory):
    """
    The server: configuration, admission and metrics shared by every
    connection, and the graceful drain.
    """

    protocol = CC50ServerProtocol  # type: ignore[assignment]
    log = Logger()

    def __init__(
        self,
        backend: IBackend,
        config: ServerConfig | None = None,
        reactor: Any = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """
        ``clock`` gives monotonic seconds for elapsed times and TTFT; by
        default ``time.monotonic``, or a given fake reactor's ``seconds``
        (tests).
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
            clock = clock or time.monotonic
        self._backend = backend
        self.config = config or ServerConfig()
        self.reactor: IReactorTime = reactor
        self.clock: Callable[[], float] = clock or (time.monotonic if _isRealReactor(reactor) else reactor.seconds)
        self.admission = Admission(self.config.max_concurrency, self.config.max_queue)
        #: Sends, at the end of each reactor pass, what connections wrote outside a read.
        self.sendAtPassEnd = SendAtPassEnd(reactor)
        self.connections: set[CC50ServerProtocol] = set()
        self.counters = FlowCounters()
        self.bytesSent = 0
        self.bytesReceived = 0
        self.backendHealthy = True
        self.draining = False
        self.closing = False
        self.metrics = ServerMetrics(self)
        self.services = StreamServices(
            admission=self.admission,
            backend=backend,
            clock=self.clock,
            scheduler=reactor,
            stallTimeout=self.config.stall_timeout,
            maxRequestSeconds=self.config.max_request_seconds,
            closing=lambda: self.closing,
            # Without the log line, the metrics keep the record as it is.
            requestEnded=self.requestEnded if self.config.log_requests else self.metrics.requestEnded,
            counters=self.counters,
        )
        #: Computed once: the backend's capabilities do not change while it runs.
        self.helloReply = helloReply(backend)
        #: What ``cc50_model_requests_total`` may label.
        self.servedModels = servedModels(backend)
        self.modelFor = modelForOf(backend)
        self.answerNow = answerNowOf(backend)
        self._quietWaiter: Deferred[None] | None = None
        self._quietCondition: Callable[[], bool] = lambda: True

    @property
    def backend(self) -> IBackend:
        return self._backend

    @backend.setter
    def backend(self, backend: IBackend) -> None:
        """Swap the backend (tests do, before any connection): streams get it through ``services``."""
        self._backend = backend
        self.services = attrs.evolve(self.services, backend=backend)
        self.servedModels = servedModels(backend)
        self.modelFor = modelForOf(backend)
        self.answerNow = answerNowOf(backend)

    @property
    def creditPauses(self) -> int:
        return self.counters.creditPauses

    @property
    def transportPauses(self) -> int:
        return self.counters.transportPauses

    @property
    def inFlight(self) -> int:
        return sum(len(connection.streams) for connection in self.connections)

    def requestEnded(
        self,
        stream: EndedRequest,
        outcome: str,
        result: GenerationResult | None = None,
        backendError: bool = False,
        message: str = "",
    ) -> None:
        """
        Record one finished request: metrics, and one log line.

        Without the log line (``--quiet-requests``) streams record their end
        with ``ServerMetrics.requestEnded`` alone; this is for the server
        that logs, or for a caller that does not know which it is.
        """
        options = stream.request.options
        model = options.model
        if model is None and self.modelFor is not None:
            model = routedModel(options, self.modelFor)
        endedAt = stream.endedAt if stream.endedAt is not None else self.clock()
        record = self.metrics.requestEnded(stream, outcome, result, backendError, message, model, endedAt)
        if not self.config.log_requests:
            return
        latency, ttft, _, generated, prompt = requestFigures(*record[2:9])
        logRequest(
            self.log,
            stream.reqId,
            stream.peer,
            outcome,
            self._backend.name,
            model,
            generated if result is not None else None,
            prompt if result is not None else None,
            stream.bytesSent,
            latency * 1e3,
            ttft * 1e3 if ttft is not None else None,
            message,
            result.finish_reason if result else None,
        )

    def connectionOpened(self, protocol: CC50ServerProtocol) -> bool:
        if len(self.connections) >= self.config.max_connections:
            return False
        self.connections.add(protocol)
        return True

    def connectionClosed(self, protocol: CC50ServerProtocol) -> None:
        self.connections.discard(protocol)
        self.checkQuiet()

    # Graceful shutdown -----------------------------------------------------

    def checkQuiet(self) -> None:
        """Wake a shutdown waiting for in-flight requests or connections to end."""
        waiter = self._quietWaiter
        if waiter is not None and self._quietCondition():
            self._quietWaiter = None
            waiter.callback(None)

    def _waitUntil(self, condition: Callable[[], bool], timeout: float) -> Deferred[None]:
        """Fire when ``condition`` holds (checked as requests and connections end) or after ``timeout``."""
        waiter: Deferred[None] = Deferred()
        if condition():
            waiter.callback(None)
            return waiter
        self._quietCondition = condition
        self._quietWaiter = waiter

        def expire() -> None:
            if self._quietWaiter is waiter:
                self._quietWaiter = None
                waiter.callback(None)

        timer = self.reactor.callLater(timeout, expire)

        def stopTimer(result: None) -> None:
            if timer.active():
                timer.cancel()

        waiter.addCallback(stopTimer)
        return waiter

    async def shutdown(self, drainTimeout: float, closeTimeout: float = 5.0) -> None:
        """
        Stop taking requests, let those in flight finish for up to
        ``drainTimeout`` seconds, end the rest with SHUTTING_DOWN, then close
        every connection.  Every accepted request gets its terminal frame.
        """
        self.draining = True
        if self.inFlight:
            self.log.info("draining {count} in-flight requests (up to {timeout:g}s)", count=self.inFlight, timeout=drainTimeout)
        await self._waitUntil(lambda: self.inFlight == 0, drainTimeout)
        # From here, a queued request that a cancellation below admits must
        # not start backend work only to be cancelled a moment later.
        self.closing = True
        for connection in list(self.connections):
            for stream in list(connection.streams.values()):
                stream.fail(
                    ErrorCode.SHUTTING_DOWN,
                    f"server shutting down: the request did not finish within the {drainTimeout:g}s drain timeout",
                )
            connection.close(abortAfter=closeTimeout)
        await self._waitUntil(lambda: not self.connections, closeTimeout)
        for connection in list(self.connections):
            connection.transport.abortConnection()
