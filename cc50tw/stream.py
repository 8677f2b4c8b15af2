"""
One request on a server connection: its lifecycle and its credit window.

A ``RequestStream`` is the ``ITokenSink`` a backend writes into.  It sends
RESP_CHUNK frames only within the client's credit window, holds the rest, and
pauses the backend (the registered ``IPushProducer``) whenever either the
window is spent or the connection's transport asked us to stop, in the way
``twisted.web._http2`` gives each stream its own flow-control window.

The lifecycle is one state value, never a set of flags::

    Queued(admission) --slot--> Running(generation) --result--> Flushing(result)
          \\                           \\                              \\
           +---------------------------+------------------------------+--> ENDED

``_finish`` is the only way into ``ENDED`` and the only writer of a terminal
frame.  It moves to ``ENDED`` before it does anything else, so whatever it
calls (a cancelled backend's errback, a metrics hook) cannot end the request
twice; and nothing it writes can raise (the codec clamps statistics and
encodes any text).  That is how "every accepted request ends in exactly one
terminal frame, and nothing follows it" holds by construction.

A backend slot is held exactly while the state is ``Running``.

A request whose backend has its whole answer ready never becomes a stream:
``cc50tw.immediate`` writes that answer and its RESP_DONE in one write, the
one other writer of a terminal frame, and hands anything it cannot send that
way to ``startWith``.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cc50tw.admission import Admission
from cc50tw.codec import (
    DoneStats,
    ErrorCode,
    encode_done,
    encode_error,
    encode_plain_done,
    new_tuple,
    utf8_char_length,
    utf8_prefix_length,
)
from cc50tw.errors import RequestFailed
from cc50tw.generation import NO_OPTIONS, GenerationOptions
from cc50tw.interfaces import GenerationResult, IBackend, ImmediateAnswer, InferenceRequest, ITokenSink

#: The stall clock starts over only after the client has taken this many
#: bytes of the answer (or unblocked the request with this much window):
#: a byte every few seconds is not a client reading.
STALL_PROGRESS_BYTES = 1024


class StreamConnection(Protocol):
    """What a stream needs from its connection: a few stream-keyed calls, no more."""

    @property
    def transportPaused(self) -> bool:
        """True while the socket's send buffer is full."""

    def sendChunk(self, reqId: int, data: bytes) -> None: ...

    def sendChunks(self, reqId: int, datas: list[bytes]) -> None: ...

    def sendTerminal(self, reqId: int, frame: bytes) -> None:
        """Write a stream's last frame (the connection drops it if it is closing)."""

    def streamEnded(self, stream: RequestStream) -> None: ...


@attrs.define
class FlowCounters:
    """Counts kept as plain integers on the hot path and read at scrape time."""

    creditPauses: int = 0
    transportPauses: int = 0
    #: Frames dropped because they carried a req_id with nothing in flight.
    framesDropped: int = 0
    #: Requests answered in one write, no stream (``cc50tw.immediate``).
    answeredAtOnce: int = 0


class EndedRequest(Protocol):
    """What the record of a finished request reads: a ``RequestStream``, or an answer sent at once."""

    @property
    def reqId(self) -> int: ...

    @property
    def peer(self) -> str: ...

    @property
    def request(self) -> InferenceRequest: ...

    @property
    def startedAt(self) -> float: ...

    @property
    def endedAt(self) -> float | None: ...

    @property
    def firstChunkAt(self) -> float | None: ...

    @property
    def lastChunkAt(self) -> float | None: ...

    @property
    def chunksSent(self) -> int: ...

    @property
    def bytesSent(self) -> int: ...


#: Its return value, if any, is ignored.
RequestEnded = Callable[[EndedRequest, str, "GenerationResult | None", bool, str], object]


@attrs.frozen
class StreamServices:
    """Everything a stream uses from the server, built once by the factory and shared."""

    admission: Admission
    backend: IBackend
    #: Monotonic seconds, for elapsed time and TTFT (a wall-clock step must not change them).
    clock: Callable[[], float]
    #: Where timers are scheduled.
    scheduler: IReactorTime
    stallTimeout: float
    #: Hard cap on a request's life in seconds; 0 = none.
    maxRequestSeconds: float
    #: True once a drain has timed out: a queued request must not start then.
    closing: Callable[[], bool]
    #: Called once per request, after its terminal frame (metrics, the log line).
    requestEnded: RequestEnded
    counters: FlowCounters


