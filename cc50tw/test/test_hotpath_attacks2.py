"""
Second adversarial review of the request hot path of issue 18a (after
5e47aa1): the metrics' scalar records (``ServerMetrics.requestEnded``,
``fold``, ``requestFigures``), the log line read from the same record
(``CC50ServerFactory.requestEnded``), the credit ``_answerAtOnce`` returns,
and ``writeSequence`` after a stream's end.

Tests marked "pre-existing" failed on 6264b23 too.  Every test here failed
or passed as its docstring says against 5e47aa1, and all pass since the fixes:
counts made whole numbers (at most ``MAX_COUNT``) at the request's end, one
reading of its end for the log and the metrics, a request sent from inside
another's ``answerNow`` asked in turn (``_answerAtOnce`` keeps the outer
one's frames aside), and a ``modelFor`` that raises or returns what is not a
str costing the label alone.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from prometheus_client import generate_latest
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cc50tw.codec import ErrorCode, MessageType, encode_cancel, encode_credit, encode_infer
from cc50tw.generation import GenerationOptions
from cc50tw.interfaces import GenerationResult, ImmediateAnswer, InferenceRequest
from cc50tw.metrics import FOLD_EVERY
from cc50tw.server import CC50ServerFactory
from cc50tw.test.fakes import Connection, ManualBackend, chunks_text, error_code, make_factory, terminal_frames
from cc50tw.test.test_hotpath_attacks import EndedByHand, ImmediateBackend, ModelBackend, one, sample

SERIES: list[tuple[str, dict[str, str]]] = [
    ("cc50_requests_total", {"outcome": "done"}),
    ("cc50_requests_total", {"outcome": "disconnected"}),
    ("cc50_requests_total", {"outcome": "cancelled"}),
    ("cc50_request_duration_seconds_sum", {}),
    ("cc50_request_duration_seconds_count", {}),
    ("cc50_time_to_first_token_seconds_count", {}),
    ("cc50_time_to_first_token_seconds_sum", {}),
    ("cc50_inter_token_latency_seconds_count", {}),
    ("cc50_generated_tokens_total", {}),
    ("cc50_prompt_tokens_total", {}),
    ("cc50_model_requests_total", {"model": "m1", "outcome": "done"}),
]


def scrape(factory: CC50ServerFactory) -> list[float]:
    return [sample(factory, name, **labels) for name, labels in SERIES]


def requestEvents(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if "latency_ms" in event and "req_id" in event]


class Count:
    """A token count as a lazy backend may report one: it converts to int, and holds what it counted from."""

    def __init__(self, value: int, source: object) -> None:
        self.value = value
        self.source = source

    def __int__(self) -> int:
        return self.value


class OddResultTests(TestCase):
    """Odd counts in a backend's result: the series, the scrape and the log line."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def streamAndFinish(self, logRequests: bool, result: Any, reqId: int = 1) -> tuple[CC50ServerFactory, list[dict[str, Any]]]:
        backend = ManualBackend()
        factory, reactor = make_factory(backend, log_requests=logRequests)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(reqId, "p", 1))
            reactor.advance(0.25)
            backend.streams[reqId].write("ab")
            reactor.advance(0.25)
            backend.streams[reqId].write("cd")
            backend.streams[reqId].sink.unregisterProducer()
            backend.streams[reqId].done.callback(result)
        return factory, list(events)

    def test_hugeTokenCountDoesNotBreakTheScrape(self) -> None:
        """
        Attacks the counters with a huge int count (10**400): it is an int so it
        skips ``countOrZero`` and ``PlainCounter`` adds it as a Python int; every
        later scrape then raises OverflowError in ``float(value)`` and /metrics is
        down for good (pre-existing).
        """
        for logRequests in (True, False):
            factory, _ = self.streamAndFinish(logRequests, GenerationResult(1, 10**400))
            generate_latest(factory.metrics.registry)  # must not raise

    def test_twoMaxFloatCountsDoNotBreakTheScrape(self) -> None:
        """Same, reached through ``countOrZero``: float 1.7e308 twice sums past what a float holds (pre-existing)."""
        backend = ManualBackend()
        factory, _ = make_factory(backend, log_requests=False)
        connection = Connection(factory)
        for reqId in (1, 2):
            connection.send(encode_infer(reqId, "p", 1))
            backend.streams[reqId].finish(prompt_tokens=1, generated_tokens=1.7e308)  # type: ignore[arg-type]
        generate_latest(factory.metrics.registry)

    def test_oddCountsCountAliveWithTheLogOnAndOff(self) -> None:
        """Floats, None, str, negatives, bool, a GenerationResult subclass: the same series with and without the log."""

        class Result(GenerationResult):
            pass

        results: list[Any] = [
            GenerationResult(2.0, None),  # type: ignore[arg-type]
            GenerationResult("3", -4),  # type: ignore[arg-type]
            GenerationResult(-5, 2),
            GenerationResult(True, 1e30),  # type: ignore[arg-type]
            GenerationResult(float("nan"), float("inf")),  # type: ignore[arg-type]
            Result(4, 5, "stop"),
            (6, 7),
        ]
        for result in results:
            scraped = [scrape(self.streamAndFinish(logRequests, result)[0]) for logRequests in (True, False)]
            self.assertEqual(scraped[0], scraped[1], repr(result))

    def test_logLineTokensAreTheCountedTokens(self) -> None:
        """
        The log line's tokens and prompt_tokens against what the counters
        added for the same request: a negative int count is clamped to 0 for the
        series but logged as is, and clamped in the log only when the other count
        happens not to be an int (pre-existing).
        """
        for result in (GenerationResult(-5, 2), GenerationResult(-5, 2.0), GenerationResult(3, 2)):  # type: ignore[arg-type]
            factory, events = self.streamAndFinish(True, result)
            (event,) = requestEvents(events)
            self.assertEqual(
                (event["tokens"], event["prompt_tokens"]),
                (
                    sample(factory, "cc50_generated_tokens_total"),
                    sample(factory, "cc50_prompt_tokens_total"),
                ),
                repr(result),
            )

    def test_resultNoneWithOutcomeDone(self) -> None:
        """A caller ending a request "done" with no result: counted once, no tokens, log on and off alike."""
        scraped = []
        for logRequests in (True, False):
            factory, reactor = make_factory(ManualBackend(), log_requests=logRequests)
            ended = EndedByHand(1, reactor.seconds())
            ended.endedAt = reactor.seconds() + 0.5
            factory.requestEnded(ended, "done", None)  # type: ignore[arg-type]
            scraped.append(scrape(factory))
        self.assertEqual(scraped[0], scraped[1])
        self.assertEqual(scraped[0][0], 1)

    def test_countObjectsAreNotKeptUntilTheFold(self) -> None:
        """
        Attacks retention through the counts: the record keeps the result's
        counts "as given", so a count object that holds the stream (a lazy
        count) keeps the whole RequestStream, its connection and prompt alive
        until the next fold (up to FOLD_EVERY-1 of them), log on or off.
        """
        for logRequests in (True, False):
            backend = ManualBackend()
            factory, _ = make_factory(backend, log_requests=logRequests)
            connection = Connection(factory)
            connection.send(encode_infer(1, "p" * 100_000, 1))
            stream = connection.protocol.streams[1]
            ref = weakref.ref(stream)
            manual = backend.streams.pop(1)
            manual.sink.unregisterProducer()
            manual.done.callback(GenerationResult(1, Count(3, stream)))  # type: ignore[arg-type]
            connection.protocol.connectionLost(Failure(Exception("gone")))
            del stream, manual, connection
            gc.collect()
            self.assertIsNone(ref(), f"log_requests={logRequests}: the ended stream is held by a pending record")
            self.assertEqual(sample(factory, "cc50_generated_tokens_total"), 3)


