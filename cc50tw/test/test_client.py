"""
The client library against the real server protocol over iosim, and
against recorded C++ server bytes.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import ToyBackend
from cc50tw.client import CC50ClientProtocol, Completion
from cc50tw.codec import (
    DoneStats,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    decode_credit,
    encode_chunk,
    encode_done,
)
from cc50tw.errors import ClientError
from cc50tw.test.fakes import ManualBackend, make_factory

VECTORS = Path(__file__).parent / "data" / "cc50-v1-captured.json"


class ClientOverIOSimTests(SynchronousTestCase):
    def connect(self, backend: Any = None, **config: Any) -> None:
        factory, clock = make_factory(ManualBackend(), **config)
        self.factory = factory
        self.clock = clock
        factory.backend = backend if backend is not None else ToyBackend(clock, CPUEngine(clock, None), 0)  # type: ignore[arg-type]
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), CC50ClientProtocol, clock=clock
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

    @given(st.lists(st.binary(max_size=12), max_size=30), st.integers(1, 80))
    def test_textIsWhatAnIncrementalDecoderGives(self, payloads: list[bytes], piece: int) -> None:
        """Any bytes (split characters, invalid UTF-8) cut anywhere: the same text, replacements included."""
        self.setUp()
        answer = self.client.infer("p").collect()
        stream = b"".join(encode_chunk(1, p) for p in payloads) + encode_done(1, DoneStats(len(payloads), 1))
        for start in range(0, len(stream), piece):
            self.client.dataReceived(stream[start : start + piece])
        reference = codecs.getincrementaldecoder("utf-8")("replace")
        expected = "".join(reference.decode(p) for p in payloads) + reference.decode(b"", final=True)
        self.assertEqual(self.successResultOf(answer).text, expected)

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
