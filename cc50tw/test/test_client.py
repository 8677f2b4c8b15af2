"""
The client library against the real server protocol over iosim, and
against recorded C++ server bytes.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import ToyBackend
from cc50tw.client import (
    Capabilities,
    CC50ClientProtocol,
    ClientTimeout,
    Completion,
    Response,
    connect,
    generationOptions,
    parseHello,
)
from cc50tw.codec import (
    DoneStats,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    decode_credit,
    decode_infer,
    encode_chunk,
    encode_done,
    encode_error,
    encode_hello,
    encode_infer,
)
from cc50tw.errors import ClientError
from cc50tw.generation import MAX_OPTIONS_BYTES, GenerationOptions, OptionsError
from cc50tw.server import CC50ServerFactory, ServerConfig
from cc50tw.test.fakes import ManualBackend, make_factory
from cc50tw.test.optional import HYPOTHESIS

VECTORS = Path(__file__).parent / "data" / "cc50-v1-captured.json"


class ClientOverIOSimTests(SynchronousTestCase):
    def connect(self, backend: Any = None, **config: Any) -> None:
        factory, clock = make_factory(ManualBackend(), **config)
        self.factory = factory
        self.clock = clock
        factory.backend = backend if backend is not None else ToyBackend(clock, CPUEngine(clock, None), 0)  # type: ignore[arg-type]
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: CC50ClientProtocol(clock), clock=clock
        )

    def test_collectGivesTextAndStats(self) -> None:
        self.connect()
        completion = self.client.infer("four words of prompt", max_tokens=4).collect()
        self.pump.flush()
        result: Completion = self.successResultOf(completion)
        self.assertEqual(result.text, " token" * 4)
        self.assertEqual((result.stats.tokens, result.stats.prompt_tokens), (4, 4))

    def test_concurrentRequestsOnOneConnection(self) -> None:
        self.connect()
        answers = [self.client.infer("p", max_tokens=n).collect() for n in range(1, 30)]
        self.pump.flush()
        for n, answer in enumerate(answers, start=1):
            self.assertEqual(self.successResultOf(answer).text, " token" * n)

    def test_asyncIteration(self) -> None:
        self.connect()
        response = self.client.infer("p", max_tokens=3)
        received: list[str] = []

        async def consume() -> None:
            async for text in response:
                received.append(text)

        consumed = Deferred.fromCoroutine(consume())
        self.pump.flush()
        self.successResultOf(consumed)
        self.assertEqual("".join(received), " token" * 3)

    def test_serverErrorRaisesClientError(self) -> None:
        backend = ManualBackend()
        self.connect(backend)
        answer = self.client.infer("p").collect()
        self.pump.flush()
        self.client.infer("p")  # duplicate ids are impossible through the library: ids increase
        self.pump.flush()
        backend.streams[1].fail(ValueError("boom"))
        self.pump.flush()
        error = self.failureResultOf(answer, ClientError).value
        self.assertEqual(error.code, ErrorCode.BACKEND_ERROR)
        self.assertIn("boom", error.message)
        self.flushLoggedErrors(ValueError)

    def test_cancel(self) -> None:
        backend = ManualBackend()
        self.connect(backend)
        response = self.client.infer("p")
        answer = response.collect()
        self.pump.flush()
        response.cancel()
        self.pump.flush()
        self.assertTrue(backend.streams[1].cancelled)
        self.assertEqual(self.failureResultOf(answer, ClientError).value.code, ErrorCode.CANCELLED)

    def test_smallWindowIsRefilledAsTextIsConsumed(self) -> None:
        self.connect()
        answer = self.client.infer("p", max_tokens=500, credit_bytes=64).collect()
        for _ in range(2000):
            if not self.pump.pump():
                break
        self.assertEqual(self.successResultOf(answer).text, " token" * 500)
        self.assertGreater(self.factory.creditPauses, 0)

    def test_readerThatStopsReadingStopsGranting(self) -> None:
        backend = ManualBackend()
        self.connect(backend)
        response = self.client.infer("p", credit_bytes=12)  # nobody consumes it
        self.pump.flush()
        stream = backend.streams[1]
        for _ in range(5):
            stream.write(" token")
        self.pump.flush()
        self.assertTrue(stream.paused)

        received: list[str] = []

        async def consume() -> None:
            async for text in response:
                received.append(text)

        consumed = Deferred.fromCoroutine(consume())
        self.pump.flush()
        self.assertFalse(stream.paused)
        stream.finish(generated_tokens=5)
        self.pump.flush()
        self.successResultOf(consumed)
        self.assertEqual("".join(received), " token" * 5)

    def test_connectionLostFailsPendingRequests(self) -> None:
        self.connect(ManualBackend())
        answer = self.client.infer("p").collect()
        self.pump.flush()
        self.client.transport.loseConnection()
        self.pump.flush()
        self.failureResultOf(answer, ConnectionDone)
        late = self.client.infer("after close").collect()
        self.failureResultOf(late, ConnectionDone)


class ClientAgainstRecordedBytesTests(SynchronousTestCase):
    """Bytes from the C++ server and hand-made frames, fed straight to the client."""

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.client = CC50ClientProtocol()
        self.client.makeConnection(self.transport)

    def test_cppErrorThenDoneIsOneFailure(self) -> None:
        if not VECTORS.exists():
            self.skipTest(f"{VECTORS} is missing")
        vectors = json.loads(VECTORS.read_text())["cpp_server_error_reply"]
        # The vector's req_id is 0x1234567890ABCDEF; make the client expect it.
        self.client._ids = iter([0x1234567890ABCDEF])  # type: ignore[assignment]
        response = self.client.infer("p")
        answer = response.collect()
        for chunk in vectors["hex"]:
            self.client.dataReceived(bytes.fromhex(chunk))
        error = self.failureResultOf(answer, ClientError).value
        self.assertEqual(error.message, vectors["err_text"])
        self.assertEqual(self.client.inFlight, 0)

    def test_cppShortDoneIsAccepted(self) -> None:
        response = self.client.infer("p")
        answer = response.collect()
        self.client.dataReceived(encode_chunk(1, b" token") + encode_done(1, DoneStats(1, 1234)))
        result = self.successResultOf(answer)
        self.assertEqual(result.text, " token")
        self.assertEqual((result.stats.tokens, result.stats.elapsed_us, result.stats.prompt_tokens), (1, 1234, None))

    def test_characterSplitAcrossChunksIsReassembled(self) -> None:
        answer = self.client.infer("p").collect()
        euro = "€".encode()
        self.client.dataReceived(encode_chunk(1, euro[:1]) + encode_chunk(1, euro[1:]) + encode_done(1, DoneStats(1, 1)))
        self.assertEqual(self.successResultOf(answer).text, "€")

    def test_creditGrantsAreBatched(self) -> None:
        self.client.infer("p", credit_bytes=100).collect()
        self.transport.clear()
        for _ in range(20):
            self.client.dataReceived(encode_chunk(1, b"0123456789"))
        frames = list(FrameDecoder(1 << 20).feed(self.transport.value()))
        grants = [decode_credit(f) for f in frames if f.type == MessageType.REQ_CREDIT]  # type: ignore[arg-type]
        self.assertEqual(grants, [50, 50, 50, 50])


class ReceivePathTests(SynchronousTestCase):
    """
    The client's fast path for chunk frames (issue 7): straight from the
    decoder to the response, decoded without an incremental decoder while
    chunks hold whole characters.  It must give what the plain path gave.
    """

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.client = CC50ClientProtocol()
        self.client.makeConnection(self.transport)

    def test_queuedTextIsDecodedAlike(self) -> None:
        response = self.client.infer("p")
        euro = "€".encode()
        self.client.dataReceived(encode_chunk(1, b"a" + euro[:2]) + encode_chunk(1, euro[2:] + b"\xff b"))
        self.client.dataReceived(encode_done(1, DoneStats(2, 1)))
        self.assertEqual(self.successResultOf(response.collect()).text, "a€\ufffd b")

    def test_closingFromACallbackStopsDelivery(self) -> None:
        """As before the fast path: once the application closes, later chunks of that read are not delivered."""
        response = self.client.infer("p")
        seen: list[str] = []

        def onChunk(text: str) -> None:
            seen.append(text)
            self.client.close()

        response.onChunk = onChunk
        self.client.dataReceived(encode_chunk(1, b"one") + encode_chunk(1, b"two") + encode_chunk(1, b"three"))
        self.assertEqual(seen, ["one"])

    def test_chunkFramesFedByHandStillArrive(self) -> None:
        response = self.client.infer("p")
        answer = response.collect()
        self.client.frameReceived(Frame(MessageType.RESP_CHUNK, 1, 0, b"hand"))
        self.client.dataReceived(encode_done(1, DoneStats(1, 1)))
        self.assertEqual(self.successResultOf(answer).text, "hand")
        self.assertEqual((response.chunkFrames, response.chunkBytes), (1, 4))


# Property tests need hypothesis, so they are defined only where it imports
# (cc50tw.test.optional says why).
if HYPOTHESIS.available:
    from hypothesis import given
    from hypothesis import strategies as st

    class ReceivePathPropertyTests(SynchronousTestCase):
        """ReceivePathTests' fast path, for any bytes cut anywhere."""

        @given(st.lists(st.binary(max_size=12), max_size=30), st.integers(1, 80))
        def test_textIsWhatAnIncrementalDecoderGives(self, payloads: list[bytes], piece: int) -> None:
            """Any bytes (split characters, invalid UTF-8) cut anywhere: the same text, replacements included."""
            client = CC50ClientProtocol()  # a fresh one for each example
            client.makeConnection(StringTransport())
            answer = client.infer("p").collect()
            stream = b"".join(encode_chunk(1, p) for p in payloads) + encode_done(1, DoneStats(len(payloads), 1))
            for start in range(0, len(stream), piece):
                client.dataReceived(stream[start : start + piece])
            reference = codecs.getincrementaldecoder("utf-8")("replace")
            expected = "".join(reference.decode(p) for p in payloads) + reference.decode(b"", final=True)
            self.assertEqual(self.successResultOf(answer).text, expected)

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)


