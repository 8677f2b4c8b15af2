"""
Answers sent at once (``IImmediateBackend``, ``cc50tw.immediate``).

Every rule a streamed request keeps must hold for an answer sent at once, and
every answer the plain path cannot send must end through the usual lifecycle:
the tests try the ways an ``answerNow`` can go wrong.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import SYNCHRONOUS_BATCH_TOKENS, ToyBackend
from cc50tw.codec import (
    ErrorCode,
    Frame,
    MessageType,
    decode_done,
    encode_cancel,
    encode_credit,
    encode_infer,
)
from cc50tw.generation import GenerationOptions
from cc50tw.interfaces import GenerationResult, IImmediateBackend, ImmediateAnswer, InferenceRequest
from cc50tw.server import CC50ServerFactory
from cc50tw.test.fakes import (
    Connection,
    ImmediateBackend,
    ManualBackend,
    RecordingSink,
    ServedConnection,
    error_code,
    make_factory,
    terminal_frames,
)


def sample(factory: CC50ServerFactory, name: str, **labels: str) -> float:
    value = factory.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def chunkPayloads(frames: list[Frame], reqId: int) -> list[bytes]:
    return [f.payload for f in frames if f.type == MessageType.RESP_CHUNK and f.req_id == reqId]


class PlainAnswerTests(TestCase):
    def test_answerIsOneWriteOfChunksThenDone(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["a", "", "bc"], GenerationResult(3, 2, "stop")))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        writes: list[bytes] = []
        write = connection.transport.write

        def recordWrite(data: bytes) -> None:
            writes.append(data)
            write(data)

        connection.transport.write = recordWrite  # type: ignore[method-assign]
        connection.send(encode_infer(5, "hello world", 8))
        frames = connection.received()
        self.assertEqual(len(writes), 1)
        self.assertEqual(chunkPayloads(frames, 5), [b"a", b"bc"])  # an empty text is no chunk
        self.assertEqual([f.type for f in frames], [MessageType.RESP_CHUNK] * 2 + [MessageType.RESP_DONE])
        done = decode_done(frames[-1])
        self.assertEqual((done.tokens, done.prompt_tokens, done.generated_tokens), (2, 3, 2))
        self.assertIsNone(done.finish_reason)  # only a client that sent options reads it
        self.assertEqual(backend.streams, {})  # generate() was never called
        self.assertEqual(connection.protocol.streams, {})
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(backend.asked[0][0], InferenceRequest(5, "hello world", 8))
        self.assertEqual(backend.asked[0][1], 262144)  # the default credit window is the budget

    def test_finishReasonForClientsThatSentOptions(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1, "length")))
        backend.generationOptions = frozenset({"seed"})
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1, options=GenerationOptions(seed=3)))
        [done] = terminal_frames(connection.received(), 1)
        self.assertEqual(decode_done(done).finish_reason, "length")

    def test_budgetIsTheClientsCreditWindow(self) -> None:
        backend = ImmediateBackend()
        factory, _ = make_factory(backend)
        Connection(factory).send(encode_infer(1, "p", 4, credit_bytes=17))
        self.assertEqual(backend.asked[0][1], 17)

    def test_recordedAsEveryRequestIs(self) -> None:
        """Metrics and the request log see an answer sent at once like a streamed one."""
        backend = ImmediateBackend(ImmediateAnswer(["ab", "c"], GenerationResult(4, 2, "stop")))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(9, "p", 2))
        self.assertEqual(sample(factory, "cc50_requests_total", outcome="done"), 1)
        self.assertEqual(sample(factory, "cc50_generated_tokens_total"), 2)
        self.assertEqual(sample(factory, "cc50_prompt_tokens_total"), 4)
        self.assertEqual(sample(factory, "cc50_time_to_first_token_seconds_count"), 1)
        self.assertEqual(sample(factory, "cc50_request_duration_seconds_count"), 1)
        lines = [formatEvent(e) for e in events if "request 9 " in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn(": done backend=immediate tokens=2 prompt_tokens=4 bytes=3 ", lines[0])
        self.assertIn("finish=stop", lines[0])

    def test_answersAtOnceAreCounted(self) -> None:
        """``cc50_answered_at_once_total``: how many requests took the one-write path, and only those."""
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1) + encode_infer(2, "p", 1))
        backend.answer = ImmediateAnswer(["abcdef"], GenerationResult(1, 1))  # over the window: a stream sends it
        connection.send(encode_infer(3, "p", 1, credit_bytes=2))
        backend.answer = None
        connection.send(encode_infer(4, "p", 1))
        self.assertEqual(sample(factory, "cc50_answered_at_once_total"), 2)

    def test_logShowsCountsAsTheWireDoes(self) -> None:
        """A backend's float counts are whole numbers in the log line, as in RESP_DONE and the metrics."""
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(3.0, 2.0)))  # type: ignore[arg-type]
        factory, _ = make_factory(backend)
        with capturedLogs() as events:
            Connection(factory).send(encode_infer(1, "p", 1))
        [line] = [formatEvent(e) for e in events if "request 1 " in formatEvent(e)]
        self.assertIn(" tokens=2 prompt_tokens=3 ", line)

    def test_emptyAnswerHasNoFirstToken(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer([], GenerationResult(1, 0, "length")))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        with capturedLogs() as events:
            connection.send(encode_infer(2, "p", 1))
        frames = connection.received()
        self.assertEqual([f.type for f in frames], [MessageType.RESP_DONE])
        self.assertEqual(decode_done(frames[0]).ttft_us, 0)
        self.assertEqual(sample(factory, "cc50_time_to_first_token_seconds_count"), 0)
        self.assertTrue(any("ttft_ms=none" in formatEvent(e) for e in events))

    def test_elapsedIsMeasuredAcrossAnswerNow(self) -> None:
        factory, reactor = make_factory(ManualBackend())

        def slowAnswer(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            reactor.advance(0.25)  # the factory's clock is the fake reactor's
            return ImmediateAnswer(["x"], GenerationResult(1, 1))

        factory.backend = ImmediateBackend(slowAnswer)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1))
        done = decode_done(connection.received()[-1])
        self.assertEqual((done.elapsed_us, done.ttft_us), (250000, 250000))

    def test_backendSwapIsFollowed(self) -> None:
        """Setting ``factory.backend`` (as tests and plugins do) asks the new backend, or none."""
        factory, _ = make_factory(ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1))))
        manual = ManualBackend()
        factory.backend = manual
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1))
        self.assertIn(1, manual.streams)

    def test_reqIdFreeAgainAtOnce(self) -> None:
        """Nothing stays in flight: the same req_id may be used again straight away."""
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(3, "p", 1) + encode_infer(3, "p", 1))
        frames = connection.received()
        self.assertEqual([f.type for f in terminal_frames(frames, 3)], [MessageType.RESP_DONE] * 2)