class Queued:
    """Waiting for a backend slot; ``admission`` fires when one is free (None: refused, ending)."""

    __slots__ = ("admission",)

    def __init__(self, admission: Deferred[Any] | None) -> None:
        self.admission = admission


class Running:
    """Holding a backend slot; ``generation`` is None until ``generate`` has returned."""

    __slots__ = ("generation",)

    def __init__(self) -> None:
        self.generation: Deferred[GenerationResult] | None = None


class Flushing:
    """The backend is done (slot released); held text and RESP_DONE wait for credit."""

    __slots__ = ("result",)

    def __init__(self, result: GenerationResult) -> None:
        self.result = result


class Ended:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ENDED"


ENDED = Ended()

State = Queued | Running | Flushing | Ended

log = Logger()


@implementer(ITokenSink)
class RequestStream:
    """One accepted REQ_INFER, from admission to its one terminal frame."""

    def __init__(
        self,
        connection: StreamConnection,
        services: StreamServices,
        request: InferenceRequest,
        credit: int,
        peer: str = "",
    ) -> None:
        self.connection = connection
        self.services = services
        self.request = request
        self.reqId = request.req_id
        self.peer = peer
        self.credit = credit
        self.state: State = Running()  # replaced by start(); never observed before it
        self.startedAt = services.clock()
        self.endedAt: float | None = None
        self.firstChunkAt: float | None = None
        self.lastChunkAt: float | None = None
        self.bytesSent = 0
        self.chunksSent = 0
        self._pending = bytearray()
        self._producer: IPushProducer | None = None
        self._producerPaused = False
        self._stallTimer: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        #: The stall clock's state: when the current blocked spell began, the
        #: blocked seconds before it since the last real progress, and
        #: ``bytesSent`` at that progress.
        self._blockedSince: float | None = None
        self._blockedTotal = 0.0
        self._progressMark = 0
        self._flowRunning = False
        self._flowDirty = False

    @property
    def ended(self) -> bool:
        return self.state is ENDED

    @property
    def holdsSlot(self) -> bool:
        return type(self.state) is Running

    # Lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Queue for a backend slot, or start at once if one is free."""
        self._armDeadline()
        admission = self.services.admission
        if admission.tryAcquire():  # the common case: a slot is free, start now
            self._run()
            return
        try:
            waiting = admission.acquire()
        except RequestFailed as error:
            self.state = Queued(None)
            self.fail(error.code, error.message)
            return
        self.state = Queued(waiting)
        waiting.addCallbacks(self._slotGranted, self._notAdmitted)

    def startWith(self, answer: ImmediateAnswer | Failure, startedAt: float) -> None:
        """
        Start holding the backend slot the caller took for ``answerNow``, with
        its answer (or failure) in hand: what could not be sent at once (an
        answer over the credit window, a result that is not a
        ``GenerationResult``) ends through the usual lifecycle.
        """
        self.startedAt = startedAt
        self._armDeadline()
        running = Running()
        self.state = running
        if isinstance(answer, Failure):
            self._generationFailed(answer, running)
            return
        try:
            texts, result = answer
            self.writeSequence(texts)
        except Exception as e:
            log.failure("request {req_id}: unusable answer from answerNow", req_id=self.reqId)
            self._fail(ErrorCode.BACKEND_ERROR, f"backend bug: unusable immediate answer ({e})", fromBackend=True)
            return
        self._generated(result, running)

    def endUnstarted(self, code: ErrorCode | None, message: str = "") -> None:
        """
        End a request that never started and holds no slot: one RESP_ERR with
        ``code``, or nothing at all (None: its connection is gone).  It is
        recorded as every request is.
        """
        self.state = Queued(None)
        if code is None:
            self.abandon()
        else:
            self.fail(code, message)

    def _armDeadline(self) -> None:
        services = self.services
        if services.maxRequestSeconds > 0:
            self._deadline = services.scheduler.callLater(services.maxRequestSeconds, self._overtime)

    def _slotGranted(self, _: object) -> None:
        if type(self.state) is not Queued:
            # Ended while the slot was on its way: give it straight back.
            self.services.admission.release()
            return
        if self.services.closing():
            self.state = Running()  # the slot is held; _finish releases it
            self.fail(ErrorCode.SHUTTING_DOWN, "server shutting down: the request was still queued at the drain timeout")
            return
        self._run()

    def _notAdmitted(self, failure: Failure) -> None:
        failure.trap(CancelledError)

    def _run(self) -> None:
        running = Running()
        self.state = running
        try:
            returned: object = self.services.backend.generate(self.request, self)
        except Exception as e:  # a backend bug must not take the connection down
            log.failure("backend.generate raised for request {req_id}", req_id=self.reqId)
            self._fail(ErrorCode.BACKEND_ERROR, f"backend failed to start: {e}", fromBackend=True)
            return
        if isinstance(returned, Deferred):
            generation: Deferred[GenerationResult] = returned
        elif inspect.iscoroutine(returned):  # an ``async def generate``
            generation = Deferred.fromCoroutine(returned)
        else:
            self._fail(
                ErrorCode.BACKEND_ERROR,
                f"backend bug: generate() returned {type(returned).__name__}, not a Deferred",
                fromBackend=True,
            )
            return
        if self.state is not running:
            # The request ended while generate() ran (its own writes can end
            # it): the work it just started must stop too.
            if not generation.called:
                generation.cancel()
            generation.addErrback(lambda _: None)
            return
        if generation.called and not generation.paused:
            # Already fired (a backend that finished inside generate(), as the
            # toy's zero-cost work does): its result is final, as awaiting it
            # would take it, and taking it here skips a callback chain per
            # request.  A failure still goes through the errback, which
            # consumes it.
            result: Any = generation.result  # _generated checks what it is
            if not isinstance(result, Failure):
                self._generated(result, running)
                return
        running.generation = generation
        generation.addCallbacks(self._generated, self._generationFailed, callbackArgs=(running,), errbackArgs=(running,))

    def _generated(self, result: GenerationResult, running: Running) -> None:
        if self.state is not running:
            return
        if not isinstance(result, GenerationResult):
            if not (isinstance(result, tuple) and len(result) == 2):
                self._fail(
                    ErrorCode.BACKEND_ERROR,
                    f"backend bug: its Deferred fired with {type(result).__name__}, not a GenerationResult",
                    fromBackend=True,
                )
                return
            result = GenerationResult(*result)  # a plain (prompt, generated) pair
        self.state = Flushing(result)
        self.services.admission.release()
        if not self._pending:
            self._done(result)
        else:
            self._updateFlow()  # starts the stall clock: RESP_DONE waits for credit

    def _generationFailed(self, failure: Failure, running: Running) -> None:
        if self.state is not running:
            return  # we cancelled it, and the terminal frame is already out
        error = failure.value
        if isinstance(error, RequestFailed):
            self._fail(error.code, error.message, fromBackend=True)
        elif isinstance(error, CancelledError):
            self._fail(ErrorCode.CANCELLED, "request cancelled by the backend", fromBackend=True)
        else:
            log.failure("backend failed request {req_id}", failure, req_id=self.reqId)
            self._fail(ErrorCode.BACKEND_ERROR, f"backend error: {failure.getErrorMessage()}", fromBackend=True)

    def fail(self, code: ErrorCode, message: str) -> None:
        """End the request now with one RESP_ERR, stopping the backend's work."""
        self._fail(code, message)

    def abandon(self) -> None:
        """The connection is going: stop the work and write nothing."""
        self._finish(None, "disconnected")

    def _fail(self, code: ErrorCode | int, message: object, fromBackend: bool = False) -> None:
        if self.state is ENDED:
            return
        try:
            known = ErrorCode(code)
        except (ValueError, TypeError):  # a backend's own number: keep it on the wire, name it for the log
            known = ErrorCode.BACKEND_ERROR
            wire = code if isinstance(code, int) and not isinstance(code, bool) else int(known)
        else:
            wire = int(known)
        # Upstream text may hold lone surrogates: one clean copy for the frame and the log alike.
        text = str(message).encode("utf-8", "replace").decode("utf-8")
        self._finish(_errorFrame(self.reqId, wire, text), known.name.lower(), None, fromBackend, text)

    def _done(self, result: GenerationResult) -> None:
        now = self.services.clock()
        frame = resultFrame(self.reqId, result, self.request.options, self.startedAt, self.firstChunkAt, now)
        self.endedAt = now  # the log's latency is the elapsed_us the client reads
        self._finish(frame, "done", result)

    def _finish(
        self,
        frame: bytes | None,
        outcome: str,
        result: GenerationResult | None = None,
        fromBackend: bool = False,
        message: str = "",
    ) -> None:
        """
        The one way a request ends: state first, then the terminal frame, then
        the teardown.  The frame goes out before the stream leaves its
        connection, since leaving may let a draining server close at once.
        """
        state = self.state
        if state is ENDED:
            return
        self.state = ENDED
        if self.endedAt is None:
            self.endedAt = self.services.clock()
        if frame is not None:
            try:
                self.connection.sendTerminal(self.reqId, frame)
            except Exception:  # a transport torn down under us: the teardown below must still run
                log.failure("writing the terminal frame of request {req_id} failed", req_id=self.reqId)
        if self._pending:
            self._pending = bytearray()
        self._producer = None
        if self._stallTimer is not None or self._deadline is not None:
            for timer in (self._stallTimer, self._deadline):
                if timer is not None and timer.active():
                    timer.cancel()
            self._stallTimer = self._deadline = None
        try:
            if type(state) is Queued:
                if state.admission is not None:
                    state.admission.cancel()
            elif type(state) is Running:
                generation = state.generation
                if generation is not None and not generation.called:
                    generation.cancel()
        except Exception:  # a backend's canceller raised: its work is its own problem now
            log.failure("cancelling the backend work of request {req_id} raised", req_id=self.reqId)
        finally:
            if type(state) is Running:
                self.services.admission.release()
        self.connection.streamEnded(self)
        try:
            self.services.requestEnded(self, outcome, result, fromBackend, message)
        except Exception:
            log.failure("recording the end of request {req_id} failed", req_id=self.reqId)

    def _overtime(self) -> None:
        self._deadline = None
        limit = self.services.maxRequestSeconds
        self.fail(ErrorCode.TIMEOUT, f"request ran longer than this server's limit of {limit:g}s (--max-request-seconds)")

    # ITokenSink ------------------------------------------------------------

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("backends must be push producers (streaming=True)")
        if self.state is ENDED:
            return
        self._producer = producer
        self._producerPaused = False
        self._updateFlow()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, text: str) -> None:
        if self.state is ENDED or not text:
            return
        try:
            data = text.encode()
        except UnicodeEncodeError:
            data = text.encode("utf-8", "replace")
        if self._pending:
            self._pending += data
        else:
            self._sendWithinCredit(data)
        self._updateFlow()

    def writeSequence(self, texts: Sequence[str]) -> None:
        if self.state is ENDED:
            return
        try:
            datas = [text.encode() for text in texts]  # the hot path: one plain encode per token
        except UnicodeEncodeError:  # a lone surrogate from a backend: replaced, not raised
            datas = [text.encode("utf-8", "replace") for text in texts]
        if not all(datas):
            datas = [data for data in datas if data]  # an empty text is no chunk
            if not datas:
                return
        size = sum(map(len, datas))
        if self._pending or size > self.credit:
            for data in datas:  # the window ends inside the batch: the careful path
                if self.state is ENDED:
                    return  # a write ended it (the connection was lost under it): nothing more goes out
                if self._pending:
                    self._pending += data
                else:
                    self._sendWithinCredit(data)
        else:
            self.credit -= size
            self.bytesSent += size
            self.chunksSent += len(datas)
            self.lastChunkAt = now = self.services.clock()
            if self.firstChunkAt is None:
                self.firstChunkAt = now
            self.connection.sendChunks(self.reqId, datas)
        self._updateFlow()

    # Flow control ----------------------------------------------------------

    def grant(self, credit: int) -> None:
        """REQ_CREDIT: the client can take ``credit`` more chunk bytes."""
        if self.state is ENDED:
            return
        self.credit = min(self.credit + credit, 1 << 62)
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            self._sendWithinCredit(pending)
        state = self.state
        if type(state) is Flushing and not self._pending:
            self._done(state.result)
            return
        self._updateFlow()

    def _sendWithinCredit(self, data: bytes) -> None:
        size = len(data)
        if size > self.credit:
            size = utf8_prefix_length(data, self.credit)
            self._pending += data[size:]
            data = data[:size]
        if size:
            self.credit -= size
            self.bytesSent += size
            self.chunksSent += 1
            self.lastChunkAt = now = self.services.clock()
            if self.firstChunkAt is None:
                self.firstChunkAt = now
            self.connection.sendChunk(self.reqId, data)

    @property
    def pendingBytes(self) -> int:
        return len(self._pending)

    @property
    def creditBlocked(self) -> bool:
        return bool(self._pending) or self.credit == 0

    def connectionFlowChanged(self) -> None:
        self._updateFlow()

    def _updateFlow(self) -> None:
        """
        Bring the backend's pause state and the stall clock in line with ours.

        A producer's ``resumeProducing`` may write at once, fill the socket
        and pause the connection, which calls back in here.  So nothing is
        carried across a producer call: an inner call only marks the flow
        dirty, and the outer one evaluates again from fresh state until it
        holds still.
        """
        if self._flowRunning:
            self._flowDirty = True
            return
        if (
            self._blockedSince is None
            and not self._producerPaused
            and not self._pending
            and self.credit
            and not self.connection.transportPaused
        ):
            # The common case, once per backend write: nothing blocked, nothing to change.
            if self.bytesSent - self._progressMark >= STALL_PROGRESS_BYTES:
                self._progressMark = self.bytesSent
                self._blockedTotal = 0.0
            return
        self._flowRunning = True
        try:
            for _ in range(64):  # each round follows a real change; a bound keeps a bad producer from spinning
                self._flowDirty = False
                self._applyFlow()
                if not self._flowDirty:
                    break
        finally:
            self._flowRunning = False

    def _applyFlow(self) -> None:
        if self.state is ENDED:
            return
        creditBlocked = self.creditBlocked
        stuck = creditBlocked or self.connection.transportPaused
        producer = self._producer
        if producer is not None:
            if stuck and not self._producerPaused:
                self._producerPaused = True
                if creditBlocked:
                    self.services.counters.creditPauses += 1
                producer.pauseProducing()
            elif not stuck and self._producerPaused:
                self._producerPaused = False
                producer.resumeProducing()
            if self._flowDirty or self.state is ENDED:
                return  # the producer call changed something: the outer loop looks again
        self._runStallClock()

    def _runStallClock(self) -> None:
        """
        The stall clock counts the time this request spends blocked by its
        client (no credit, or a socket the client does not read) while the
        backend has something to give.  It pauses while the request is free
        to go and starts over only on real progress: at least
        ``STALL_PROGRESS_BYTES`` of the answer taken since it last started
        over, or the request unblocked with that much window.  So a client
        granting a byte at a time, or just enough to unblock one token, loses
        the request after ``--stall-timeout`` of being blocked, and cannot
        hold a backend slot while others wait; a client that reads promptly
        is never blocked for long, however slow the backend.
        """
        stuck = self.creditBlocked or self.connection.transportPaused
        if self.bytesSent - self._progressMark >= STALL_PROGRESS_BYTES or (
            not stuck and self.credit >= STALL_PROGRESS_BYTES
        ):
            self._progressMark = self.bytesSent
            self._blockedTotal = 0.0
            if self._blockedSince is not None:
                self._blockedSince = None
                self._stopStallTimer()
        waiting = stuck and (self._producer is not None or type(self.state) is Flushing)
        if waiting:
            if self._blockedSince is None:
                self._blockedSince = self.services.scheduler.seconds()
                self._stallTimer = self.services.scheduler.callLater(
                    max(0.0, self.services.stallTimeout - self._blockedTotal), self._stalled
                )
        elif self._blockedSince is not None:
            self._blockedTotal += max(0.0, self.services.scheduler.seconds() - self._blockedSince)
            self._blockedSince = None
            self._stopStallTimer()

    def _stopStallTimer(self) -> None:
        timer, self._stallTimer = self._stallTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stalled(self) -> None:
        self._stallTimer = None
        self._blockedSince = None
        timeout = self.services.stallTimeout
        needed = utf8_char_length(self._pending[0]) if self._pending else 0
        if self.connection.transportPaused:
            message = f"the client read nothing for {timeout:g}s while this answer waited to be sent"
        elif 0 < self.credit < needed:
            # The client may well be granting what it reads: with a window
            # smaller than the next character, nothing more is ever sent.
            message = (
                f"the next character of this answer is {needed} bytes and the window has had {self.credit} "
                f"for {timeout:g}s: the client must grant at least {needed - self.credit} more (REQ_CREDIT); "
                "a window under 4 bytes can stall any answer"
            )
        else:
            message = (
                f"no usable credit for {timeout:g}s: the client must send REQ_CREDIT to receive more of this "
                f"answer (at least {STALL_PROGRESS_BYTES} bytes per {timeout:g}s of waiting)"
            )
        self.fail(ErrorCode.CREDIT_STALL, message)


