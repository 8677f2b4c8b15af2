"""
Answers sent at once: a request whose backend has the whole answer ready.

A streamed request is a ``RequestStream``, a producer registration and a
Deferred, then a chunk write and a terminal write; for an answer that is ready
the moment it is asked for (``IImmediateBackend``: a cache hit, an echo, the
toy at zero iterations) that machinery is most of the server's work per
request (issue 18).  Here such an answer goes out as one write, chunks and
RESP_DONE together, and is recorded as every request is (metrics, the request
log), with no stream ever made.

The connection asks ``answerNow`` (``CC50ServerProtocol._answerAtOnce``)
only with a free backend slot, nobody queued for one and the connection
writable.  Only the plain answer is sent here (``sendAnswer``): an
``ImmediateAnswer`` of a list of str texts that fits the client's credit
window, with a ``GenerationResult`` (odd counts in it are clamped, as a
stream's are).  Anything else (a failure, an answer over the window, a
plain pair for a result) is made something a stream can start with
(``readAnswer``) and handed to a ``RequestStream`` already holding the slot
(``RequestStream.startWith``), so every rule of the lifecycle (one terminal
frame, credit, stall and deadline timers) still holds there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from cc50tw.codec import HEADER, MAGIC, VERSION, new_tuple
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult, ImmediateAnswer, InferenceRequest
from cc50tw.stream import StreamConnection, StreamServices, resultFrame

AnswerNow = Callable[[InferenceRequest, int], "ImmediateAnswer | None"]

log = Logger()


class AnsweredRequest(NamedTuple):
    """What the record of a finished request reads (``stream.EndedRequest``), for an answer sent at once."""

    reqId: int
    peer: str
    request: InferenceRequest
    startedAt: float
    endedAt: float
    firstChunkAt: float | None
    lastChunkAt: float | None
    chunksSent: int
    bytesSent: int


def readAnswer(answer: object, reqId: int) -> ImmediateAnswer | Failure:
    """
    What ``answerNow`` returned, as a stream can start with it: texts read
    once into a list (a generator of texts cannot be read twice), and
    whatever goes wrong in reading it the request's failure.
    """
    if isinstance(answer, Failure):
        return answer
    texts: Any
    result: Any
    try:
        texts, result = answer  # type: ignore[misc]  # what it is, is checked here and in sendAnswer
    except Exception:
        return Failure(
            BackendError(f"backend bug: answerNow returned {type(answer).__name__}, not an ImmediateAnswer")
        )
    if type(texts) is not list:
        try:
            texts = list(texts)
        except Exception:
            failure = Failure()
            log.failure("reading the answer to request {req_id} failed", failure, req_id=reqId)
            return failure
    return new_tuple(ImmediateAnswer, (texts, result))  # type: ignore[no-any-return]


def sendAnswer(
    connection: StreamConnection,
    services: StreamServices,
    request: InferenceRequest,
    peer: str,
    answer: object,
    credit: int,
    startedAt: float,
) -> bool:
    """
    Write the whole answer in one write, release the slot and record the
    request; False, having done none of it, when the answer is not the plain
    case: an ``ImmediateAnswer`` of a list of texts and a ``GenerationResult``,
    within the window (the caller hands anything else to a stream).
    """
    if type(answer) is not ImmediateAnswer:
        return False
    texts, result = answer
    if type(texts) is not list or type(result) is not GenerationResult:
        return False
    reqId = request.req_id
    pack = HEADER.pack
    pieces: list[bytes] = []
    size = 0
    try:
        for text in texts:
            if type(text) is not str:
                return False  # bytes, a str subclass...: the stream's writeSequence knows what to make of it
            data = text.encode()  # a lone surrogate raises: the stream replaces it
            if data:  # an empty text is no chunk
                size += len(data)
                pieces += (pack(MAGIC, VERSION, 2, reqId, 0, len(data)), data)
    except Exception:
        return False
    if size > credit:
        return False
    chunks = len(pieces) >> 1
    now = services.clock()
    firstChunkAt = now if chunks else None
    pieces.append(resultFrame(reqId, result, request.options, startedAt, firstChunkAt, now))
    services.admission.release()  # first: a write that raises must not keep the slot
    try:
        connection.sendTerminal(reqId, b"".join(pieces))
    except Exception:  # a transport torn down under us: the client has nothing
        log.failure("writing the answer to request {req_id} failed", req_id=reqId)
        ended: tuple[Any, ...] = (reqId, peer, request, startedAt, now, None, None, 0, 0)
        outcome, ending = "disconnected", None
    else:
        services.counters.answeredAtOnce += 1
        ended = (reqId, peer, request, startedAt, now, firstChunkAt, firstChunkAt, chunks, size)
        outcome, ending = "done", result
    try:
        services.requestEnded(new_tuple(AnsweredRequest, ended), outcome, ending, False, "")
    except Exception:  # as a stream's end: the metrics or the log must not take the connection down
        log.failure("recording the end of request {req_id} failed", req_id=reqId)
    return True