class NotThePlainCaseTests(TestCase):
    """Answers the one-write path does not take still end in exactly one terminal frame."""

    def test_noneStreamsThroughGenerate(self) -> None:
        backend = ImmediateBackend(None)
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1))
        self.assertIn(1, backend.streams)
        self.assertEqual(factory.admission.running, 1)
        backend.streams[1].write("hi")
        backend.streams[1].finish()
        self.assertEqual(connection.received()[-1].type, MessageType.RESP_DONE)
        self.assertEqual(factory.admission.running, 0)

    def test_answerOverTheWindowWaitsForCredit(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["abc", "déf"], GenerationResult(1, 2)))  # 7 bytes
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 2, credit_bytes=4))
        frames = connection.received()
        self.assertEqual(chunkPayloads(frames, 1), [b"abc", b"d"])  # "é" is not cut in two
        self.assertEqual(terminal_frames(frames, 1), [])
        self.assertEqual(factory.admission.running, 0)  # the backend is done: its slot is free
        self.assertIn(1, connection.protocol.streams)
        connection.send(encode_credit(1, 1))
        self.assertEqual(connection.received(), [])  # one byte is half of "é"
        connection.send(encode_credit(1, 2))
        frames = connection.received()
        self.assertEqual(chunkPayloads(frames, 1), ["éf".encode()])
        self.assertEqual([f.type for f in frames][-1], MessageType.RESP_DONE)
        self.assertEqual(connection.protocol.streams, {})

    def test_heldAnswerStallsOutLikeAnyOther(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["abcdef"], GenerationResult(1, 1)))
        factory, reactor = make_factory(backend, stall_timeout=5.0)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        reactor.advance(5.0)
        frames = connection.received()
        self.assertEqual(error_code(terminal_frames(frames, 1)[0]), ErrorCode.CREDIT_STALL)

    def test_heldAnswerCanBeCancelled(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["abcdef"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2) + encode_cancel(1))
        terminals = terminal_frames(connection.received(), 1)
        self.assertEqual([error_code(f) for f in terminals], [ErrorCode.CANCELLED])

    def test_heldAnswerKeepsTheDeadline(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["abcdef"], GenerationResult(1, 1)))
        factory, reactor = make_factory(backend, max_request_seconds=2.0, stall_timeout=60.0)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1, credit_bytes=2))
        reactor.advance(2.0)
        self.assertEqual(error_code(terminal_frames(connection.received(), 1)[0]), ErrorCode.TIMEOUT)

    def test_raisingIsABackendError(self) -> None:
        def broken(request: InferenceRequest, budget: int) -> ImmediateAnswer:
            raise RuntimeError("cache corrupt")

        backend = ImmediateBackend(broken)
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1))
        terminals = terminal_frames(connection.received(), 1)
        self.assertEqual([error_code(f) for f in terminals], [ErrorCode.BACKEND_ERROR])
        self.assertIn(b"cache corrupt", terminals[0].payload)
        self.assertEqual(factory.admission.running, 0)
        self.assertEqual(sample(factory, "cc50_backend_errors_total", kind="backend_error"), 1)
        self.assertEqual(backend.streams, {})  # not retried through generate: it may have done work
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)  # answerNow's, then the stream's

    def test_oddResultsStillEndInOneDone(self) -> None:
        """A plain pair, float counts, a tuple of texts: the stream's rules make sense of them."""
        for answer, expected in [
            (ImmediateAnswer(["x"], (2, 1)), (1, 2)),  # type: ignore[arg-type]
            (ImmediateAnswer(["x"], GenerationResult(2.0, 1.0)), (1, 2)),  # type: ignore[arg-type]
            ((("x", "y"), GenerationResult(1, 2)), (2, 1)),
            (ImmediateAnswer(iter(["x"]), GenerationResult(1, 1)), (1, 1)),  # type: ignore[arg-type]
        ]:
            factory, _ = make_factory(ImmediateBackend(answer))
            connection = Connection(factory)
            connection.send(encode_infer(1, "p", 1))
            terminals = terminal_frames(connection.received(), 1)
            self.assertEqual([f.type for f in terminals], [MessageType.RESP_DONE], answer)
            done = decode_done(terminals[0])
            self.assertEqual((done.generated_tokens, done.prompt_tokens), expected)
            self.assertEqual(factory.admission.running, 0)

    def test_unusableAnswersAreBackendErrors(self) -> None:
        for answer in [
            ImmediateAnswer([b"bytes"], GenerationResult(1, 1)),  # type: ignore[list-item]
            ImmediateAnswer([None], GenerationResult(1, 1)),  # type: ignore[list-item]
            "not an answer",
            ImmediateAnswer(["x"], "not a result"),  # type: ignore[arg-type]
        ]:
            factory, _ = make_factory(ImmediateBackend(answer))
            connection = Connection(factory)
            connection.send(encode_infer(1, "p", 1))
            terminals = terminal_frames(connection.received(), 1)
            self.assertEqual([error_code(f) for f in terminals], [ErrorCode.BACKEND_ERROR], answer)
            self.assertEqual(factory.admission.running, 0)
            self.assertEqual(connection.protocol.streams, {})
        self.flushLoggedErrors()

    def test_loneSurrogatesAreReplaced(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["a\ud800b"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1))
        self.assertEqual(chunkPayloads(connection.received(), 1), [b"a?b"])