def sentFrames(transport: StringTransport) -> list[Frame]:
    frames = [f for f in FrameDecoder(1 << 20).feed(transport.value()) if isinstance(f, Frame)]
    transport.clear()
    return frames


class CancelTests(SynchronousTestCase):
    """
    Issue 16, item 13: after ``cancel()`` the application gets nothing more.
    Before, ``async for`` went on through every chunk already buffered (about
    100 of them in the reported case) before CANCELLED arrived.
    """

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.client = CC50ClientProtocol()
        self.client.makeConnection(self.transport)

    def bufferedResponse(self, chunks: int = 100) -> Response:
        response = self.client.infer("p")
        self.client.dataReceived(b"".join(encode_chunk(1, b" token") for _ in range(chunks)))
        self.transport.clear()
        return response

    def test_iterationRaisesAtOnceAfterCancel(self) -> None:
        response = self.bufferedResponse()
        received: list[str] = []

        async def consume() -> None:
            async for text in response:
                received.append(text)
                response.cancel()

        consumed = Deferred.fromCoroutine(consume())
        error = self.failureResultOf(consumed, ClientError).value
        self.assertEqual((error.code, error.req_id), (ErrorCode.CANCELLED, 1))
        self.assertEqual(received, [" token"])  # the other 99 buffered chunks are dropped
        self.assertEqual([(f.type, f.req_id) for f in sentFrames(self.transport)], [(MessageType.REQ_CANCEL, 1)])

    def test_waitingIteratorWakesOnCancel(self) -> None:
        """A consumer waiting for the next chunk is not left waiting for the server's reply."""
        response = self.client.infer("p")
        step = Deferred.fromCoroutine(response.__anext__())
        self.assertNoResult(step)
        response.cancel()
        self.assertEqual(self.failureResultOf(step, ClientError).value.code, ErrorCode.CANCELLED)

    def test_nothingMoreIsDeliveredOrGranted(self) -> None:
        response = self.client.infer("p", credit_bytes=12)
        seen: list[str] = []
        response.onChunk = seen.append
        self.client.dataReceived(encode_chunk(1, b"before"))
        self.transport.clear()  # REQ_INFER, and the credit "before" earned back
        response.cancel()
        response.cancel()  # twice: one REQ_CANCEL
        self.client.dataReceived(encode_chunk(1, b"after, in flight") * 3)
        self.assertEqual(seen, ["before"])
        self.assertEqual([f.type for f in sentFrames(self.transport)], [MessageType.REQ_CANCEL])

    def test_doneIsTheServersVerdict(self) -> None:
        """CANCELLED from the server fails ``done``; the request is then forgotten."""
        response = self.bufferedResponse(3)
        response.cancel()
        done = response.done
        self.assertNoResult(done)
        self.client.dataReceived(encode_error(1, ErrorCode.CANCELLED, "cancelled"))
        self.assertEqual(self.failureResultOf(done, ClientError).value.code, ErrorCode.CANCELLED)
        self.assertEqual(self.client.inFlight, 0)

    def test_doneThatWonTheRaceKeepsItsStats(self) -> None:
        """The server finished before the cancel arrived: ``done`` has the statistics, iteration still stops."""
        response = self.bufferedResponse(3)
        response.cancel()
        self.client.dataReceived(encode_done(1, DoneStats(3, 99)))
        self.assertEqual(self.successResultOf(response.done).tokens, 3)
        step = Deferred.fromCoroutine(response.__anext__())
        self.assertEqual(self.failureResultOf(step, ClientError).value.code, ErrorCode.CANCELLED)

    def test_cancelAfterDoneDropsTheBufferWithoutAFrame(self) -> None:
        response = self.bufferedResponse(5)
        self.client.dataReceived(encode_done(1, DoneStats(5, 1)))
        response.cancel()
        self.assertEqual(sentFrames(self.transport), [])
        step = Deferred.fromCoroutine(response.__anext__())
        self.failureResultOf(step, ClientError)


