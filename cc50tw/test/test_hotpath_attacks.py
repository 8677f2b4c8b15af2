"""
Attacks on the request hot path of issue 18a: a whole frame read straight to
its handler (``CC50ServerProtocol.dataReceived``), ``_answerAtOnce`` taking the
slot and calling ``answerNow`` itself, ``sendAnswer``'s one loop,
``stream.resultFrame``, ``Admission.release``'s shortcut, and the metrics that
keep a record of each finished request until they fold it into the series
(``ServerMetrics.requestEnded``).

Written by an adversarial review of that change: the tests for retention,
late figures and writes after a stream's end failed against its first version
(the record then held the request itself, and its figures were worked out at
the fold); the record is now scalars read at the request's end.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cc50tw.admission import Admission
from cc50tw.codec import (
    ErrorCode,
    MessageType,
    decode_done,
    encode_cancel,
    encode_credit,
    encode_frame,
    encode_hello,
    encode_infer,
)
from cc50tw.generation import GenerationOptions
from cc50tw.interfaces import GenerationResult, ImmediateAnswer, InferenceRequest
from cc50tw.server import CC50ServerFactory
from cc50tw.test import fakes
from cc50tw.test.fakes import (
    Connection,
    ManualBackend,
    chunks_text,
    error_code,
    make_factory,
    terminal_frames,
)


class ImmediateBackend(fakes.ImmediateBackend):
    """The shared double, honouring ``seed`` and ``model`` so requests can carry options."""

    generationOptions: frozenset[str] = frozenset({"seed", "model"})


class ModelBackend(ImmediateBackend):
    """Serves ``served`` and routes a request that names no model to ``default`` (as the HTTP backend does)."""

    def __init__(self, answer: Any, served: list[str], default: str | None = None) -> None:
        super().__init__(answer)
        self.served = served
        self.default = default

    def models(self) -> list[str]:
        return list(self.served)

    def modelFor(self, options: GenerationOptions) -> str | None:
        return options.model if options.model is not None else self.default


def sample(factory: CC50ServerFactory, name: str, **labels: str) -> float:
    value = factory.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def one(texts: list[str], prompt: int = 1, generated: int | None = None) -> ImmediateAnswer:
    return ImmediateAnswer(texts, GenerationResult(prompt, len(texts) if generated is None else generated))


class EndedByHand:
    """An ``EndedRequest`` as a caller of ``CC50ServerFactory.requestEnded`` may hand one over: ``endedAt`` unset."""

    def __init__(self, reqId: int, startedAt: float) -> None:
        self.reqId = reqId
        self.peer = "test"
        self.request = InferenceRequest(reqId, "p", 1)
        self.startedAt = startedAt
        self.endedAt: float | None = None
        self.firstChunkAt: float | None = None
        self.lastChunkAt: float | None = None
        self.chunksSent = 0
        self.bytesSent = 0


# ---------------------------------------------------------------------------
# Metrics: records kept until the fold, figures worked out late
# ---------------------------------------------------------------------------


class LateFiguresTests(TestCase):
    """Figures worked out at ``fold`` must be the ones the request ended with."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def test_latencyOfARecordWithoutEndedAtIsTakenAtItsEnd(self) -> None:
        """
        ``EndedRequest.endedAt`` may be None: the clock must then be read when
        the request is recorded, not at the scrape (found in review: with
        --quiet-requests a request that took 1 s was observed as taking as
        long as the scrape was away).
        """
        durations = {}
        for logRequests in (True, False):
            factory, reactor = make_factory(ManualBackend(), log_requests=logRequests)
            ended = EndedByHand(1, reactor.seconds())
            reactor.advance(1.0)
            factory.requestEnded(ended, "done", GenerationResult(1, 1))  # type: ignore[arg-type]
            reactor.advance(99.0)
            durations[logRequests] = sample(factory, "cc50_request_duration_seconds_sum")
        self.assertEqual(durations, {True: 1.0, False: 1.0})

    def test_modelLabelSurvivesABackendSwap(self) -> None:
        """
        ``cc50_model_requests_total`` labels only a model the backend serves;
        that is now checked against ``factory.servedModels`` at the fold, so a
        request served by the backend of the time loses its label when the
        backend is swapped (``factory.backend = ...``) before the scrape.
        Before the change the check was made when the request ended.
        """
        for logRequests in (True, False):
            backend = ModelBackend(one(["x"]), ["m1"])
            factory, _ = make_factory(backend, log_requests=logRequests)
            connection = Connection(factory)
            connection.send(encode_infer(1, "p", 1, options=GenerationOptions(model="m1")))
            self.assertEqual([f.type for f in terminal_frames(connection.received(), 1)], [MessageType.RESP_DONE])
            factory.backend = ManualBackend()  # serves no model
            self.assertEqual(
                sample(factory, "cc50_model_requests_total", model="m1", outcome="done"), 1, f"log_requests={logRequests}"
            )

    def test_modelRoutedByIsTheOneOfTheRequestsEnd(self) -> None:
        """
        With --quiet-requests the model a request was routed by
        (``backend.modelFor``) is asked at the fold, of whatever backend the
        factory has then: a request routed to m1 is counted under m2.  With the
        log on, and before the change, it is asked when the request ends.
        """
        for logRequests in (True, False):
            backend = ModelBackend(one(["x"]), ["m1", "m2"], default="m1")
            factory, _ = make_factory(backend, log_requests=logRequests)
            connection = Connection(factory)
            connection.send(encode_infer(1, "p", 1))
            factory.backend = ModelBackend(one(["x"]), ["m1", "m2"], default="m2")
            counted = (
                sample(factory, "cc50_model_requests_total", model="m1", outcome="done"),
                sample(factory, "cc50_model_requests_total", model="m2", outcome="done"),
            )
            self.assertEqual(counted, (1, 0), f"log_requests={logRequests}")

    def test_quietAndLoggedServersCountAlike(self) -> None:
        """The same requests with the log on and off: the very same series (guards the two recording paths)."""

        def answer(request: InferenceRequest, budget: int) -> Any:
            return {1: one(["ab", "c"], prompt=3), 2: "junk", 3: one(["abcdef"]), 4: None}[request.req_id]

        scraped = []
        for logRequests in (True, False):
            backend = ImmediateBackend(answer)
            factory, reactor = make_factory(backend, log_requests=logRequests, stall_timeout=5.0)
            connection = Connection(factory)
            connection.send(b"".join(encode_infer(n, "p", 1, credit_bytes=3) for n in range(1, 5)))
            reactor.advance(0.5)
            backend.streams[4].write("zz")
            backend.streams[4].finish(prompt_tokens=2, generated_tokens=1)
            reactor.advance(5.0)
            names = [
                ("cc50_requests_total", {"outcome": o}) for o in ("done", "backend_error", "credit_stall")
            ] + [
                (n, {})
                for n in (
                    "cc50_request_duration_seconds_sum",
                    "cc50_request_duration_seconds_count",
                    "cc50_time_to_first_token_seconds_count",
                    "cc50_inter_token_latency_seconds_count",
                    "cc50_generated_tokens_total",
                    "cc50_prompt_tokens_total",
                )
            ]
            scraped.append([sample(factory, name, **labels) for name, labels in names])
        self.assertEqual(scraped[0], scraped[1])

    def test_aRecordThatFailsToFoldDoesNotLogThePrompt(self) -> None:
        """
        A record that cannot be counted is logged with ``{record!r}``; the
        record now holds the request itself, so for an answer sent at once
        (``AnsweredRequest``, a NamedTuple) the error log carries the client's
        whole prompt (up to --max-frame-bytes of it).  Before the change the
        record was the figures alone, and a ``modelFor`` that raised was logged
        as "recording the end of request N failed", prompt-free.
        """
        secret = "SECRET-PROMPT-" + "x" * 64

        class Raising(ModelBackend):
            def modelFor(self, options: GenerationOptions) -> str | None:
                raise ValueError("routing table broken")

        factory, _ = make_factory(Raising(one(["x"]), ["m1"]), log_requests=False)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(1, secret, 1))
            sample(factory, "cc50_requests_total", outcome="done")
        texts = [formatEvent(event) for event in events]
        self.assertTrue(texts, "the broken record should be logged")
        self.assertEqual([text for text in texts if secret in text], [])
        self.flushLoggedErrors(ValueError)