class WhenNotAskedTests(TestCase):
    """``answerNow`` is asked only when a request would start at once anyway."""

    def test_notAskedWhileOthersHoldEverySlot(self) -> None:
        backend = ImmediateBackend(None)
        factory, _ = make_factory(backend, max_concurrency=1)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 1))  # streams, holding the one slot
        backend.answer = ImmediateAnswer(["x"], GenerationResult(1, 1))
        connection.send(encode_infer(2, "p", 1))
        self.assertEqual(len(backend.asked), 1)
        self.assertEqual(terminal_frames(connection.received(), 2), [])  # queued behind request 1
        backend.streams[1].finish()
        self.assertIn(2, backend.streams)  # admitted from the queue: it streams

    def test_notAskedWhileTheTransportIsPaused(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.protocol.pauseProducing()
        connection.protocol.frameReceived(Frame(MessageType.REQ_INFER, 1, 0, encode_infer(1, "p", 1)[24:]))
        self.assertEqual(backend.asked, [])
        self.assertIn(1, backend.streams)

    def test_notAskedWhileDraining(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        factory.draining = True
        connection.send(encode_infer(1, "p", 1))
        self.assertEqual(backend.asked, [])
        self.assertEqual(error_code(terminal_frames(connection.received(), 1)[0]), ErrorCode.SHUTTING_DOWN)

    def test_notAskedForRefusedRequests(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["x"], GenerationResult(1, 1)))
        factory, _ = make_factory(backend, max_tokens_limit=4)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 5) + encode_infer(2, "p", 1, options=GenerationOptions(seed=1)))
        self.assertEqual(backend.asked, [])
        codes = [error_code(f) for f in connection.received()]
        self.assertEqual(codes, [ErrorCode.TOO_LARGE, ErrorCode.BAD_REQUEST])