class RequestTimeoutTests(SynchronousTestCase):
    """Issue 16, item 4: ``infer(timeout=)`` on a fake clock, against the real server protocol."""

    def setUp(self) -> None:
        self.backend = ManualBackend()
        factory, self.clock = make_factory(self.backend)
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: CC50ClientProtocol(self.clock), clock=self.clock
        )

    def requestTimers(self) -> list[object]:
        """The client's timers (the server's idle timer runs on the same clock)."""
        calls = self.clock.getDelayedCalls()
        return [call for call in calls if isinstance(getattr(getattr(call, "func", None), "__self__", None), Response)]

    def test_timeoutCancelsOnTheWireAndFails(self) -> None:
        response = self.client.infer("p", timeout=5)
        answer = response.done
        self.pump.flush()
        self.clock.advance(4.9)
        self.assertNoResult(answer)
        self.clock.advance(0.1)
        error = self.failureResultOf(answer, ClientTimeout).value
        self.assertIsInstance(error, ClientError)  # handlers of every ClientError see it too
        self.assertEqual((error.code, error.req_id, error.seconds), (ErrorCode.TIMEOUT, 1, 5))
        self.assertEqual(str(error), "no answer within 5 s")
        self.assertEqual(self.client.inFlight, 0)
        self.pump.flush()
        self.assertTrue(self.backend.streams[1].cancelled)  # REQ_CANCEL reached the server
        self.assertEqual(self.requestTimers(), [])

    def test_iterationRaisesTheTimeout(self) -> None:
        response = self.client.infer("p", timeout=2)
        received: list[str] = []

        async def consume() -> None:
            async for text in response:
                received.append(text)

        consumed = Deferred.fromCoroutine(consume())
        self.pump.flush()
        self.backend.streams[1].write(" partial")
        self.pump.flush()
        self.clock.advance(2)
        self.failureResultOf(consumed, ClientTimeout)
        self.assertEqual(received, [" partial"])

    def test_answerInTimeLeavesNoTimer(self) -> None:
        answer = self.client.infer("p", timeout=5).collect()
        self.pump.flush()
        self.backend.streams[1].write(" ok")
        self.backend.streams[1].finish(generated_tokens=1)
        self.pump.flush()
        self.assertEqual(self.successResultOf(answer).text, " ok")
        self.assertEqual(self.requestTimers(), [])
        self.clock.advance(10)
        self.assertEqual(self.backend.streams[1].cancelled, False)

    def test_nonPositiveTimeoutIsRefused(self) -> None:
        self.assertRaises(ValueError, self.client.infer, "p", timeout=0)

    def test_nanOrInfiniteTimeoutIsAValueErrorNamingIt(self) -> None:
        """NaN slipped past ``<= 0`` and failed as an ``AssertionError`` inside Twisted's ``callLater``."""
        for bad in (float("nan"), float("inf"), -1.5):
            error = self.assertRaises(ValueError, self.client.infer, "p", timeout=bad)
            self.assertIn("timeout must be a positive, finite number of seconds", str(error))
        self.assertEqual(self.client.inFlight, 0)  # refused before anything was sent

    def test_nonNumberTimeoutIsATypeErrorNamingIt(self) -> None:
        """``timeout="5"`` raised a bare ``TypeError`` from ``<``, naming neither the argument nor the type."""
        for bad in ("5", True, [5]):
            error = self.assertRaises(TypeError, self.client.infer, "p", timeout=bad)  # type: ignore[arg-type]
            self.assertIn("timeout must be a number of seconds or None", str(error))
            self.assertIn(type(bad).__name__, str(error))