class RetentionTests(TestCase):
    """A finished request must not outlive its end in the metrics' pending records."""

    def streamedAndGone(self, logRequests: bool) -> weakref.ref[Any]:
        backend = ManualBackend()
        factory, _ = make_factory(backend, log_requests=logRequests)
        self.factory = factory
        connection = Connection(factory)
        connection.send(encode_infer(1, "p" * 100_000, 1))
        stream = connection.protocol.streams[1]
        ref = weakref.ref(stream)
        backend.streams[1].write("x")
        backend.streams[1].finish()
        connection.protocol.connectionLost(Failure(Exception("gone")))
        backend.streams.clear()
        del stream, connection, backend
        gc.collect()
        return ref

    def test_endedStreamIsFreedWithTheLogOn(self) -> None:
        """
        With the request log on (the default), nothing of the ended
        ``RequestStream`` (its request and prompt, its connection and that
        connection's transport and decoder buffer) may wait for the next fold
        (found in review: a pending record held the stream itself).
        """
        ref = self.streamedAndGone(True)
        self.assertIsNone(ref(), "the ended RequestStream is still alive (held by factory.metrics)")

    def test_endedStreamIsFreedWithTheLogOff(self) -> None:
        """Same with --quiet-requests: up to FOLD_EVERY-1 streams, and all they hold, live until a scrape."""
        ref = self.streamedAndGone(False)
        self.assertIsNone(ref(), "the ended RequestStream is still alive (held by factory.metrics)")

    def test_promptsOfAnsweredRequestsAreNotKept(self) -> None:
        """
        Prompts of requests answered at once, every connection closed: the
        server keeps none of them.  Now each ``AnsweredRequest`` record (and
        its ``InferenceRequest``, prompt included) is kept until the fold:
        255 requests of --max-frame-bytes (1 MiB) each keep about 255 MiB
        alive on an idle server that nobody scrapes.  Here 16 prompts of
        256 KiB: 4 MiB retained.
        """
        backend = ImmediateBackend(one(["x"]))
        factory, _ = make_factory(backend)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        connection = Connection(factory)
        for n in range(1, 17):
            connection.send(encode_infer(n, chr(0x41 + n) * (256 << 10), 1))
        connection.protocol.connectionLost(Failure(Exception("gone")))
        backend.asked.clear()
        del connection
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(kept, 1 << 20, f"{kept} bytes still held after 16 requests ended and their connection closed")