class ModelForTests(TestCase):
    """A backend's ``modelFor`` returning odd things, or raising."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def routed(self, routed: Any, served: list[str], logRequests: bool) -> tuple[CC50ServerFactory, list[dict[str, Any]]]:
        class Routing(ModelBackend):
            def modelFor(self, options: GenerationOptions) -> Any:
                if isinstance(routed, Exception):
                    raise routed
                return routed

        factory, _ = make_factory(Routing(one(["x"]), served), log_requests=logRequests)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(1, "p", 1))
        return factory, list(events)

    def test_oddModelsAreCountedWithoutALabel(self) -> None:
        """int, "", a very long name, a model not served: the request counted, no label made up, log on and off alike."""
        for routed in (5, "", "m" * 100_000, "m2", b"m1"):
            scraped = []
            for logRequests in (True, False):
                factory, events = self.routed(routed, ["m1"], logRequests)
                scraped.append(scrape(factory))
                self.assertEqual(factory.metrics.model_requests.values, {}, repr(routed)[:20])
            self.assertEqual(scraped[0], scraped[1], repr(routed)[:20])
            self.assertEqual(scraped[0][0], 1, repr(routed)[:20])

    def test_servedModelRoutedIsLabelled(self) -> None:
        """A served model from ``modelFor``: one label, log on and off alike."""
        for logRequests in (True, False):
            factory, _ = self.routed("m1", ["m1"], logRequests)
            self.assertEqual(sample(factory, "cc50_model_requests_total", model="m1", outcome="done"), 1)

    def test_unhashableModelCostsTheLabelAlone(self) -> None:
        """
        ``modelFor`` returning a list: ``model in servedModels`` raises
        TypeError in ``requestEnded``, so the request is missing from
        cc50_requests_total and every histogram, and with the log on its log
        line is never written (pre-existing).
        """
        for logRequests in (True, False):
            factory, events = self.routed(["m1"], ["m1"], logRequests)
            self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 1, f"log_requests={logRequests}")
            if logRequests:
                self.assertEqual(len(requestEvents(events)), 1)

    def test_raisingModelForCostsTheLabelAlone(self) -> None:
        """
        ``modelFor`` that raises: the request's outcome and latency are lost
        from every series and from the log, not only its model label
        (pre-existing; ``fold``'s "one bad record costs that record" rule is not
        reached since routing now runs at the request's end).
        """
        for logRequests in (True, False):
            factory, events = self.routed(ValueError("routing table broken"), ["m1"], logRequests)
            self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 1, f"log_requests={logRequests}")
            if logRequests:
                self.assertEqual(len(requestEvents(events)), 1)


class FoldTests(TestCase):
    """Batches: exactly FOLD_EVERY, a scrape in the middle, a record that cannot be counted."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def test_exactlyFoldEveryRecordsFoldWithoutAScrape(self) -> None:
        """FOLD_EVERY-1 records stay pending; the FOLD_EVERY-th folds them all, log on and off."""
        for logRequests in (True, False):
            factory, _ = make_factory(ImmediateBackend(one(["x"])), log_requests=logRequests)
            connection = Connection(factory)
            connection.send(b"".join(encode_infer(n, "p", 1) for n in range(1, FOLD_EVERY)))
            self.assertEqual(len(factory.metrics._ended), FOLD_EVERY - 1)
            self.assertEqual(factory.metrics.requests.values, {})
            connection.send(encode_infer(FOLD_EVERY, "p", 1))
            self.assertEqual(factory.metrics._ended, [])
            self.assertEqual(factory.metrics.requests.values, {("done",): FOLD_EVERY})
            self.assertEqual(factory.metrics.generated_tokens.values[()], FOLD_EVERY)

    def test_scrapeInTheMiddleOfABatchCountsEachOnce(self) -> None:
        """A scrape after 100 records, then 200 more (one fold on the way): 300, nothing twice, nothing lost."""
        factory, _ = make_factory(ImmediateBackend(one(["x"])), log_requests=False)
        connection = Connection(factory)
        connection.send(b"".join(encode_infer(n, "p", 1) for n in range(1, 101)))
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 100)
        connection.send(b"".join(encode_infer(n, "p", 1) for n in range(101, 301)))
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 300)
        self.assertEqual(sample(factory, "cc50_request_duration_seconds_count"), 300)
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 300)

    def test_recordThatFailsToFoldCostsItselfAlone(self) -> None:
        """A record whose figures raise at the fold (startedAt None): the others in its batch counted, series consistent."""
        factory, reactor = make_factory(ManualBackend(), log_requests=False)
        for n in range(1, 6):
            ended = EndedByHand(n, reactor.seconds())
            ended.endedAt = reactor.seconds() + 1.0
            if n == 3:
                ended.startedAt = None  # type: ignore[assignment]
            factory.metrics.requestEnded(ended, "done", GenerationResult(1, 1))
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 4)
        self.assertEqual(sample(factory, "cc50_request_duration_seconds_count"), 4)
        self.assertEqual(sample(factory, "cc50_generated_tokens_total"), 4)
        self.flushLoggedErrors(TypeError)

    def test_logAndMetricsReadTheSameEnd(self) -> None:
        """
        An ``EndedRequest`` without ``endedAt``, the log on: the metrics read
        the clock, then the log line reads it again, so the logged latency and
        the observed one differ by whatever the clock moved between the two.
        """
        factory, reactor = make_factory(ManualBackend(), log_requests=True)
        ticks = iter(range(10, 1000))
        factory.clock = lambda: float(next(ticks))
        ended = EndedByHand(1, 0.0)
        with capturedLogs() as events:
            factory.requestEnded(ended, "done", GenerationResult(1, 1))  # type: ignore[arg-type]
        (event,) = requestEvents(list(events))
        self.assertEqual(event["latency_ms"] / 1e3, sample(factory, "cc50_request_duration_seconds_sum"))

    def test_connectionLostWithStreamsInFlightCountsAlike(self) -> None:
        """Three streams ended by the connection's loss (one mid-chunk): the same series with the log on and off."""
        scraped = []
        for logRequests in (True, False):
            backend = ManualBackend()
            factory, reactor = make_factory(backend, log_requests=logRequests)
            connection = Connection(factory)
            connection.send(b"".join(encode_infer(n, "p", 1, credit_bytes=3) for n in (1, 2, 3)))
            reactor.advance(0.5)
            backend.streams[1].write("abcdef")
            backend.streams[2].sink.writeSequence(["a", "b"])
            reactor.advance(0.5)
            connection.protocol.connectionLost(Failure(Exception("gone")))
            scraped.append(scrape(factory))
        self.assertEqual(scraped[0], scraped[1])
        self.assertEqual(scraped[0][1], 3)