class ConnectTimeoutTests(SynchronousTestCase):
    """Issue 16, item 4: ``connect(timeout=)`` on a fake reactor."""

    def test_badTimeoutIsRefusedBeforeConnecting(self) -> None:
        reactor = MemoryReactorClock()
        self.assertRaises(ValueError, connect, reactor, "127.0.0.1:9", timeout=float("nan"))
        self.assertRaises(TypeError, connect, reactor, "127.0.0.1:9", timeout="5")  # type: ignore[arg-type]
        self.assertEqual(reactor.tcpClients, [])

    def test_connectingTimesOut(self) -> None:
        reactor = MemoryReactorClock()
        connecting = connect(reactor, "127.0.0.1:9", timeout=3)
        self.assertNoResult(connecting)
        reactor.advance(3)
        error = self.failureResultOf(connecting, ClientTimeout).value
        self.assertEqual(str(error), "no connection to 127.0.0.1:9 within 3 s")
        self.assertTrue(reactor.connectors[0].stoppedConnecting)  # type: ignore[attr-defined]

    def test_unansweredHelloTimesOutAndCloses(self) -> None:
        reactor = MemoryReactorClock()
        connecting = connect(reactor, "127.0.0.1:9", b"secret", timeout=3)
        transport = StringTransport()
        protocol = reactor.tcpClients[0][2].buildProtocol(None)
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), encode_hello(b"secret"))
        reactor.advance(3)
        self.failureResultOf(connecting, ClientTimeout)
        self.assertTrue(transport.disconnecting)

    def test_connectedInTimeLeavesNoTimer(self) -> None:
        reactor = MemoryReactorClock()
        connecting = connect(reactor, "127.0.0.1:9", b"secret", timeout=3)
        protocol = reactor.tcpClients[0][2].buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(encode_hello(b"cc50tw/test"))
        client = self.successResultOf(connecting)
        self.assertIs(client.clock, reactor)  # request timeouts run on the same reactor
        self.assertEqual(reactor.getDelayedCalls(), [])