# ---------------------------------------------------------------------------
# The whole-frame fast path in dataReceived
# ---------------------------------------------------------------------------


class FastPathTests(TestCase):
    """A read that is one whole frame behaves exactly as the receiver's loop would have it."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def served(self, answer: Any = None, **config: Any) -> tuple[CC50ServerFactory, Connection, ImmediateBackend]:
        backend = ImmediateBackend(answer)
        factory, _ = make_factory(backend, **config)
        return factory, Connection(factory), backend

    def test_wholeFrameAfterAPartialOne(self) -> None:
        """A frame split over reads, then a whole one in one read: both answered, in order."""
        factory, connection, _ = self.served(one(["ok"]))
        connection.send(encode_infer(1, "p", 1))  # the decoder exists from here
        second = encode_infer(2, "second", 1)
        connection.send(second[:30])
        connection.send(second[30:])
        connection.send(encode_infer(3, "third", 1))
        frames = connection.received()
        self.assertEqual([f.req_id for f in frames if f.type == MessageType.RESP_DONE], [1, 2, 3])
        self.assertEqual(factory.admission.running, 0)

    def test_wholeFrameWhileAHeaderIsBuffered(self) -> None:
        """A read exactly a frame's size while half a header is buffered is not taken as a frame of its own."""
        factory, connection, backend = self.served(one(["ok"]))
        connection.send(encode_infer(1, "p", 1))
        second, third = encode_infer(2, "abcd", 1), encode_infer(3, "efgh", 1)
        connection.send(second[:10])
        connection.send(second[10:] + third[:10])  # not one frame: the loop must stitch it
        connection.send(third[10:])
        self.assertEqual([r.prompt for r, _ in backend.asked], ["p", "abcd", "efgh"])

    def test_unauthenticatedWholeFrameIsRefused(self) -> None:
        """Before HELLO a whole REQ_INFER read is refused (UNAUTHORIZED), never handed to ``_infer``."""
        factory, connection, backend = self.served(one(["x"]), auth_token=b"t")
        connection.send(encode_frame(MessageType.REQ_CREDIT, 9, b"\0\0\0\0"))  # the decoder exists
        connection.send(encode_infer(1, "p", 1))
        self.assertEqual(backend.asked, [])
        self.assertTrue(connection.transport.disconnecting)

    def test_authenticatedReadOverTheHelloLimit(self) -> None:
        """After HELLO the limit is --max-frame-bytes: a whole 100 KB REQ_INFER read is answered."""
        factory, connection, backend = self.served(one(["x"]), auth_token=b"t")
        connection.send(encode_hello(b"t"))
        connection.send(encode_infer(1, "p" * 100_000, 1))
        self.assertEqual(len(backend.asked), 1)
        self.assertEqual([f.type for f in terminal_frames(connection.received(), 1)], [MessageType.RESP_DONE])

    def test_oversizedWholeFrameIsTooLarge(self) -> None:
        """A whole frame over the limit in one read: TOO_LARGE, as through the loop."""
        factory, connection, backend = self.served(one(["x"]), max_frame_bytes=64)
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(2, "p" * 100, 1))
        terminals = terminal_frames(connection.received(), 2)
        self.assertEqual([error_code(f) for f in terminals], [ErrorCode.TOO_LARGE])
        connection.send(encode_infer(3, "p", 1))  # and the stream is still in step
        self.assertEqual([f.type for f in terminal_frames(connection.received(), 3)], [MessageType.RESP_DONE])

    def test_loweredLimitAppliesToTheNextWholeFrame(self) -> None:
        """``setMaxLength`` lowering the limit: the next whole read over it is refused."""
        factory, connection, backend = self.served(one(["x"]))
        connection.send(encode_infer(1, "p", 1))
        connection.protocol.setMaxLength(32)
        connection.send(encode_infer(2, "p" * 64, 1))
        self.assertEqual([error_code(f) for f in terminal_frames(connection.received(), 2)], [ErrorCode.TOO_LARGE])
        self.assertEqual(len(backend.asked), 1)

    def test_reqIdZeroInOneRead(self) -> None:
        """REQ_INFER on req_id 0 as a whole read: connection-level BAD_REQUEST, closed."""
        factory, connection, backend = self.served(one(["x"]))
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(0, "p", 1))
        frames = connection.received()
        self.assertEqual([error_code(f) for f in frames if f.req_id == 0], [ErrorCode.BAD_REQUEST])
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(len(backend.asked), 1)

    def test_optionsInOneRead(self) -> None:
        """REQ_INFER with options as one read: honoured ones reach the backend, others are refused."""
        factory, connection, backend = self.served(one(["x"]))
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(2, "p", 1, options=GenerationOptions(seed=7)))
        connection.send(encode_infer(3, "p", 1, options=GenerationOptions(temperature=0.5)))
        frames = connection.received()
        self.assertEqual(backend.asked[1][0].options, GenerationOptions(seed=7))
        done = decode_done(terminal_frames(frames, 2)[0])
        self.assertIsNotNone(done.finish_reason)  # a client that sent options reads the finish reason
        self.assertEqual([error_code(f) for f in terminal_frames(frames, 3)], [ErrorCode.BAD_REQUEST])

    def test_wholeFrameWhileReadingPausedIsHeld(self) -> None:
        """A whole frame delivered after reading paused waits, and is handled on resume, in order."""
        factory, connection, backend = self.served(one(["x"]))
        connection.send(encode_infer(1, "p", 1))
        connection.protocol.pauseProducing()
        connection.send(encode_infer(2, "p", 1))
        connection.send(encode_cancel(2))
        self.assertEqual(len(backend.asked), 1)
        connection.protocol.resumeProducing()
        frames = connection.received()
        self.assertEqual([f.type for f in terminal_frames(frames, 2)], [MessageType.RESP_DONE])
        self.assertEqual(len(backend.asked), 2)

    def test_wholeFrameWhileDisconnectingIsIgnored(self) -> None:
        """A whole frame read while the transport is disconnecting is not handled."""
        factory, connection, backend = self.served(one(["x"]))
        connection.send(encode_infer(1, "p", 1))
        connection.transport.disconnecting = True
        connection.send(encode_infer(2, "p", 1))
        self.assertEqual(len(backend.asked), 1)

    def test_otherTypesInOneRead(self) -> None:
        """HELLO, a server-only type and an unknown type, each a whole read, as through the loop."""
        factory, connection, _ = self.served(one(["x"]))
        connection.send(encode_infer(1, "p", 1))
        connection.received()
        connection.send(encode_hello())
        connection.send(encode_frame(99, 5))
        connection.send(encode_frame(MessageType.RESP_DONE, 6))
        frames = connection.received()
        self.assertEqual([f.type for f in frames], [MessageType.HELLO])
        self.assertEqual(factory.counters.framesDropped, 2)