def resultFrame(
    reqId: int,
    result: GenerationResult,
    options: GenerationOptions,
    startedAt: float,
    firstChunkAt: float | None,
    now: float,
) -> bytes:
    """
    RESP_DONE for a request that ended with ``result``: in one pack when the
    counts are whole numbers that fit and the client sent no options (so no
    finish reason), else through ``doneStats``, which makes do with any counts.
    """
    if options is NO_OPTIONS and type(result) is GenerationResult:
        generated, prompt = result.generated_tokens, result.prompt_tokens
        if type(generated) is int and type(prompt) is int:
            # No chunk, no time to first chunk: 0, as doneStats has it.
            first = firstChunkAt if firstChunkAt is not None else startedAt
            try:
                return encode_plain_done(
                    reqId, generated, round((now - startedAt) * 1e6), prompt, round((first - startedAt) * 1e6)
                )
            except (struct.error, OverflowError, ValueError):  # a figure out of range, a clock stepped back
                pass  # the general path clamps it
    return doneFrame(reqId, doneStats(reqId, result, options, startedAt, firstChunkAt, now))


def doneStats(
    reqId: int,
    result: GenerationResult,
    options: GenerationOptions,
    startedAt: float,
    firstChunkAt: float | None,
    now: float,
) -> DoneStats:
    """RESP_DONE's figures for a finished request; counts a backend got wrong cost it its figures, never its DONE."""
    # No chunk, no time to first chunk: 0, as the log says "none" and the
    # TTFT histogram records nothing.
    first = firstChunkAt if firstChunkAt is not None else startedAt
    try:
        generated, prompt = result.generated_tokens, result.prompt_tokens
        if type(generated) is not int or type(prompt) is not int:
            generated, prompt = _count(generated), _count(prompt)
        return new_tuple(
            DoneStats,
            (
                generated,  # tokens
                round((now - startedAt) * 1e6),  # elapsed_us
                prompt,  # prompt_tokens
                generated,  # generated_tokens
                round((first - startedAt) * 1e6),  # ttft_us
                # Only a client that sent options knows the field after ttft_us.
                None if options is NO_OPTIONS else (result.finish_reason or "unknown"),  # finish_reason
            ),
        )
    except Exception:
        log.failure("request {req_id}: unusable counts in {result!r}", req_id=reqId, result=result)
        return DoneStats(0, 0, 0, 0, 0)


def _count(value: object) -> int:
    """A token count as an int, whatever a backend handed over (2.0, a numpy integer)."""
    return int(value)  # type: ignore[call-overload]


def doneFrame(reqId: int, stats: DoneStats) -> bytes:
    """RESP_DONE for any figures: the codec clamps them, and a last resort sends zeros."""
    try:
        return encode_done(reqId, stats)
    except Exception:  # the codec clamps every field; this is the last line of defence
        log.failure("encoding RESP_DONE for request {req_id} failed", req_id=reqId)
        return encode_done(reqId, DoneStats(0, 0, 0, 0, 0))


def _errorFrame(reqId: int, code: int, message: str) -> bytes:
    try:
        return encode_error(reqId, code, message)
    except Exception:
        log.failure("encoding RESP_ERR for request {req_id} failed", req_id=reqId)
        return encode_error(reqId, code, "error (its message could not be encoded)")