class AnswerAtOnceCreditTests(TestCase):
    """The credit window ``_answerAtOnce`` hands back, in every branch."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def served(self, answer: Any, **config: Any) -> tuple[CC50ServerFactory, Connection, ImmediateBackend, Any]:
        backend = ImmediateBackend(answer)
        factory, reactor = make_factory(backend, **config)
        return factory, Connection(factory), backend, reactor

    def test_answerOverTheWidenedWindowStreamsWithIt(self) -> None:
        """Credit granted inside ``answerNow``, the answer over even the widened window: the stream starts with 2+10."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            holder[0].send(encode_credit(request.req_id, 10))
            return one(["abcdefghijklmnop"])

        factory, connection, _, _ = self.served(answer)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        frames = connection.received()
        self.assertEqual(chunks_text(frames, 1), "abcdefghijkl")
        connection.send(encode_credit(1, 4))
        frames = connection.received()
        self.assertEqual(chunks_text(frames, 1), "mnop")
        self.assertEqual([f.type for f in terminal_frames(frames, 1)], [MessageType.RESP_DONE])

    def test_generatorTextsWithCreditGrantedInside(self) -> None:
        """Texts as a generator, credit granted inside ``answerNow``: read once, sent within 2+10, done once."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            holder[0].send(encode_credit(request.req_id, 10))
            return ImmediateAnswer((t for t in ["abcd", "efgh"]), GenerationResult(1, 2))  # type: ignore[arg-type]

        factory, connection, _, _ = self.served(answer)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        frames = connection.received()
        self.assertEqual(chunks_text(frames, 1), "abcdefgh")
        self.assertEqual([f.type for f in terminal_frames(frames, 1)], [MessageType.RESP_DONE])
        self.assertEqual(factory.admission.running, 0)

    def test_failureAfterCreditGranted(self) -> None:
        """``answerNow`` grants credit then raises: one BACKEND_ERROR, slot back, the grant not leaked to the next request."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> Any:
            if request.req_id == 1:
                holder[0].send(encode_credit(1, 10))
                raise RuntimeError("boom")
            return None

        factory, connection, backend, _ = self.served(answer)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        connection.send(encode_infer(2, "p", 1, credit_bytes=2))
        backend.streams[2].write("abcdef")
        frames = connection.received()
        self.assertEqual([error_code(f) for f in terminal_frames(frames, 1)], [ErrorCode.BACKEND_ERROR])
        self.assertEqual(chunks_text(frames, 2), "ab")
        self.assertEqual(factory.admission.running, 1)
        self.flushLoggedErrors(RuntimeError)

    def test_closeInsideAnswerNowThatDeclines(self) -> None:
        """``answerNow`` closes the connection and returns None: no stream, no generate, recorded once, slot free."""
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> None:
            holder[0].protocol.close()
            return None

        factory, connection, backend, _ = self.served(answer)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1))
        self.assertEqual(backend.streams, {})
        self.assertEqual(connection.protocol.streams, {})
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="disconnected"), 1)

    def test_busyKeepsTheRequestsWindow(self) -> None:
        """No free slot: ``answerNow`` not asked, the stream queued with the REQ_INFER's window, then served within it."""
        factory, connection, backend, _ = self.served(one(["never"]), max_concurrency=1)
        other = Connection(factory)
        backend.answer = None
        other.send(encode_infer(9, "p", 1))
        backend.answer = one(["never"])
        connection.send(encode_infer(1, "p", 1, credit_bytes=3))
        self.assertEqual(len(backend.asked), 1)
        backend.streams[9].finish()
        backend.streams[1].write("abcdef")
        self.assertEqual(chunks_text(connection.received(), 1), "abc")

    def test_cancelThenAnotherRequestInsideAnswerNow(self) -> None:
        """
        Inside ``answerNow`` for request 1 the client cancels 1, then sends
        request 2: the nested ``_answerAtOnce`` for 2 consumes 1's
        ``_answeringEnd`` (2 is CANCELLED, never asked to be) and resets
        ``_answering`` to 0, so 1 is answered as if not cancelled (pre-existing).
        """
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            if request.req_id == 1:
                holder[0].send(encode_cancel(1))
                holder[0].send(encode_infer(2, "q", 1))
            return one([f"r{request.req_id}"])

        factory, connection, _, _ = self.served(answer, max_concurrency=2)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1))
        frames = connection.received()
        self.assertEqual([error_code(f) for f in terminal_frames(frames, 1)], [ErrorCode.CANCELLED])
        self.assertEqual(chunks_text(frames, 2), "r2")
        self.assertEqual([f.type for f in terminal_frames(frames, 2)], [MessageType.RESP_DONE])

    def test_creditThenAnotherRequestInsideAnswerNow(self) -> None:
        """
        Inside ``answerNow`` for request 1 (which declines) the client grants 1
        ten bytes, then sends request 2: the nested call adds 1's grant to 2's
        window, and 1's stream starts without it.  On 6264b23 the grant was
        lost; since ``_answerAtOnce`` returns the credit it is handed to 2,
        which is then sent past the window its client granted.
        """
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> None:
            if request.req_id == 1:
                holder[0].send(encode_credit(1, 10))
                holder[0].send(encode_infer(2, "q", 1, credit_bytes=2))
            return None

        factory, connection, backend, _ = self.served(answer, max_concurrency=2)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        backend.streams[1].write("abcdefghijkl")
        backend.streams[2].write("abcdefghijkl")
        frames = connection.received()
        self.assertEqual((chunks_text(frames, 1), chunks_text(frames, 2)), ("abcdefghijkl", "ab"))

    def test_creditAfterANestedRequestStillReachesTheOuterOne(self) -> None:
        """
        Inside ``answerNow`` for 1: request 2 (answered at once), then credit
        for 1. The nested call left ``_answering`` at 0, so the grant is
        dropped as a frame for no request (pre-existing).
        """
        holder: list[Connection] = []

        def answer(request: InferenceRequest, budget: int) -> Any:
            if request.req_id == 1:
                holder[0].send(encode_infer(2, "q", 1))
                holder[0].send(encode_credit(1, 10))
                return one(["abcdefghijkl"])
            return one(["r2"])

        factory, connection, _, _ = self.served(answer, max_concurrency=2)
        holder.append(connection)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        frames = connection.received()
        self.assertEqual(chunks_text(frames, 1), "abcdefghijkl")
        self.assertEqual(factory.counters.framesDropped, 0)