# ---------------------------------------------------------------------------
# _answerAtOnce: the slot, re-entrance, odd answers
# ---------------------------------------------------------------------------


class AnswerAtOnceTests(TestCase):
    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def served(
        self, answer: Callable[..., Any] | Any, **config: Any
    ) -> tuple[CC50ServerFactory, Connection, ImmediateBackend]:
        backend = ImmediateBackend(answer)
        factory, _ = make_factory(backend, **config)
        return factory, Connection(factory), backend

    def test_cancelSentFromInsideAnswerNow(self) -> None:
        """``answerNow`` delivering REQ_CANCEL for its own request (one whole read): CANCELLED, slot free."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            holder[0].send(encode_cancel(request.req_id))
            return one(["x"])

        factory, connection, _ = self.served(answer, max_concurrency=1)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(2, "p", 1))
        frames = connection.received()
        self.assertEqual([error_code(f) for f in terminal_frames(frames, 1)], [ErrorCode.CANCELLED])
        self.assertEqual([error_code(f) for f in terminal_frames(frames, 2)], [ErrorCode.CANCELLED])
        self.assertEqual(factory.admission.running, 0)

    def test_creditSentFromInsideAnswerNow(self) -> None:
        """Credit granted while ``answerNow`` runs widens the window the answer is sent in."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            holder[0].send(encode_credit(request.req_id, 10))
            return one(["abcdefgh"])

        factory, connection, _ = self.served(answer)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        connection.send(encode_infer(2, "p", 1, credit_bytes=2))
        frames = connection.received()
        for reqId in (1, 2):
            self.assertEqual(chunks_text(frames, reqId), "abcdefgh")
            self.assertEqual([f.type for f in terminal_frames(frames, reqId)], [MessageType.RESP_DONE])

    def test_anotherRequestFromInsideAnswerNow(self) -> None:
        """``answerNow`` delivering a second REQ_INFER: both answered once, no slot leaked."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            if request.req_id == 1:
                holder[0].send(encode_infer(2, "inner", 1))
            return one([f"r{request.req_id}"])

        factory, connection, backend = self.served(answer, max_concurrency=2)
        holder.append(connection)
        connection.send(encode_infer(9, "p", 1))
        connection.send(encode_infer(1, "p", 1))
        frames = connection.received()
        for reqId in (1, 2):
            self.assertEqual(chunks_text(frames, reqId), f"r{reqId}")
            self.assertEqual(len(terminal_frames(frames, reqId)), 1)
        self.assertEqual(factory.admission.running, 0)

    def test_closeFromInsideAnswerNow(self) -> None:
        """``answerNow`` closing the connection: nothing written for it, slot free, recorded as disconnected."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            if request.req_id == 2:
                holder[0].protocol.close()
            return one(["x"])

        factory, connection, _ = self.served(answer, max_concurrency=1)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(2, "p", 1))
        self.assertEqual(terminal_frames(connection.received(), 2), [])
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="disconnected"), 1)

    def test_answerNowNoneWithAQueuedWaiter(self) -> None:
        """
        One slot, a stream queued for it on another connection: an ``answerNow``
        that says None gives the slot to the queued request, and this request
        queues behind it (fairness), nothing leaked.
        """
        backend = ImmediateBackend(None)
        factory, _ = make_factory(backend, max_concurrency=1)
        first, second = Connection(factory), Connection(factory)
        first.send(encode_infer(1, "p", 1))  # streams: holds the slot
        second.send(encode_infer(2, "p", 1))  # answerNow is not even asked: busy, so it queues
        self.assertEqual(factory.admission.queued, 1)
        backend.streams[1].finish()  # slot to request 2
        self.assertIn(2, backend.streams)
        first.send(encode_infer(3, "p", 1))  # busy again: queued
        backend.streams[2].finish()
        backend.streams[3].finish()
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(factory.admission.queued, 0)
        first.received()
        second.received()
        for connection, reqId in ((first, 1), (second, 2), (first, 3)):
            self.assertEqual(len(terminal_frames(connection.frames, reqId)), 1)

    def test_answerNowRaisingFreesTheSlot(self) -> None:
        """``answerNow`` that raises: BACKEND_ERROR, the slot back, the next request answered at once."""

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            if request.req_id == 1:
                raise RuntimeError("boom")
            return one(["ok"])

        factory, connection, _ = self.served(answer, max_concurrency=1)
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(2, "p", 1))
        frames = connection.received()
        self.assertEqual([error_code(f) for f in terminal_frames(frames, 1)], [ErrorCode.BACKEND_ERROR])
        self.assertEqual(chunks_text(frames, 2), "ok")
        self.assertEqual(factory.admission.running, 0)
        self.flushLoggedErrors(RuntimeError)

    def test_listSubclassAndTupleAnswers(self) -> None:
        """Answers that are not the plain case (a list subclass of texts, a plain pair) are sent whole, once."""

        class Texts(list):  # type: ignore[type-arg]
            pass

        answers = {1: ImmediateAnswer(Texts(["a", "b"]), GenerationResult(1, 2)), 2: (["c"], GenerationResult(1, 1))}
        factory, connection, _ = self.served(lambda request, budget: answers[request.req_id])
        connection.send(encode_infer(1, "p", 1))
        connection.send(encode_infer(2, "p", 1))
        frames = connection.received()
        self.assertEqual((chunks_text(frames, 1), chunks_text(frames, 2)), ("ab", "c"))
        self.assertEqual([len(terminal_frames(frames, n)) for n in (1, 2)], [1, 1])
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 2)

    def test_answerSentAtOnceIsLoggedAndCountedOnce(self) -> None:
        """The plain case: one log line, one count, figures equal to the RESP_DONE's."""
        factory, connection, _ = self.served(one(["ab", "", "c"], prompt=5, generated=2))
        with capturedLogs() as events:
            connection.send(encode_infer(1, "p", 1))
        frames = connection.received()
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK] * 2 + [MessageType.RESP_DONE])
        done = decode_done(frames[-1])
        self.assertEqual((done.tokens, done.prompt_tokens, done.generated_tokens), (2, 5, 2))
        lines = [formatEvent(e) for e in events if formatEvent(e).startswith("request 1 from ")]
        self.assertEqual(len(lines), 1)
        self.assertIn("tokens=2 prompt_tokens=5 bytes=3", lines[0])
        self.assertEqual(sample(factory, "cc50_generated_tokens_total"), 2)
        self.assertEqual(sample(factory, "cc50_inter_token_latency_seconds_count"), 1)