class GenerationOptionsTests(SynchronousTestCase):
    """
    Issue 15, item 2: ``infer``'s generation options, on the wire as the
    protocol says, and checked before anything is sent.
    """

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.client = CC50ClientProtocol()
        self.client.makeConnection(self.transport)

    def test_optionsAreEncodedOnTheWire(self) -> None:
        self.client.infer(
            "Hi", 8, model="m", temperature=0, top_p=0.9, top_k=40, min_p=0.05, seed=7, stop=["\n", "END"],
            system="be brief", repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, extra={"n_probs": 2},
        )  # fmt: skip
        [frame] = sentFrames(self.transport)
        request = decode_infer(frame)
        self.assertEqual((request.prompt, request.max_tokens), ("Hi", 8))
        self.assertEqual(
            request.options,
            GenerationOptions(
                model="m", temperature=0, top_p=0.9, top_k=40, min_p=0.05, seed=7, stop=("\n", "END"),
                system="be brief", repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                extra={"n_probs": 2},
            ),
        )  # fmt: skip

    def test_theProtocolDocumentsExample(self) -> None:
        """docs/protocol.md's example frame, byte for byte."""
        self.client._ids = iter([9])  # type: ignore[assignment]
        self.client.infer("Hi", 8, temperature=0, stop="\n")
        expected = bytes.fromhex(
            "43433530 0100 0100 0900000000000000 00000000 31000000 08000000 00000000 02000000 4869 1f000000"
        ) + b'{"temperature":0,"stop":["\\n"]}'
        self.assertEqual(self.transport.value(), expected)

    def test_noOptionsIsTheCppClientsFrame(self) -> None:
        self.client.infer("Hi", 8, 100, options=GenerationOptions())
        self.assertEqual(self.transport.value(), encode_infer(1, "Hi", 8, 100))

    def test_keywordsOverrideTheOptionsObject(self) -> None:
        self.client.infer("p", options=GenerationOptions(model="a", seed=1), seed=2)
        [frame] = sentFrames(self.transport)
        self.assertEqual(decode_infer(frame).options, GenerationOptions(model="a", seed=2))

    def test_badValuesRaiseBeforeAnythingIsSent(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"top_p": 2}, "'top_p' must be between 0 and 1"),
            ({"temperature": "hot"}, "'temperature' must be a number"),
            ({"temperature": float("nan")}, "'temperature' must be a number"),
            ({"top_k": 1.5}, "'top_k' must be an integer"),
            ({"seed": True}, "'seed' must be an integer"),
            ({"model": 3}, "'model' must be a string"),
            ({"stop": [""]}, "'stop' must be a list of non-empty strings"),
            ({"stop": ["x"] * 17}, "'stop' takes at most 16"),
            ({"stop": 5}, "'stop' must be a string or a list of strings"),
            ({"extra": [1]}, "'extra' must be a JSON object"),
            ({"system": "x" * MAX_OPTIONS_BYTES}, f"at most {MAX_OPTIONS_BYTES}"),
        ]
        for options, named in cases:
            error = self.assertRaises(OptionsError, self.client.infer, "p", **options)
            self.assertIsInstance(error, ValueError)
            self.assertIn(named, str(error))
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.client.inFlight, 0)
        self.client.infer("p")
        self.assertEqual(sentFrames(self.transport)[0].req_id, 1)  # no id was spent on the refused ones

    def test_notAnOptionsObjectIsATypeError(self) -> None:
        self.assertRaises(TypeError, self.client.infer, "p", options={"seed": 1})
        self.assertEqual(self.transport.value(), b"")

    def test_generationOptionsAlone(self) -> None:
        """What the command line uses to check its flags before connecting."""
        self.assertEqual(generationOptions(stop="x", model="m"), GenerationOptions(model="m", stop=("x",)))
        self.assertEqual(generationOptions(), GenerationOptions())
        self.assertRaises(OptionsError, generationOptions, min_p=-1)

    def test_finishReasonIsSurfaced(self) -> None:
        answer = self.client.infer("p", model="m").collect()
        self.client.dataReceived(encode_chunk(1, b"hi") + encode_done(1, DoneStats(1, 5, 1, 1, 2, "stop")))
        completion = self.successResultOf(answer)
        self.assertEqual((completion.text, completion.finish_reason), ("hi", "stop"))
        self.assertEqual(completion.stats.finish_reason, "stop")

    def test_noFinishReasonFromAnOlderServer(self) -> None:
        answer = self.client.infer("p", model="m").collect()
        self.client.dataReceived(encode_done(1, DoneStats(1, 5, 1, 1, 2)))
        self.assertIsNone(self.successResultOf(answer).finish_reason)


