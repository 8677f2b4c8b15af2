"""
One request on a server connection: its credit window and its lifecycle.

A ``RequestStream`` is the ``ITokenSink`` a backend writes into.  It sends
RESP_CHUNK frames only within the client's credit window, holds the rest, and
pauses the backend (the registered ``IPushProducer``) whenever either the
window is spent or the connection's transport asked us to stop, in the way
``twisted.web._http2`` gives each stream its own flow-control window.

It also guarantees the protocol's central promise: every accepted request
ends in exactly one terminal frame, DONE or ERR, and nothing follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cc50tw.codec import MAX_U32, DoneStats, ErrorCode, utf8_prefix_length
from cc50tw.errors import RequestFailed
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink

if TYPE_CHECKING:
    from cc50tw.server import CC50ServerProtocol


@implementer(ITokenSink)
class RequestStream:
    log = Logger()

    def __init__(self, connection: CC50ServerProtocol, request: InferenceRequest, credit: int) -> None:
        self.connection = connection
        self.request = request
        self.req_id = request.req_id
        self.credit = credit
        self.finished = False
        self.started_at = connection.now()
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None
        self.bytes_sent = 0
        self.chunks_sent = 0
        self._pending = b""
        self._producer: IPushProducer | None = None
        self._producerPaused = False
        self._result: GenerationResult | None = None
        self._admission: Deferred[Any] | None = None
        self._admitted = False
        self._generation: Deferred[GenerationResult] | None = None
        self._stallTimer: IDelayedCall | None = None

    # Lifecycle -------------------------------------------------------------

    def admit(self) -> None:
        """Queue for a backend slot; ``RequestFailed`` if the queue is full."""
        admission = self.connection.factory.admission
        if admission.tryAcquire():  # the common case: a slot is free, start now
            self._admitted_(None)
            return
        waiting = admission.acquire()
        self._admission = waiting
        waiting.addCallbacks(self._admitted_, self._notAdmitted)

    def _admitted_(self, _: object) -> None:
        self._admission = None
        self._admitted = True
        if self.finished:  # cancelled while the slot was on its way
            self._releaseSlot()
            return
        if self.connection.factory.closing:
            self._end(ErrorCode.SHUTTING_DOWN, "server shutting down: the request was still queued at the drain timeout")
            return
        backend = self.connection.factory.backend
        try:
            generation = backend.generate(self.request, self)
        except Exception as e:  # a backend bug must not take the connection down
            self.log.failure("backend.generate raised for request {req_id}", req_id=self.req_id)
            self._end(ErrorCode.BACKEND_ERROR, f"backend failed to start: {e}", fromBackend=True)
            return
        self._generation = generation
        generation.addCallbacks(self._generated, self._generationFailed)

    def _notAdmitted(self, failure: Failure) -> None:
        failure.trap(CancelledError)

    def _generated(self, result: GenerationResult) -> None:
        self._generation = None
        if self.finished:
            return
        self._result = result
        self._releaseSlot()
        if not self._pending:
            self._done()
        else:
            self._updateFlow()  # starts the stall clock: DONE waits for credit

    def _generationFailed(self, failure: Failure) -> None:
        self._generation = None
        if self.finished:
            return  # we cancelled it and already sent the terminal frame
        error = failure.value
        if isinstance(error, RequestFailed):
            self._end(error.code, error.message, fromBackend=True)
        elif isinstance(error, CancelledError):
            self._end(ErrorCode.CANCELLED, "request cancelled by the backend", fromBackend=True)
        else:
            self.log.failure("backend failed request {req_id}", failure, req_id=self.req_id)
            self._end(ErrorCode.BACKEND_ERROR, f"backend error: {failure.getErrorMessage()}", fromBackend=True)

    def _done(self) -> None:
        assert self._result is not None
        now = self.connection.now()
        generated = self._result.generated_tokens
        first = self.first_chunk_at if self.first_chunk_at is not None else now
        stats = DoneStats(
            tokens=min(generated, MAX_U32),
            elapsed_us=int((now - self.started_at) * 1e6),
            prompt_tokens=min(self._result.prompt_tokens, MAX_U32),
            generated_tokens=min(generated, MAX_U32),
            ttft_us=int((first - self.started_at) * 1e6),
        )
        # The terminal frame goes out before the stream ends: ending it may let
        # a draining server close the connection at once.
        self.connection.sendDone(self.req_id, stats)
        self._terminate()
        self.connection.factory.requestEnded(self, "done", self._result)

    def cancel(self, code: ErrorCode, message: str) -> None:
        """End the request now with RESP_ERR, stopping the backend's work."""
        if not self.finished:
            self._end(code, message)

    def abandon(self) -> None:
        """The connection is gone: stop the work, send nothing."""
        if not self.finished:
            self._terminate()
            self.connection.factory.requestEnded(self, "disconnected")

    def _end(self, code: ErrorCode, message: str, fromBackend: bool = False) -> None:
        self.connection.sendError(self.req_id, code, message)
        self._terminate()
        self.connection.factory.requestEnded(self, code.name.lower(), backendError=fromBackend, message=message)

    def _terminate(self) -> None:
        self.finished = True
        self._pending = b""
        if self._stallTimer is not None:
            self._stallTimer.cancel()
            self._stallTimer = None
        self._producer = None
        self.connection.streamEnded(self)
        if self._admission is not None:
            admission, self._admission = self._admission, None
            admission.cancel()
        if self._generation is not None:
            generation, self._generation = self._generation, None
            generation.cancel()
        self._releaseSlot()

    def _releaseSlot(self) -> None:
        if self._admitted:
            self._admitted = False
            self.connection.factory.admission.release()

    # ITokenSink ------------------------------------------------------------

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("backends must be push producers (streaming=True)")
        self._producer = producer
        self._producerPaused = False
        self._updateFlow()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, text: str) -> None:
        if self.finished:
            return
        data = text.encode("utf-8")
        if self._pending:
            self._pending += data
        else:
            self._sendWithinCredit(data)
        self._updateFlow()

    def writeSequence(self, texts: Sequence[str]) -> None:
        if self.finished:
            return
        datas = [text.encode("utf-8") for text in texts]
        size = sum(map(len, datas))
        if self._pending or size > self.credit:
            for data in datas:  # the window ends inside the batch: the careful path
                if self._pending:
                    self._pending += data
                else:
                    self._sendWithinCredit(data)
        elif datas:
            self.credit -= size
            self.bytes_sent += size
            self.chunks_sent += len(datas)
            self.last_chunk_at = now = self.connection.now()
            if self.first_chunk_at is None:
                self.first_chunk_at = now
            self.connection.sendChunks(self.req_id, datas)
        self._updateFlow()

    # Flow control ----------------------------------------------------------

    def grant(self, credit: int) -> None:
        """REQ_CREDIT: the client can take ``credit`` more chunk bytes."""
        if self.finished:
            return
        self.credit = min(self.credit + credit, 1 << 62)
        if credit and self._stallTimer is not None:
            # A real grant is progress: the stall clock measures time without one.
            self._stallTimer.cancel()
            self._stallTimer = None
        if self._pending:
            pending, self._pending = self._pending, b""
            self._sendWithinCredit(pending)
        if self._result is not None and not self._pending:
            self._done()
            return
        self._updateFlow()

    def _sendWithinCredit(self, data: bytes) -> None:
        size = len(data)
        if size > self.credit:
            size = utf8_prefix_length(data, self.credit)
            self._pending = data[size:]
            data = data[:size]
        if size:
            self.credit -= size
            self.bytes_sent += size
            self.chunks_sent += 1
            self.last_chunk_at = now = self.connection.now()
            if self.first_chunk_at is None:
                self.first_chunk_at = now
            self.connection.sendChunk(self.req_id, data)

    @property
    def pendingBytes(self) -> int:
        return len(self._pending)

    @property
    def creditBlocked(self) -> bool:
        return bool(self._pending) or self.credit == 0

    def _updateFlow(self) -> None:
        """
        Pause or resume the backend, and run the stall clock, to match our state.

        The stall clock runs whenever this request cannot progress because of
        its client: no credit, or a socket the client does not read.  Either
        way a client that stops for ``--stall-timeout`` loses the request, so
        it cannot hold a backend slot forever.
        """
        blocked = self.creditBlocked and not self.finished
        stuck = (blocked or self.connection.transportPaused) and not self.finished
        producer = self._producer
        if producer is not None:
            if stuck and not self._producerPaused:
                self._producerPaused = True
                if blocked:
                    self.connection.factory.creditPauses += 1
                producer.pauseProducing()
            elif not stuck and self._producerPaused:
                self._producerPaused = False
                producer.resumeProducing()
        waiting = stuck and (producer is not None or self._result is not None)
        if waiting and self._stallTimer is None:
            self._stallTimer = self.connection.factory.reactor.callLater(
                self.connection.factory.config.stall_timeout, self._stalled
            )
        elif not waiting and self._stallTimer is not None:
            self._stallTimer.cancel()
            self._stallTimer = None

    def connectionFlowChanged(self) -> None:
        self._updateFlow()

    def _stalled(self) -> None:
        self._stallTimer = None
        timeout = self.connection.factory.config.stall_timeout
        if self.creditBlocked:
            message = (
                f"no credit for {timeout:g}s: the client must send REQ_CREDIT to receive more of this answer"
            )
        else:
            message = f"the client read nothing for {timeout:g}s while this answer waited to be sent"
        self.cancel(ErrorCode.CREDIT_STALL, message)