# ---------------------------------------------------------------------------
# Admission.release's shortcut
# ---------------------------------------------------------------------------


class AdmissionReleaseTests(TestCase):
    def test_releaseAdmitsQueuedWaitersInOrder(self) -> None:
        """With waiters queued the shortcut is not taken: each release admits the next, in order."""
        admission = Admission(1, 10)
        self.assertTrue(admission.tryAcquire())
        admitted: list[int] = []
        for n in range(3):
            admission.acquire().addCallback(lambda _, n: admitted.append(n), n)
        admission.release()
        self.assertEqual((admitted, admission.running, admission.queued), ([0], 1, 2))
        admission.release()
        admission.release()
        admission.release()
        self.assertEqual((admitted, admission.running, admission.queued), ([0, 1, 2], 0, 0))
        self.assertTrue(admission.tryAcquire())

    def test_nestedReleasesDuringAdmission(self) -> None:
        """A waiter that releases inside its admission (a backend done at once): every slot accounted for."""
        admission = Admission(2, 100)
        self.assertTrue(admission.tryAcquire())
        self.assertTrue(admission.tryAcquire())
        done: list[int] = []

        def admittedThenDone(_: object, n: int) -> None:
            done.append(n)
            admission.release()

        for n in range(50):
            admission.acquire().addCallback(admittedThenDone, n)
        admission.release()
        self.assertEqual(done, list(range(50)))
        self.assertEqual((admission.running, admission.queued), (1, 0))
        admission.release()
        self.assertEqual(admission.running, 0)

    def test_cancelledWaiterIsNotAdmitted(self) -> None:
        """A waiter that left the queue is skipped; the slot goes back when nobody else waits."""
        admission = Admission(1, 10)
        self.assertTrue(admission.tryAcquire())
        waiting: Deferred[object] = admission.acquire()
        waiting.addErrback(lambda _: None)
        waiting.cancel()
        admission.release()
        self.assertEqual((admission.running, admission.queued), (0, 0))

    def test_overReleaseStillCaught(self) -> None:
        """A release with every slot free is a bug, caught as DeferredSemaphore catches it (not a token too many)."""
        admission = Admission(1, 10)
        with self.assertRaises(AssertionError):
            admission.release()
        self.assertEqual(admission.running, 0)