class FlowTests(TestCase):
    """On a transport that fills (``BoundedTransport``), answers sent at once keep the connection's rules."""

    def test_clientThatNeverReadsStopsBeingRead(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["x" * 1000], GenerationResult(1, 1)))
        factory, _ = make_factory(backend)
        served = ServedConnection(factory, bufferSize=4096)
        served.send(b"".join(encode_infer(n, "p", 1) for n in range(1, 201)))
        # The transport paused the connection after a few answers: reading stopped,
        # the rest of the requests wait unparsed, and memory stays bounded.
        self.assertTrue(served.protocol.transportPaused)
        self.assertTrue(served.protocol.readingPaused)
        self.assertLess(len(backend.asked), 20)
        self.assertLess(len(served.transport.io.getvalue()), 4096 + 1100)  # answers do not pile up
        for _ in range(200):
            if len(served.terminals(200)):
                break
            served.read(4096)  # a slow reader: every request is answered, in order
        done = [f.req_id for f in served.frames if f.type == MessageType.RESP_DONE]
        self.assertEqual(done, list(range(1, 201)))


class ToyAnswerTests(TestCase):
    """The toy answers at once exactly what its stream would have sent."""

    def toy(self, iters: int = 0) -> ToyBackend:
        reactor = MemoryReactorClock()
        return ToyBackend(reactor, CPUEngine(reactor, None), iters)  # type: ignore[arg-type]  # no pool: no work

    def test_sameAnswerAsItsStream(self) -> None:
        request = InferenceRequest(1, "three word prompt", 5)
        toy = self.toy()
        answer = toy.answerNow(request, 1000)
        assert answer is not None
        sink = RecordingSink()
        results: list[GenerationResult] = []
        self.toy().generate(request, sink).addCallback(results.append)
        self.assertEqual(list(answer.texts), sink.chunks)
        self.assertEqual(answer.result, results[0])
        self.assertEqual(toy.tokens_emitted, 5)

    def test_streamsWhatIsNotFree(self) -> None:
        self.assertIsNone(self.toy(iters=1).answerNow(InferenceRequest(1, "p", 1), 1000))
        toy = self.toy()
        self.assertIsNone(toy.answerNow(InferenceRequest(1, "p", SYNCHRONOUS_BATCH_TOKENS + 1), 1 << 20))
        self.assertIsNone(toy.answerNow(InferenceRequest(1, "p", 3), 17))  # 18 bytes of answer
        self.assertIsNotNone(toy.answerNow(InferenceRequest(1, "p", 3), 18))
        self.assertEqual(toy.tokens_emitted, 3)

    def test_longToyRequestsStillStream(self) -> None:
        factory, _ = make_factory(self.toy())
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", SYNCHRONOUS_BATCH_TOKENS + 1))
        self.assertIn(1, connection.protocol.streams)  # the rest waits for the next reactor turn

    def test_toyStreamedNeverAnswersAtOnce(self) -> None:
        """``--toy-streamed``: the toy as a backend with ``generate`` alone, to measure the streaming path."""
        from twisted.internet import reactor

        from cc50tw.backends.toy import build

        options = {"toy-iters": 0, "toy-device": "cpu", "toy-grid": 8, "toy-block": 256}
        self.assertTrue(IImmediateBackend.providedBy(build(options, reactor)))
        streamed = build({**options, "toy-streamed": 1}, reactor)
        self.assertFalse(IImmediateBackend.providedBy(streamed))
        self.assertFalse(IImmediateBackend.providedBy(build({**options, "toy-iters": 5}, reactor)))  # never ready
        factory, _ = make_factory(streamed)
        self.assertIsNone(factory.answerNow)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 3))
        frames = connection.received()
        self.assertEqual(chunkPayloads(frames, 1), [b" token"] * 3)
        self.assertEqual([f.type for f in terminal_frames(frames, 1)], [MessageType.RESP_DONE])


class WindowSmallerThanACharacterTests(TestCase):
    """A window smaller than the next character: refused by the client, named by the server."""

    def test_stallSaysTheCharacterDoesNotFit(self) -> None:
        backend = ImmediateBackend(ImmediateAnswer(["h", "é"], GenerationResult(1, 2)))
        factory, reactor = make_factory(backend, stall_timeout=5.0)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 2, credit_bytes=1))
        connection.send(encode_credit(1, 1))  # what a client granting what it reads sends: 1 byte again
        reactor.advance(5.0)
        frames = connection.received()
        self.assertEqual(chunkPayloads(frames, 1), [b"h"])
        [error] = terminal_frames(frames, 1)
        self.assertEqual(error_code(error), ErrorCode.CREDIT_STALL)
        self.assertIn(b"the next character of this answer is 2 bytes and the window has had 1", error.payload)

    def test_clientRefusesSuchWindows(self) -> None:
        from cc50tw.client import CC50ClientProtocol

        client = CC50ClientProtocol()
        for credit in (1, 2, 3):
            self.assertRaises(ValueError, client.infer, "p", 1, credit)