class GenerationOptionsOverIOSimTests(SynchronousTestCase):
    """The options against the real server protocol and the toy backend, which honours only ``model``."""

    def setUp(self) -> None:
        clock = MemoryReactorClock()
        backend = ToyBackend(clock, CPUEngine(clock, None), 0)  # type: ignore[arg-type]
        factory = CC50ServerFactory(backend, ServerConfig(), clock)
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: CC50ClientProtocol(clock), clock=clock
        )

    def test_modelIsHonouredAndTheFinishReasonComesBack(self) -> None:
        answer = self.client.infer("p", max_tokens=2, model="toy").collect()
        plain = self.client.infer("p", max_tokens=2).collect()
        self.pump.flush()
        completion = self.successResultOf(answer)
        self.assertEqual((completion.text, completion.finish_reason), (" token token", "length"))
        self.assertIsNone(self.successResultOf(plain).finish_reason)  # no options: the C++ form of DONE

    def test_unknownModelIsTheServersBadRequest(self) -> None:
        answer = self.client.infer("p", model="other").collect()
        self.pump.flush()
        error = self.failureResultOf(answer, ClientError).value
        self.assertEqual(error.code, ErrorCode.BAD_REQUEST)
        self.assertEqual(error.message, "unknown model 'other'; this server serves 'toy'")

    def test_optionTheBackendCannotHonourIsRefused(self) -> None:
        answer = self.client.infer("p", temperature=0.5).collect()
        self.pump.flush()
        error = self.failureResultOf(answer, ClientError).value
        self.assertEqual(error.code, ErrorCode.BAD_REQUEST)
        self.assertIn("'temperature'", error.message)

    def test_capabilities(self) -> None:
        asked = self.client.capabilities()
        self.pump.flush()
        capabilities = self.successResultOf(asked)
        self.assertTrue(capabilities.name.startswith("cc50tw/"), capabilities.name)
        self.assertEqual((capabilities.options, capabilities.models), (("model",), ("toy",)))
        self.assertEqual(capabilities.details, {"options": ["model"], "models": ["toy"]})
        # Asked once per connection: the second answer is the first one's.
        self.successResultOf(self.client.capabilities())
        self.assertEqual(self.pump.pump(), False)