class WriteAfterEndTests(TestCase):
    """``writeSequence`` when a write ends the stream under it."""

    def setUp(self) -> None:
        self.addCleanup(self.flushLoggedErrors)

    def losing(self, logRequests: bool, credit: int) -> tuple[CC50ServerFactory, Any, Connection, ManualBackend]:
        backend = ManualBackend()
        factory, reactor = make_factory(backend, log_requests=logRequests, stall_timeout=5.0)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1, credit_bytes=credit))
        write = connection.transport.write
        protocol = connection.protocol
        lost: list[bool] = []

        def losingWrite(data: bytes) -> None:
            write(data)
            if not lost:
                lost.append(True)
                protocol.connectionLost(Failure(Exception("reset by peer")))

        connection.transport.write = losingWrite  # type: ignore[method-assign]
        return factory, reactor, connection, backend

    def test_fastPathLossLeavesNoTimer(self) -> None:
        """The loss inside the fast path's one write: the stream ended once, no stall timer left behind."""
        for logRequests in (True, False):
            factory, reactor, connection, backend = self.losing(logRequests, 1 << 20)
            backend.streams[1].sink.writeSequence(["ab", "cd"])
            self.assertEqual(reactor.getDelayedCalls(), [])
            self.assertEqual(sample(factory, "cc50_requests_total", outcome="disconnected"), 1)

    def test_carefulPathLossCountsAlike(self) -> None:
        """The loss inside the careful path, three texts over the window: same series with the log on and off."""
        scraped = []
        for logRequests in (True, False):
            factory, reactor, connection, backend = self.losing(logRequests, 3)
            backend.streams[1].sink.writeSequence(["ab", "cd", "ef"])
            self.assertEqual(reactor.getDelayedCalls(), [])
            scraped.append(scrape(factory))
        self.assertEqual(scraped[0], scraped[1])
        self.assertEqual(scraped[0][1], 1)