# ---------------------------------------------------------------------------
# Found while attacking, present before the change too
# ---------------------------------------------------------------------------


class MutatedAfterEndTests(TestCase):
    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def test_streamWrittenToAfterItsEndCountsAsItEnded(self) -> None:
        """
        A transport that reports the loss synchronously from ``write`` (here:
        the first chunk's) ends the stream in the middle of ``writeSequence``'s
        careful path, which goes on sending (and counting) the next text.  With
        --quiet-requests the figures are now read from the stream at the fold,
        so they include that chunk: an inter-token observation the logged
        server (and the pre-change tree) does not make.
        """
        counts = {}
        for logRequests in (True, False):
            backend = ManualBackend()
            factory, _ = make_factory(backend, log_requests=logRequests)
            connection = Connection(factory)
            connection.send(encode_infer(1, "p", 1, credit_bytes=3))
            write = connection.transport.write
            lost: list[bool] = []

            def losingWrite(data: bytes, write: Any = write, protocol: Any = connection.protocol, lost: Any = lost) -> None:
                write(data)
                if not lost:
                    lost.append(True)
                    protocol.connectionLost(Failure(Exception("reset by peer")))

            connection.transport.write = losingWrite  # type: ignore[method-assign]
            backend.streams[1].sink.writeSequence(["ab", "cd"])
            counts[logRequests] = (
                sample(factory, "cc50_requests_total", outcome="disconnected"),
                sample(factory, "cc50_inter_token_latency_seconds_count"),
            )
        self.assertEqual(counts[False], counts[True])


class PreExistingTests(TestCase):
    def test_creditGrantedInsideAnswerNowThatStreams(self) -> None:
        """
        Pre-existing (fails on 6264b23 too): REQ_CREDIT delivered while
        ``answerNow`` runs is kept in ``_answeringCredit`` and added to a local
        ``credit`` that is thrown away when ``answerNow`` returns None; the
        stream then starts with the REQ_INFER's window alone and the grant is lost.
        """
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> None:
            holder[0].send(encode_credit(request.req_id, 10))
            return None

        backend = ImmediateBackend(answer)
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        backend.streams[1].write("abcdefgh")
        backend.streams[1].finish()
        frames = connection.received()
        self.assertEqual(chunks_text(frames, 1), "abcdefgh")