class CapabilitiesTests(SynchronousTestCase):
    """``capabilities()`` and ``parseHello`` against hand-made HELLO replies, old and new."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.transport = StringTransport()
        self.client = CC50ClientProtocol(self.clock)
        self.client.makeConnection(self.transport)

    def test_parseHello(self) -> None:
        self.assertEqual(
            parseHello(b'cc50tw/0.1.0\n{"options":["model","seed"],"models":["a","b"],"later":1}'),
            Capabilities("cc50tw/0.1.0", ("model", "seed"), ("a", "b"), {"options": ["model", "seed"], "models": ["a", "b"], "later": 1}),
        )  # fmt: skip

    def test_olderServerSaysOnlyItsName(self) -> None:
        for payload in (b"cc50tw/0.0.9", b"cc50tw/0.0.9\n", b"cc50tw/0.0.9\nnot json", b"cc50tw/0.0.9\n[1]"):
            capabilities = parseHello(payload)
            self.assertEqual(capabilities, Capabilities("cc50tw/0.0.9"), payload)
            self.assertEqual((capabilities.options, capabilities.models), ((), None))

    def test_oddValuesAreNotSaid(self) -> None:
        capabilities = parseHello(b'x\n{"options":"model","models":[1]}')
        self.assertEqual((capabilities.options, capabilities.models), ((), None))
        self.assertEqual(parseHello(b'x\n{"models":[]}').models, ())  # said, and empty

    def test_sendsHelloWithAnEmptyToken(self) -> None:
        asked = self.client.capabilities()
        self.assertEqual(self.transport.value(), encode_hello(b""))
        self.client.dataReceived(encode_hello(b"cc50tw/0.0.9"))
        self.assertEqual(self.successResultOf(asked), Capabilities("cc50tw/0.0.9"))

    def test_callsWhileAHelloIsOnItsWayShareIt(self) -> None:
        first, second = self.client.capabilities(), self.client.capabilities()
        self.assertEqual(self.transport.value(), encode_hello(b""))  # one HELLO
        self.client.dataReceived(encode_hello(b'n\n{"models":["m"]}'))
        self.assertEqual(self.successResultOf(first).models, ("m",))
        self.assertEqual(self.successResultOf(second).models, ("m",))

    def test_authenticatedConnectionAlreadyKnows(self) -> None:
        self.client.hello(b"secret")
        self.client.dataReceived(encode_hello(b'cc50tw/0.1.0\n{"options":["model"],"models":["toy"]}'))
        self.transport.clear()
        self.assertEqual(self.successResultOf(self.client.capabilities()).models, ("toy",))
        self.assertEqual(self.transport.value(), b"")

    def test_timeout(self) -> None:
        asked = self.client.capabilities(timeout=2)
        self.clock.advance(2)
        self.assertEqual(str(self.failureResultOf(asked, ClientTimeout).value), "no answer to HELLO within 2 s")
        self.client.dataReceived(encode_hello(b"late"))  # nobody is waiting any more; no error
        self.assertEqual(self.client.helloPayload, b"late")

    def test_refusedOrLostConnectionFailsIt(self) -> None:
        asked = self.client.capabilities()
        self.client.dataReceived(encode_error(0, ErrorCode.UNAUTHORIZED, "authentication required"))
        self.assertEqual(self.failureResultOf(asked, ClientError).value.code, ErrorCode.UNAUTHORIZED)
        lost = self.client.capabilities()
        self.client.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(lost, ConnectionDone)
        self.failureResultOf(self.client.capabilities(), ConnectionDone)
