"""
Hostile input at the protocol level (issue 8), without sockets:

- fuzzed bytes into the real ``CC50ServerProtocol`` (toy backend, fake clock,
  StringTransport): it never raises, never holds more than one frame's worth
  of input, and writes only well-formed server frames;
- an idle connection whose client reads nothing is cut off after
  ``--stall-timeout`` more, rather than waiting forever for its send buffer to
  drain;
- ``cc50tw.testing.TerminalFrameChecker`` catches every breach of the
  exactly-once terminal frame promise it exists to catch.

The codec's own fuzzing is in ``test_codec.DecoderFuzzTests``; the socket
fuzzing, slow clients and soak against a real ``twistd cc50`` are in
``tests/test_fuzz_real.py``, ``test_slow_clients_real.py`` and
``test_soak_real.py``.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import ToyBackend
from cc50tw.codec import (
    HEADER_SIZE,
    DoneStats,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    encode_chunk,
    encode_done,
    encode_error,
    encode_infer,
)
from cc50tw.server import CC50ServerFactory, ServerConfig
from cc50tw.test.fakes import Connection, ManualBackend, make_factory
from cc50tw.test.optional import HYPOTHESIS
from cc50tw.test.test_codec import SMALL_MAX
from cc50tw.testing import TerminalFrameChecker

SERVER_TYPES = {MessageType.RESP_CHUNK, MessageType.RESP_DONE, MessageType.RESP_ERR, MessageType.HELLO}


def decode_all(data: bytes) -> list[Frame]:
    frames = []
    for item in FrameDecoder(1 << 30).feed(data):
        assert isinstance(item, Frame), item
        frames.append(item)
    return frames


class UnreadIdleConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory, self.clock = make_factory(ManualBackend(), idle_timeout=30.0, stall_timeout=10.0)
        self.connection = Connection(self.factory)
        self.transport = self.connection.transport

    def test_abortedWhenTheBufferNeverDrains(self) -> None:
        """
        loseConnection waits for the send buffer to drain, which a client
        that reads nothing never lets happen; --stall-timeout later the
        connection is aborted.
        """
        self.clock.advance(31)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)  # StringTransport: set by abortConnection only
        self.clock.advance(9)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnected)

    def test_noAbortOnceClosed(self) -> None:
        self.clock.advance(31)
        self.connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertFalse(self.transport.disconnected)


class TerminalFrameCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.checker = TerminalFrameChecker(bytes_per_token=6)

    def feed(self, *frames: bytes) -> None:
        for frame in decode_all(b"".join(frames)):
            self.checker.frame(frame)

    def done(self, req_id: int, tokens: int) -> bytes:
        return encode_done(req_id, DoneStats(tokens, 10, 1, tokens, 5))

    def test_goodRequests(self) -> None:
        self.checker.sent(1, 2)
        self.checker.sent(2, 5)
        self.feed(encode_chunk(1, b" token"), encode_chunk(2, b" tok"), encode_chunk(1, b" token"), self.done(1, 2))
        self.feed(encode_error(2, ErrorCode.CANCELLED, "cancelled"))
        self.assertEqual(self.checker.problems, [])
        self.assertEqual([r.outcome for r in self.checker.requests.values()], ["done", "CANCELLED"])
        self.assertEqual(self.checker.pending(), [])

    def test_chunkAfterDone(self) -> None:
        self.checker.sent(1, 1)
        self.feed(encode_chunk(1, b" token"), self.done(1, 1), encode_chunk(1, b" token"))
        self.assertEqual(len(self.checker.problems), 1)
        self.assertIn("a chunk after its done terminal frame", self.checker.problems[0])

    def test_doneAfterErr(self) -> None:
        """What a C++ server does (ERR, then DONE) is a breach here."""
        self.checker.sent(1, 1)
        self.feed(encode_error(1, ErrorCode.BACKEND_ERROR, "x"), self.done(1, 0))
        self.assertEqual(len(self.checker.problems), 1)
        self.assertIn("second terminal frame", self.checker.problems[0])

    def test_bytesDisagreeWithDone(self) -> None:
        self.checker.sent(1, None)
        self.feed(encode_chunk(1, b" token token"), self.done(1, 3))
        self.assertIn("12 chunk bytes for a DONE of 3 tokens", self.checker.problems[0])

    def test_wrongTokenCount(self) -> None:
        self.checker.sent(1, 4)
        self.feed(encode_chunk(1, b" token" * 3), self.done(1, 3))
        self.assertIn("DONE says 3 tokens, expected 4", self.checker.problems[0])

    def test_moreBytesThanPossible(self) -> None:
        self.checker.sent(1, 1)
        self.feed(encode_chunk(1, b" token!"))
        self.assertIn("more than 6 possible", self.checker.problems[0])

    def test_framesForUnknownRequests(self) -> None:
        self.feed(encode_chunk(9, b"x"), encode_error(0, ErrorCode.BAD_FRAME, "bad magic"))
        self.assertEqual(len(self.checker.problems), 2)

    def test_abandonedRequestsAreNotPending(self) -> None:
        self.checker.sent(1, 100)
        self.feed(encode_chunk(1, b" token"))
        self.assertEqual([r.req_id for r in self.checker.abandon()], [1])
        self.feed(encode_chunk(1, b" token"))  # still in the pipe when we closed
        self.assertEqual((self.checker.pending(), self.checker.problems), ([], []))
        self.assertEqual(self.checker.requests[1].outcome, "abandoned")

    def test_reusedReqIdIsRefused(self) -> None:
        self.checker.sent(1)
        self.assertRaises(ValueError, self.checker.sent, 1)

    def test_infersAreNotServerFrames(self) -> None:
        self.checker.sent(1, 1)
        self.feed(encode_infer(1, "echo"))
        self.assertIn("unexpected frame type 1", self.checker.problems[0])


# The fuzz tests need hypothesis, so they are defined only where it imports
# (cc50tw.test.optional says why).
if HYPOTHESIS.available:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cc50tw.test.test_codec import mutated_streams, random_pieces

    class ServerProtocolFuzzTests(SynchronousTestCase):
        def fuzz(self, pieces: list[bytes], max_frame: int) -> None:
            clock = MemoryReactorClock()
            backend = ToyBackend(clock, CPUEngine(clock, None), iters=0)  # type: ignore[arg-type]
            config = ServerConfig(
                max_frame_bytes=max_frame, default_max_tokens=8, max_tokens_limit=64, stall_timeout=5.0
            )
            factory = CC50ServerFactory(backend, config, clock)
            connection = Connection(factory)
            protocol, transport = connection.protocol, connection.transport
            closedAt: int | None = None
            for piece in pieces:
                connection.send(piece)  # must not raise, whatever the bytes
                clock.advance(0)
                self.assertLessEqual(protocol.bufferedBytes, max_frame + HEADER_SIZE)
                if transport.disconnecting and closedAt is None:
                    closedAt = len(transport.value())
            clock.advance(10)  # stall timeouts fire for requests left waiting on credit
            output = transport.value()
            if closedAt is not None:
                # Nothing is written once the server has decided to close, but
                # the terminal frames of requests it ends on the way out.
                for frame in decode_all(output[closedAt:]):
                    self.assertEqual(frame.type, MessageType.RESP_ERR)
            for frame in decode_all(output):
                self.assertIn(frame.type, SERVER_TYPES)
                if frame.type == MessageType.RESP_ERR:
                    frame.payload.decode("utf-8")  # text for people, never binary
                    self.assertIn(frame.flags, set(ErrorCode))
            protocol.connectionLost(None)  # type: ignore[arg-type]
            self.assertEqual(factory.connections, set())
            self.assertEqual(factory.admission.running, 0)
            self.assertEqual(factory.inFlight, 0)

        @settings(deadline=None, max_examples=300)
        @given(st.data())
        def test_arbitrary_bytes(self, data: st.DataObject) -> None:
            stream = data.draw(
                st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"CC50\x01\x00" + b)),
                label="stream",
            )
            self.fuzz(
                data.draw(random_pieces(stream), label="pieces"), data.draw(st.sampled_from([16, SMALL_MAX, 4096]))
            )

        @settings(deadline=None, max_examples=400)
        @given(st.data())
        def test_mutated_frames(self, data: st.DataObject) -> None:
            stream = data.draw(mutated_streams(), label="stream")
            self.fuzz(
                data.draw(random_pieces(stream), label="pieces"), data.draw(st.sampled_from([16, SMALL_MAX, 4096]))
            )

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)
