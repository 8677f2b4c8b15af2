"""
Tests for cc50tw.codec: byte compatibility with the C++ CC50 implementation,
round trips of every message, stream splitting, the decoder's error and size
handling, and decoder fuzzing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.codec import (
    DEFAULT_CREDIT_BYTES,
    HEADER,
    HEADER_SIZE,
    INFER_PREFIX,
    MAGIC,
    MAX_REQ_ID,
    MAX_U32,
    VERSION,
    DecodedItem,
    DoneStats,
    ErrorCode,
    ErrorReply,
    Frame,
    FrameDecoder,
    InferRequest,
    MessageType,
    Oversized,
    ProtocolError,
    decode_credit,
    decode_done,
    decode_error,
    decode_infer,
    encode_cancel,
    encode_chunk,
    encode_credit,
    encode_done,
    encode_error,
    encode_frame,
    encode_header,
    encode_hello,
    encode_infer,
    utf8_prefix_length,
)
from cc50tw.generation import NO_OPTIONS, GenerationOptions
from cc50tw.test.optional import HYPOTHESIS

DATA = FilePath(__file__).sibling("data")
VECTORS_PATH = DATA.child("cc50-v1-captured.json")
#: ``../shared`` seen from the repository root (absent in an installed copy).
SHARED_VECTORS_PATH = (
    FilePath(__file__).parent().parent().parent().sibling("shared").child("vectors").child("cc50-v1-captured.json")
)

#: A small limit so generated streams exercise the oversized path.
SMALL_MAX = 64


def load_vectors() -> dict[str, Any]:
    with VECTORS_PATH.open() as f:
        vectors: dict[str, Any] = json.load(f)
    return vectors


def feed_all(decoder: FrameDecoder, pieces: Iterable[bytes]) -> list[DecodedItem]:
    """Feed every piece, collecting items and checking the buffering bound."""
    items: list[DecodedItem] = []
    for piece in pieces:
        items.extend(decoder.feed(piece))
        if decoder.buffered > decoder.max_payload + HEADER_SIZE:
            raise AssertionError(f"decoder buffers {decoder.buffered} bytes (max_payload {decoder.max_payload})")
    return items


def decode_stream(data: bytes, max_payload: int = 1 << 20) -> list[DecodedItem]:
    return feed_all(FrameDecoder(max_payload), [data])


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in pairwise(points)]


def expected_item(encoded: bytes, max_payload: int) -> DecodedItem:
    """What one encoded frame should decode to, read with a plain struct unpack."""
    magic, version, type, req_id, flags, length = HEADER.unpack_from(encoded)
    assert magic == MAGIC and version == VERSION and length == len(encoded) - HEADER_SIZE
    if length > max_payload:
        return Oversized(type, req_id, length)
    return Frame(type, req_id, flags, encoded[HEADER_SIZE:])


class CapturedVectorsTests(SynchronousTestCase):
    """
    Bytes captured from the C++ client and server (cc50tw/test/data, copied
    from ../shared/vectors) decode and encode exactly.
    """

    def setUp(self) -> None:
        self.vectors = load_vectors()

    def test_origin(self) -> None:
        self.assertIn("C++", self.vectors["origin"])
        self.assertIn("shared/vectors/cc50-v1-captured.json", self.vectors["origin"])

    def test_copy_matches_shared(self) -> None:
        """Our copy holds the same bytes as ../shared (when it is there)."""
        if not SHARED_VECTORS_PATH.exists():
            self.skipTest("../shared/vectors is absent (not a checkout next to the shared folder)")
        with SHARED_VECTORS_PATH.open() as f:
            shared = json.load(f)
        ours = dict(self.vectors)
        del ours["origin"]
        self.assertEqual(ours, shared)

    def test_cpp_client_req_infer_decodes(self) -> None:
        vector = self.vectors["cpp_client_req_infer"]
        fields = vector["fields"]
        data = bytes.fromhex(vector["hex"])
        magic, version, type, req_id, flags, length = HEADER.unpack_from(data)
        self.assertEqual(magic, int(fields["magic"], 16))
        self.assertEqual(magic, MAGIC)
        self.assertEqual(data[:4], b"CC50")
        self.assertEqual(version, fields["version"])
        self.assertEqual(length, fields["length"])
        self.assertEqual(len(data), HEADER_SIZE + length)

        decoder = FrameDecoder(1 << 20)
        items = feed_all(decoder, [data])
        self.assertEqual(decoder.buffered, 0)
        self.assertEqual(len(items), 1)
        frame = items[0]
        assert isinstance(frame, Frame)
        self.assertEqual(frame.type, fields["type"])
        self.assertEqual(frame.type, MessageType.REQ_INFER)
        self.assertEqual(frame.req_id, fields["req_id"])
        self.assertEqual(frame.flags, fields["flags"])
        self.assertEqual(len(frame.payload), fields["length"])

        request = decode_infer(frame)
        self.assertEqual(request.max_tokens, fields["payload"]["max_tokens"])
        self.assertEqual(request.credit_bytes, fields["payload"]["credit_bytes"])
        self.assertEqual(request.credit_bytes, DEFAULT_CREDIT_BYTES)
        self.assertEqual(len(request.prompt.encode("utf-8")), fields["payload"]["prompt_len"])
        self.assertEqual(request.prompt, fields["prompt"])
        self.assertEqual(request, InferRequest(64, 262144, "Explain quantum computing in simple terms."))

    def test_cpp_client_req_infer_encodes(self) -> None:
        vector = self.vectors["cpp_client_req_infer"]
        fields = vector["fields"]
        encoded = encode_infer(
            fields["req_id"],
            fields["prompt"],
            max_tokens=fields["payload"]["max_tokens"],
            credit_bytes=fields["payload"]["credit_bytes"],
        )
        self.assertEqual(encoded.hex(), vector["hex"])

    def test_cpp_client_accepts_decodes(self) -> None:
        vector = self.vectors["cpp_client_accepts"]
        data = bytes.fromhex(vector["hex"])
        items = decode_stream(data)
        self.assertEqual(len(items), 2)
        chunk, done = items
        assert isinstance(chunk, Frame) and isinstance(done, Frame)
        self.assertEqual(chunk, Frame(MessageType.RESP_CHUNK, 2265604951, 0, b" token"))
        self.assertEqual(done.type, MessageType.RESP_DONE)
        self.assertEqual(done.req_id, 2265604951)
        self.assertEqual(len(done.payload), 16)
        stats = decode_done(done)
        self.assertEqual(stats, DoneStats(tokens=1, elapsed_us=1234))
        self.assertIsNone(stats.prompt_tokens)
        self.assertIsNone(stats.generated_tokens)
        self.assertIsNone(stats.ttft_us)

    def test_cpp_client_accepts_encodes(self) -> None:
        """cc50tw's short-form reply is byte for byte what the C++ client accepts."""
        vector = self.vectors["cpp_client_accepts"]
        encoded = encode_chunk(2265604951, b" token") + encode_done(2265604951, DoneStats(1, 1234))
        self.assertEqual(encoded.hex(), vector["hex"])

    def test_cpp_server_error_reply_decodes(self) -> None:
        vector = self.vectors["cpp_server_error_reply"]
        data = b"".join(bytes.fromhex(h) for h in vector["hex"])
        items = decode_stream(data)
        self.assertEqual([item.type for item in items], vector["types"])
        err, done = items
        assert isinstance(err, Frame) and isinstance(done, Frame)
        self.assertEqual(err.req_id, 0x1234567890ABCDEF)
        self.assertEqual(done.req_id, 0x1234567890ABCDEF)
        reply = decode_error(err)
        self.assertEqual(reply, ErrorReply(0, vector["err_text"]))
        self.assertEqual(reply.code, ErrorCode.UNKNOWN)
        self.assertEqual(decode_done(done), DoneStats(0, 0))

    def test_cpp_server_error_reply_encodes(self) -> None:
        vector = self.vectors["cpp_server_error_reply"]
        err, done = vector["hex"]
        self.assertEqual(encode_error(0x1234567890ABCDEF, ErrorCode.UNKNOWN, vector["err_text"]).hex(), err)
        self.assertEqual(encode_done(0x1234567890ABCDEF, DoneStats(0, 0)).hex(), done)


class RoundTripCase(SynchronousTestCase):
    """Helpers shared by the example and property tests below."""

    def decode_one(self, data: bytes) -> Frame:
        decoder = FrameDecoder(1 << 20)
        items = feed_all(decoder, [data])
        self.assertEqual(decoder.buffered, 0)
        self.assertEqual(len(items), 1)
        frame = items[0]
        assert isinstance(frame, Frame)
        (length,) = HEADER.unpack_from(data)[5:]
        self.assertEqual(length, len(frame.payload))
        self.assertEqual(len(data), HEADER_SIZE + length)
        return frame


class RoundTripTests(RoundTripCase):
    """encode -> FrameDecoder -> decode_* gives back what went in."""

    def test_infer_defaults(self) -> None:
        frame = self.decode_one(encode_infer(3, "hi"))
        self.assertEqual(decode_infer(frame), InferRequest(0, 0, "hi"))

    def test_done_extended_defaults(self) -> None:
        """Missing generated_tokens/ttft_us in an extended DONE encode as tokens and 0."""
        frame = self.decode_one(encode_done(1, DoneStats(7, 100, prompt_tokens=3)))
        self.assertEqual(decode_done(frame), DoneStats(7, 100, 3, 7, 0))

    def test_error_every_code(self) -> None:
        for code in ErrorCode:
            frame = self.decode_one(encode_error(9, code, code.name))
            self.assertEqual(decode_error(frame), ErrorReply(code.value, code.name))

    def test_error_codes_are_stable(self) -> None:
        """The numbers are on the wire (and in docs/protocol.md); they must not move."""
        self.assertEqual(
            [(code.name, code.value) for code in ErrorCode],
            [
                ("UNKNOWN", 0),
                ("BAD_FRAME", 1),
                ("UNSUPPORTED_VERSION", 2),
                ("UNKNOWN_TYPE", 3),
                ("DUPLICATE_REQ_ID", 4),
                ("TOO_LARGE", 5),
                ("OVERLOADED", 6),
                ("BACKEND_ERROR", 7),
                ("CANCELLED", 8),
                ("CREDIT_STALL", 9),
                ("SHUTTING_DOWN", 10),
                ("BAD_REQUEST", 11),
                ("TIMEOUT", 12),
                ("UPSTREAM_UNAVAILABLE", 13),
                ("TOO_MANY_REQUESTS", 14),
                ("UNAUTHORIZED", 15),
            ],
        )

    def test_error_invalid_utf8_is_replaced(self) -> None:
        """A peer's undecodable ERR text is shown, not raised."""
        frame = Frame(MessageType.RESP_ERR, 1, 7, b"bad \xff text")
        self.assertEqual(decode_error(frame), ErrorReply(7, "bad \ufffd text"))

    def test_hello_default(self) -> None:
        self.assertEqual(self.decode_one(encode_hello()), Frame(MessageType.HELLO, 0, 0, b""))

    def test_credit_wrong_size(self) -> None:
        for payload in [b"", b"\x01\x02\x03", b"\x01\x02\x03\x04\x05"]:
            error = self.assertRaises(ProtocolError, decode_credit, Frame(MessageType.REQ_CREDIT, 44, 0, payload))
            self.assertEqual(error.code, ErrorCode.BAD_REQUEST)
            self.assertEqual(error.req_id, 44)

    def test_header_layout(self) -> None:
        """``<IHHQII``, little-endian, no padding, spelled out byte by byte."""
        self.assertEqual(
            encode_header(0x0102, 0x0807060504030201, 0x11223344, flags=0xA1B2C3D4),
            b"CC50" + b"\x01\x00" + b"\x02\x01" + bytes(range(1, 9)) + b"\xd4\xc3\xb2\xa1" + b"\x44\x33\x22\x11",
        )


class DecodePayloadErrorCase(SynchronousTestCase):
    """Helpers shared by the example and property tests below."""

    def assertBadRequest(self, frame: Frame) -> ProtocolError:
        error = self.assertRaises(ProtocolError, decode_infer, frame)
        self.assertEqual(error.code, ErrorCode.BAD_REQUEST)
        self.assertEqual(error.req_id, frame.req_id)
        self.assertEqual(str(error), error.message)
        return error


class DecodePayloadErrorTests(DecodePayloadErrorCase):
    def test_infer_prompt_len_examples(self) -> None:
        good = encode_infer(5, "hello")[HEADER_SIZE:]
        decode_infer(Frame(MessageType.REQ_INFER, 5, 0, good))
        self.assertBadRequest(Frame(MessageType.REQ_INFER, 5, 0, good[:-1]))
        self.assertBadRequest(Frame(MessageType.REQ_INFER, 5, 0, good + b"!"))

    def test_infer_invalid_utf8(self) -> None:
        for prompt in [b"\xff", b"abc\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\x80ok"]:
            payload = INFER_PREFIX.pack(0, 0, len(prompt)) + prompt
            error = self.assertBadRequest(Frame(MessageType.REQ_INFER, MAX_REQ_ID, 0, payload))
            self.assertIn("UTF-8", error.message)

    def test_done_ignores_trailing_bytes(self) -> None:
        base = encode_done(1, DoneStats(5, 6, 7, 8, 9))[HEADER_SIZE:]
        for extra in [b"", b"\x00", b"future fields" * 3]:
            stats = decode_done(Frame(MessageType.RESP_DONE, 1, 0, base + extra))
            self.assertEqual(stats[:5], DoneStats(5, 6, 7, 8, 9)[:5])

    def test_done_too_short(self) -> None:
        for size in range(16):
            error = self.assertRaises(ProtocolError, decode_done, Frame(MessageType.RESP_DONE, 77, 0, bytes(size)))
            self.assertEqual(error.code, ErrorCode.BAD_FRAME)
            self.assertEqual(error.req_id, 77)


def char_starts(text: str) -> list[int]:
    """Byte offsets at which the characters of ``text`` start, plus the end."""
    offsets = [0]
    for char in text:
        offsets.append(offsets[-1] + len(char.encode("utf-8")))
    return offsets


class UTF8PrefixTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertEqual(utf8_prefix_length(b"", 0), 0)
        self.assertEqual(utf8_prefix_length(b"", 5), 0)
        self.assertEqual(utf8_prefix_length(b"abc", 0), 0)
        self.assertEqual(utf8_prefix_length(b"abc", 2), 2)
        self.assertEqual(utf8_prefix_length(b"abc", 3), 3)
        self.assertEqual(utf8_prefix_length(b"abc", 10), 3)
        euro = "a€b".encode()  # 61 e2 82 ac 62
        self.assertEqual([utf8_prefix_length(euro, limit) for limit in range(7)], [0, 1, 1, 1, 4, 5, 5])
        emoji = "😀".encode()
        self.assertEqual([utf8_prefix_length(emoji, limit) for limit in range(5)], [0, 0, 0, 0, 4])


def held_after(frames: list[bytes], cut: int, max_payload: int) -> int:
    """
    How many bytes a decoder should hold after the first ``cut`` bytes of
    ``frames``: those of an incomplete frame, or none while it skips an
    oversized payload.
    """
    start = 0
    for frame in frames:
        if cut < start + len(frame):
            held = cut - start
            oversized = len(frame) - HEADER_SIZE > max_payload
            return 0 if oversized and held >= HEADER_SIZE else held
        start += len(frame)
    return 0


class StreamSplittingCase(SynchronousTestCase):
    """Helpers shared by the example and property tests below."""

    def assertDecodesAs(self, max_payload: int, pieces: Sequence[bytes], expected: list[DecodedItem]) -> None:
        decoder = FrameDecoder(max_payload)
        self.assertEqual(feed_all(decoder, pieces), expected)
        self.assertEqual(decoder.buffered, 0)


class StreamSplittingTests(StreamSplittingCase):
    """A stream of frames decodes the same however it is cut into pieces."""

    def test_empty_feeds(self) -> None:
        frame = encode_chunk(1, b"x")
        self.assertDecodesAs(16, [b"", frame[:5], b"", frame[5:], b""], [Frame(2, 1, 0, b"x")])


def oversized_header(length: int, req_id: int = 7, type: int = MessageType.REQ_INFER) -> bytes:
    return encode_header(type, req_id, length)


class FrameDecoderErrorTests(SynchronousTestCase):
    def test_bad_magic(self) -> None:
        decoder = FrameDecoder(1024)
        bad = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
        error = self.assertRaises(ProtocolError, list, decoder.feed(bad))
        self.assertEqual(error.code, ErrorCode.BAD_FRAME)
        self.assertEqual(error.req_id, 0)
        self.assertEqual(decoder.buffered, 0)
        # Framing is lost for good: even a valid frame is refused now.
        again = self.assertRaises(ProtocolError, list, decoder.feed(encode_cancel(1)))
        self.assertEqual(again.code, ErrorCode.BAD_FRAME)
        self.assertEqual(decoder.buffered, 0)

    def test_bad_magic_after_good_frames(self) -> None:
        decoder = FrameDecoder(1024)
        good = encode_chunk(5, b"hi")
        bad = bytearray(encode_chunk(6, b"x"))
        bad[0] ^= 0x20  # b"cC50"
        items = decoder.feed(good + bytes(bad) + good)
        self.assertEqual(next(items), Frame(MessageType.RESP_CHUNK, 5, 0, b"hi"))
        error = self.assertRaises(ProtocolError, next, items)
        self.assertEqual(error.code, ErrorCode.BAD_FRAME)
        self.assertRaises(ProtocolError, list, decoder.feed(good))

    def test_bad_magic_split(self) -> None:
        """Bad magic is found however the header arrives."""
        bad = b"\x00" * HEADER_SIZE + b"\x00" * 8
        for cut in range(len(bad) + 1):
            decoder = FrameDecoder(1024)
            with self.assertRaises(ProtocolError) as caught:
                feed_all(decoder, [bad[:cut], bad[cut:]])
            self.assertEqual(caught.exception.code, ErrorCode.BAD_FRAME)

    def test_wrong_version(self) -> None:
        for version in [0, 2, 0xFFFF]:
            decoder = FrameDecoder(1024)
            frame = HEADER.pack(MAGIC, version, MessageType.REQ_INFER, 0xDEADBEEF12345678, 0, 0)
            error = self.assertRaises(ProtocolError, list, decoder.feed(frame))
            self.assertEqual(error.code, ErrorCode.UNSUPPORTED_VERSION)
            self.assertEqual(error.req_id, 0xDEADBEEF12345678)
            self.assertIn(str(version), error.message)
            self.assertEqual(decoder.buffered, 0)
            again = self.assertRaises(ProtocolError, list, decoder.feed(encode_cancel(1)))
            self.assertEqual(again.code, ErrorCode.UNSUPPORTED_VERSION)

    def test_length_at_limit_is_a_frame(self) -> None:
        payload = bytes(range(16))
        self.assertEqual(
            decode_stream(encode_chunk(3, payload), max_payload=16), [Frame(MessageType.RESP_CHUNK, 3, 0, payload)]
        )

    def test_oversized_skipped(self) -> None:
        """The oversized payload is skipped (it looks like bad magic) and the next frame is decoded."""
        garbage = b"XXXX" * 5  # 20 bytes that would be bad magic if parsed
        stream = oversized_header(len(garbage)) + garbage + encode_cancel(8)
        expected: list[DecodedItem] = [
            Oversized(MessageType.REQ_INFER, 7, 20),
            Frame(MessageType.REQ_CANCEL, 8, 0, b""),
        ]
        for cut in range(len(stream) + 1):
            for cut2 in range(cut, len(stream) + 1):
                decoder = FrameDecoder(16)
                self.assertEqual(feed_all(decoder, [stream[:cut], stream[cut:cut2], stream[cut2:]]), expected)
                self.assertEqual(decoder.buffered, 0)

    def test_oversized_payload_in_later_feeds(self) -> None:
        decoder = FrameDecoder(16)
        self.assertEqual(list(decoder.feed(oversized_header(1000, req_id=99))), [Oversized(1, 99, 1000)])
        for _ in range(10):
            self.assertEqual(list(decoder.feed(b"\xff" * 99)), [])
            self.assertEqual(decoder.buffered, 0)
        # 10 bytes still to skip, then a frame.
        self.assertEqual(list(decoder.feed(b"\xff" * 10 + encode_cancel(100))), [Frame(5, 100, 0, b"")])
        self.assertEqual(decoder.buffered, 0)

    def test_huge_length_never_buffered(self) -> None:
        decoder = FrameDecoder(1 << 20)
        self.assertEqual(list(decoder.feed(oversized_header(MAX_U32, 1))), [Oversized(1, 1, MAX_U32)])
        for _ in range(4):
            self.assertEqual(list(decoder.feed(b"\x00" * (1 << 20))), [])
            self.assertEqual(decoder.buffered, 0)

    def test_max_payload_zero(self) -> None:
        """A limit of 0 accepts only empty payloads."""
        stream = encode_cancel(1) + encode_chunk(2, b"a") + encode_cancel(3)
        self.assertEqual(
            decode_stream(stream, max_payload=0),
            [Frame(5, 1, 0, b""), Oversized(2, 2, 1), Frame(5, 3, 0, b"")],
        )

    def test_incomplete_frame_is_buffered(self) -> None:
        decoder = FrameDecoder(1024)
        frame = encode_chunk(1, b"x" * 1024)
        self.assertEqual(list(decoder.feed(frame[:10])), [])
        self.assertEqual(decoder.buffered, 10)
        self.assertEqual(list(decoder.feed(frame[10:1000])), [])
        self.assertEqual(decoder.buffered, 1000)
        self.assertEqual(list(decoder.feed(frame[1000:])), [Frame(2, 1, 0, b"x" * 1024)])
        self.assertEqual(decoder.buffered, 0)


class ChunkFastPathTests(SynchronousTestCase):
    """``FrameDecoder.feed(data, on_chunk)``: chunk frames to a callable, the rest yielded, in order."""

    def test_chunksGoToTheCallableOthersAreYielded(self) -> None:
        stream = encode_chunk(1, b"a") + encode_done(1, DoneStats(1, 1)) + encode_chunk(2, b"bc") + encode_cancel(3)
        seen: list[Any] = []
        decoder = FrameDecoder(1 << 20)
        for item in decoder.feed(stream, lambda req_id, payload: seen.append((req_id, payload))):
            seen.append(item)
        self.assertEqual(
            seen,
            [
                (1, b"a"),
                decode_stream(encode_done(1, DoneStats(1, 1)))[0],
                (2, b"bc"),
                decode_stream(encode_cancel(3))[0],
            ],
        )
        self.assertEqual(decoder.buffered, 0)

    def test_trueStopsAndKeepsTheRestBuffered(self) -> None:
        stream = b"".join(encode_chunk(1, bytes([65 + i])) for i in range(4))
        decoder = FrameDecoder(1 << 20)
        seen: list[bytes] = []

        def take(req_id: int, payload: bytes) -> bool:
            seen.append(payload)
            return len(seen) == 2

        self.assertEqual(list(decoder.feed(stream, take)), [])
        self.assertEqual(seen, [b"A", b"B"])
        self.assertEqual(decoder.buffered, 2 * (HEADER_SIZE + 1))
        self.assertEqual([f.payload for f in decoder.feed(b"")], [b"C", b"D"])  # type: ignore[union-attr]


# The property tests and their strategies need hypothesis, so they are
# defined only where it imports (cc50tw.test.optional says why).
if HYPOTHESIS.available:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    req_ids = st.integers(min_value=0, max_value=MAX_REQ_ID)
    u32s = st.integers(min_value=0, max_value=MAX_U32)
    u64s = st.integers(min_value=0, max_value=(1 << 64) - 1)
    prompts = st.text()
    # Any header ``type``, known or not (it is a u16 on the wire).
    u16s = st.integers(min_value=0, max_value=0xFFFF)

    FAST = settings(deadline=None, max_examples=200)
    SLOW = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

    @st.composite
    def encoded_frames(draw: st.DrawFn) -> bytes:
        """One frame of any message type, encoded by the codec, or a raw frame of any type."""
        req_id = draw(req_ids)
        kind = draw(
            st.sampled_from(["infer", "chunk", "done", "done+", "error", "cancel", "credit", "hello", "raw", "big"])
        )
        if kind == "infer":
            return encode_infer(req_id, draw(st.text(max_size=20)), draw(u32s), draw(u32s))
        if kind == "chunk":
            return encode_chunk(req_id, draw(st.binary(max_size=80)))
        if kind == "done":
            return encode_done(req_id, DoneStats(draw(u32s), draw(u64s)))
        if kind == "done+":
            return encode_done(req_id, DoneStats(draw(u32s), draw(u64s), draw(u32s), draw(u32s), draw(u64s)))
        if kind == "error":
            return encode_error(req_id, draw(st.sampled_from(ErrorCode)), draw(st.text(max_size=20)))
        if kind == "cancel":
            return encode_cancel(req_id)
        if kind == "credit":
            return encode_credit(req_id, draw(u32s))
        if kind == "hello":
            return encode_hello(draw(st.binary(max_size=40)))
        if kind == "raw":
            return encode_frame(draw(u16s), req_id, draw(st.binary(max_size=40)), draw(u32s))
        # Larger than SMALL_MAX, so an Oversized item where that is the limit.
        return encode_frame(draw(u16s), req_id, draw(st.binary(min_size=SMALL_MAX + 1, max_size=100)), draw(u32s))

    streams = st.lists(encoded_frames(), min_size=1, max_size=5)

    def mutate(draw: st.DrawFn, data: bytearray, most: int) -> None:
        """Flip, replace, delete, insert or cut off bytes of ``data`` in place."""
        for _ in range(draw(st.integers(min_value=1, max_value=most))):
            if not data:
                return
            op = draw(st.sampled_from(["flip", "replace", "delete", "insert", "truncate"]))
            at = draw(st.integers(min_value=0, max_value=len(data) - 1))
            if op == "flip":
                data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
            elif op == "replace":
                data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xC0, 0xED, 0xFF]) | st.integers(0, 255))
            elif op == "delete":
                del data[at]
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            else:
                del data[at:]

    @st.composite
    def mutated_streams(draw: st.DrawFn) -> bytes:
        """
        Valid frames with some bytes flipped, replaced, deleted, inserted or cut
        off: anywhere in the stream, or only in one frame's payload (re-framed with
        the right length, so the payload decoders see the damage).
        """
        frames = [bytearray(f) for f in draw(streams)]
        if draw(st.booleans()):
            data = bytearray(b"".join(frames))
            mutate(draw, data, 4)
            return bytes(data)
        which = draw(st.integers(min_value=0, max_value=len(frames) - 1))
        type, req_id, flags = draw(st.sampled_from(MessageType)), draw(req_ids), draw(u32s)
        payload = frames[which][HEADER_SIZE:]
        mutate(draw, payload, 3)
        if type == MessageType.REQ_INFER and len(payload) >= INFER_PREFIX.size and draw(st.booleans()):
            # A consistent prompt_len, so the prompt's bytes reach the UTF-8 check.
            payload[8:12] = (len(payload) - INFER_PREFIX.size).to_bytes(4, "little")
        frames[which] = bytearray(encode_frame(type, req_id, bytes(payload), flags))
        return b"".join(frames)

    @st.composite
    def random_pieces(draw: st.DrawFn, data: bytes) -> list[bytes]:
        if not data:
            return [data]
        cuts = draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12))
        return split_at(data, cuts)

    class RoundTripPropertyTests(RoundTripCase):
        @FAST
        @given(req_ids, prompts, u32s, u32s)
        def test_infer(self, req_id: int, prompt: str, max_tokens: int, credit_bytes: int) -> None:
            frame = self.decode_one(encode_infer(req_id, prompt, max_tokens, credit_bytes))
            self.assertEqual((frame.type, frame.req_id, frame.flags), (MessageType.REQ_INFER, req_id, 0))
            self.assertEqual(decode_infer(frame), InferRequest(max_tokens, credit_bytes, prompt))

        @FAST
        @given(req_ids, st.binary())
        def test_chunk(self, req_id: int, text: bytes) -> None:
            frame = self.decode_one(encode_chunk(req_id, text))
            self.assertEqual(frame, Frame(MessageType.RESP_CHUNK, req_id, 0, text))

        @FAST
        @given(req_ids, u32s, u64s)
        def test_done_short(self, req_id: int, tokens: int, elapsed_us: int) -> None:
            stats = DoneStats(tokens, elapsed_us)
            frame = self.decode_one(encode_done(req_id, stats))
            self.assertEqual((frame.type, frame.req_id, frame.flags), (MessageType.RESP_DONE, req_id, 0))
            self.assertEqual(len(frame.payload), 16)
            self.assertEqual(decode_done(frame), stats)

        @FAST
        @given(req_ids, u32s, u64s, u32s, u32s, u64s)
        def test_done_extended(
            self, req_id: int, tokens: int, elapsed_us: int, prompt_tokens: int, generated: int, ttft_us: int
        ) -> None:
            stats = DoneStats(tokens, elapsed_us, prompt_tokens, generated, ttft_us)
            frame = self.decode_one(encode_done(req_id, stats))
            self.assertEqual((frame.type, frame.req_id, frame.flags), (MessageType.RESP_DONE, req_id, 0))
            self.assertEqual(len(frame.payload), 32)
            self.assertEqual(decode_done(frame), stats)

        @FAST
        @given(req_ids, st.sampled_from(ErrorCode), prompts)
        def test_error(self, req_id: int, code: ErrorCode, message: str) -> None:
            frame = self.decode_one(encode_error(req_id, code, message))
            self.assertEqual((frame.type, frame.req_id, frame.flags), (MessageType.RESP_ERR, req_id, int(code)))
            reply = decode_error(frame)
            self.assertEqual(reply, ErrorReply(code, message))
            self.assertEqual(ErrorCode(reply.code), code)

        @FAST
        @given(req_ids)
        def test_cancel(self, req_id: int) -> None:
            frame = self.decode_one(encode_cancel(req_id))
            self.assertEqual(frame, Frame(MessageType.REQ_CANCEL, req_id, 0, b""))

        @FAST
        @given(req_ids, u32s)
        def test_credit(self, req_id: int, credit: int) -> None:
            frame = self.decode_one(encode_credit(req_id, credit))
            self.assertEqual((frame.type, frame.req_id, frame.flags), (MessageType.REQ_CREDIT, req_id, 0))
            self.assertEqual(decode_credit(frame), credit)

        @FAST
        @given(st.binary())
        def test_hello(self, token: bytes) -> None:
            frame = self.decode_one(encode_hello(token))
            self.assertEqual(frame, Frame(MessageType.HELLO, 0, 0, token))

        @FAST
        @given(u16s, req_ids, st.binary(max_size=100), u32s)
        def test_header(self, type: int, req_id: int, payload: bytes, flags: int) -> None:
            header = encode_header(type, req_id, len(payload), flags)
            self.assertEqual(header + payload, encode_frame(type, req_id, payload, flags))
            self.assertEqual(self.decode_one(header + payload), Frame(type, req_id, flags, payload))

    class DecodePayloadErrorPropertyTests(DecodePayloadErrorCase):
        @FAST
        @given(req_ids, st.binary(max_size=11))
        def test_infer_short_payload(self, req_id: int, payload: bytes) -> None:
            self.assertBadRequest(Frame(MessageType.REQ_INFER, req_id, 0, payload))

        @FAST
        @given(req_ids, u32s, st.binary(max_size=40))
        def test_infer_prompt_len_mismatch(self, req_id: int, prompt_len: int, prompt: bytes) -> None:
            assume(prompt_len != len(prompt))
            payload = INFER_PREFIX.pack(64, 0, prompt_len) + prompt
            self.assertBadRequest(Frame(MessageType.REQ_INFER, req_id, 0, payload))

        @FAST
        @given(req_ids, st.binary(min_size=16, max_size=64))
        def test_done_accepts_16_and_more(self, req_id: int, payload: bytes) -> None:
            stats = decode_done(Frame(MessageType.RESP_DONE, req_id, 0, payload))
            self.assertEqual(stats.tokens, int.from_bytes(payload[0:4], "little"))
            self.assertEqual(stats.elapsed_us, int.from_bytes(payload[8:16], "little"))
            if len(payload) < 32:
                self.assertEqual(stats[2:], (None, None, None, None))
            else:
                self.assertEqual(stats.prompt_tokens, int.from_bytes(payload[16:20], "little"))
                self.assertEqual(stats.generated_tokens, int.from_bytes(payload[20:24], "little"))
                self.assertEqual(stats.ttft_us, int.from_bytes(payload[24:32], "little"))

    class UTF8PrefixPropertyTests(SynchronousTestCase):
        @settings(deadline=None, max_examples=300)
        @given(st.data())
        def test_never_splits_a_character(self, data: st.DataObject) -> None:
            text = data.draw(st.text(), label="text")
            encoded = text.encode("utf-8")
            limit = data.draw(st.integers(min_value=0, max_value=len(encoded) + 4), label="limit")
            n = utf8_prefix_length(encoded, limit)
            starts = char_starts(text)
            self.assertIn(n, starts)
            self.assertLessEqual(n, min(limit, len(encoded)))
            encoded[:n].decode("utf-8")
            # Longest such prefix: the next character would not fit.
            self.assertEqual(n, max(s for s in starts if s <= limit))

    class StreamSplittingPropertyTests(StreamSplittingCase):
        @SLOW
        @given(streams)
        def test_every_split_point(self, frames: list[bytes]) -> None:
            stream = b"".join(frames)
            for max_payload in [1 << 20, SMALL_MAX]:
                expected = [expected_item(f, max_payload) for f in frames]
                self.assertEqual(decode_stream(stream, max_payload), expected)
                for cut in range(len(stream) + 1):
                    self.assertDecodesAs(max_payload, [stream[:cut], stream[cut:]], expected)
                    decoder = FrameDecoder(max_payload)
                    list(decoder.feed(stream[:cut]))
                    self.assertEqual(decoder.buffered, held_after(frames, cut, max_payload))

        @SLOW
        @given(st.data())
        def test_random_pieces(self, data: st.DataObject) -> None:
            frames = data.draw(streams, label="frames")
            stream = b"".join(frames)
            pieces = data.draw(random_pieces(stream), label="pieces")
            max_payload = data.draw(st.sampled_from([0, 16, SMALL_MAX, 1 << 20]), label="max_payload")
            self.assertEqual(b"".join(pieces), stream)
            self.assertDecodesAs(max_payload, pieces, [expected_item(f, max_payload) for f in frames])

        @FAST
        @given(streams)
        def test_one_byte_at_a_time(self, frames: list[bytes]) -> None:
            stream = b"".join(frames)
            pieces = [stream[i : i + 1] for i in range(len(stream))]
            self.assertDecodesAs(SMALL_MAX, pieces, [expected_item(f, SMALL_MAX) for f in frames])

        @FAST
        @given(st.data())
        def test_consumer_stops_after_each_item(self, data: st.DataObject) -> None:
            """Items a consumer did not take stay buffered and come out of the next feed."""
            frames = data.draw(streams, label="frames")
            stream = b"".join(frames)
            pieces = data.draw(random_pieces(stream), label="pieces")
            decoder = FrameDecoder(SMALL_MAX)
            items: list[DecodedItem] = []
            for piece in pieces:
                for item in decoder.feed(piece):
                    items.append(item)
                    break
            for _ in frames:  # at most one left per frame; a stuck decoder would repeat one forever
                more = next(iter(decoder.feed(b"")), None)
                if more is None:
                    break
                items.append(more)
            self.assertEqual(list(decoder.feed(b"")), [])
            self.assertEqual(items, [expected_item(f, SMALL_MAX) for f in frames])
            self.assertEqual(decoder.buffered, 0)

    class FrameDecoderErrorPropertyTests(SynchronousTestCase):
        @FAST
        @given(st.data())
        def test_buffering_is_bounded(self, data: st.DataObject) -> None:
            """Valid headers with any length, then anything: never more than max_payload + 24 held."""
            max_payload = data.draw(st.sampled_from([0, 1, 16, SMALL_MAX, 1000]), label="max_payload")
            parts = data.draw(
                st.lists(
                    st.tuples(
                        u16s, req_ids, st.integers(min_value=0, max_value=2 * max_payload + 50), st.binary(max_size=80)
                    ),
                    min_size=1,
                    max_size=6,
                ),
                label="parts",
            )
            stream = b"".join(encode_header(t, r, length) + body for t, r, length, body in parts)
            pieces = data.draw(random_pieces(stream), label="pieces")
            decoder = FrameDecoder(max_payload)
            try:
                items = feed_all(decoder, pieces)  # checks the bound after every feed
            except ProtocolError:
                return
            for item in items:
                if isinstance(item, Frame):
                    self.assertLessEqual(len(item.payload), max_payload)
                else:
                    self.assertGreater(item.length, max_payload)

    class DecoderFuzzTests(SynchronousTestCase):
        """
        Issue 8's decoder fuzzing: whatever arrives, the decoder yields frames or
        oversized headers, or raises ProtocolError; never another exception, never
        unbounded buffering.
        """

        def fuzz(self, stream: bytes, pieces: list[bytes], max_payload: int) -> None:
            self.assertEqual(b"".join(pieces), stream)
            decoder = FrameDecoder(max_payload)
            error = None
            for piece in pieces:
                try:
                    for item in decoder.feed(piece):
                        self.checkItem(item, max_payload)
                except ProtocolError as e:
                    error = e
                    break
                finally:
                    self.assertLessEqual(decoder.buffered, max_payload + HEADER_SIZE)
            if error is not None:
                self.assertIn(error.code, (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_VERSION))
                self.assertEqual(decoder.buffered, 0)
                again = self.assertRaises(ProtocolError, list, decoder.feed(encode_cancel(1)))
                self.assertEqual(again.code, error.code)

        def checkItem(self, item: object, max_payload: int) -> None:
            if isinstance(item, Oversized):
                self.assertGreater(item.length, max_payload)
                return
            if not isinstance(item, Frame):
                self.fail(f"decoder yielded {item!r}")
            self.assertLessEqual(len(item.payload), max_payload)
            # The payload decoders either decode or raise ProtocolError, too.
            decoders: dict[int, Callable[[Frame], object]] = {
                MessageType.REQ_INFER: decode_infer,
                MessageType.RESP_DONE: decode_done,
                MessageType.RESP_ERR: decode_error,
                MessageType.REQ_CREDIT: decode_credit,
            }
            payload_decoder = decoders.get(item.type)
            if payload_decoder is not None:
                try:
                    payload_decoder(item)
                except ProtocolError as e:
                    self.assertEqual(e.req_id, item.req_id)

        @settings(deadline=None, max_examples=300)
        @given(st.data())
        def test_arbitrary_bytes(self, data: st.DataObject) -> None:
            stream = data.draw(
                st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"CC50\x01\x00" + b)),
                label="stream",
            )
            pieces = data.draw(random_pieces(stream), label="pieces")
            self.fuzz(stream, pieces, data.draw(st.sampled_from([0, 16, SMALL_MAX, 1 << 20]), label="max_payload"))

        @settings(deadline=None, max_examples=400)
        @given(st.data())
        def test_mutated_frames(self, data: st.DataObject) -> None:
            stream = data.draw(mutated_streams(), label="stream")
            pieces = data.draw(random_pieces(stream), label="pieces")
            self.fuzz(stream, pieces, data.draw(st.sampled_from([0, 16, SMALL_MAX, 1 << 20]), label="max_payload"))

        @FAST
        @given(req_ids, u32s, u32s, st.binary(max_size=40))
        def test_infer_prompt_bytes(self, req_id: int, max_tokens: int, credit: int, prompt: bytes) -> None:
            """Any prompt bytes with a consistent prompt_len: the request, or BAD_REQUEST if not UTF-8."""
            frame = Frame(MessageType.REQ_INFER, req_id, 0, INFER_PREFIX.pack(max_tokens, credit, len(prompt)) + prompt)
            try:
                text = prompt.decode("utf-8")
            except UnicodeDecodeError:
                error = self.assertRaises(ProtocolError, decode_infer, frame)
                self.assertEqual((error.code, error.req_id), (ErrorCode.BAD_REQUEST, req_id))
            else:
                self.assertEqual(decode_infer(frame), InferRequest(max_tokens, credit, text))

        @FAST
        @given(st.sampled_from(MessageType), req_ids, u32s, st.binary(max_size=60))
        def test_payload_decoders(self, type: MessageType, req_id: int, flags: int, payload: bytes) -> None:
            """Every payload decoder takes any payload: a result or ProtocolError for that req_id."""
            self.checkItem(Frame(type, req_id, flags, payload), max_payload=60)

    class ChunkFastPathPropertyTests(SynchronousTestCase):
        @given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 64))
        def test_sameFramesAsWithoutTheCallable(self, payloads: list[bytes], piece: int) -> None:
            stream = b"".join(encode_chunk(n % 3, p) + encode_cancel(n) for n, p in enumerate(payloads))
            plain: list[Any] = []
            fast: list[Any] = []
            plainDecoder, fastDecoder = FrameDecoder(1 << 20), FrameDecoder(1 << 20)
            for start in range(0, len(stream), piece):
                data = stream[start : start + piece]
                plain.extend((f.type, f.req_id, f.payload) for f in plainDecoder.feed(data))  # type: ignore[union-attr]
                for item in fastDecoder.feed(data, lambda req_id, payload: fast.append((2, req_id, payload))):
                    fast.append((item.type, item.req_id, item.payload))  # type: ignore[union-attr]
            self.assertEqual(fast, plain)

    class WholeFramePropertyTests(SynchronousTestCase):
        """``whole`` is a shortcut only: asked first for every piece, the items and errors are ``feed``'s alone."""

        def items(self, pieces: list[bytes], max_payload: int, shortcut: bool) -> list[Any]:
            decoder, seen = FrameDecoder(max_payload), list[Any]()
            for piece in pieces:
                frame = decoder.whole(piece) if shortcut else None
                if frame is not None:
                    seen.append(frame)
                    continue
                try:
                    seen.extend(decoder.feed(piece))
                except ProtocolError as e:
                    seen.append(("error", e.code))
                    break
            return seen

        @settings(deadline=None, max_examples=400)
        @given(st.data())
        def test_sameItemsAsFeedAlone(self, data: st.DataObject) -> None:
            stream = data.draw(st.one_of(mutated_streams(), encoded_frames()), label="stream")
            cut = data.draw(st.booleans(), label="cut at frame boundaries")
            if cut:  # one piece per frame, as a client waiting for each answer sends them
                try:
                    frames = list(FrameDecoder(1 << 30).feed(stream))
                except ProtocolError:
                    frames = []
                if frames and all(type(f) is Frame for f in frames):
                    pieces = [encode_frame(f.type, f.req_id, f.payload, f.flags) for f in frames]  # type: ignore[union-attr]
                else:
                    pieces = [stream]
            else:
                pieces = data.draw(random_pieces(stream), label="pieces")
            max_payload = data.draw(st.sampled_from([0, 16, SMALL_MAX, 1 << 20]), label="max_payload")
            self.assertEqual(self.items(pieces, max_payload, True), self.items(pieces, max_payload, False))

        def test_notWhileAFrameIsBuffered(self) -> None:
            decoder = FrameDecoder(1 << 20)
            frame = encode_infer(1, "p", 1)
            self.assertEqual(list(decoder.feed(frame[:10])), [])
            self.assertIsNone(decoder.whole(frame))  # the buffered bytes come first
            self.assertIsNotNone(FrameDecoder(1 << 20).whole(frame))
            self.assertIsNone(FrameDecoder(4).whole(frame))  # over the limit: feed says so

    class WholeInferPropertyTests(SynchronousTestCase):
        """
        ``wholeInfer`` reads a plain REQ_INFER exactly as ``whole`` then
        ``decode_infer`` would, and takes nothing else: the server's one-step
        path must answer what the usual path would, and leave every error to it.
        """

        @settings(deadline=None, max_examples=500)
        @given(st.data())
        def test_sameRequestAsWholeThenDecode(self, data: st.DataObject) -> None:
            plain = st.builds(
                encode_infer, req_ids, st.text(max_size=12), u32s, u32s, st.sampled_from([None, GenerationOptions()])
            )
            piece = data.draw(st.one_of(plain, mutated_streams(), encoded_frames()), label="piece")
            max_payload = data.draw(st.sampled_from([0, 16, SMALL_MAX, 1 << 20]), label="max_payload")
            expected = None
            frame = FrameDecoder(max_payload).whole(piece)
            if frame is not None and frame.type == MessageType.REQ_INFER:
                try:
                    decoded = decode_infer(frame)
                except ProtocolError:
                    decoded = None
                if decoded is not None and decoded.options is NO_OPTIONS:
                    expected = (frame.req_id, decoded.max_tokens, decoded.credit_bytes, decoded.prompt)
            self.assertEqual(FrameDecoder(max_payload).wholeInfer(piece), expected)

        def test_notWhileAFrameIsBuffered(self) -> None:
            decoder = FrameDecoder(1 << 20)
            frame = encode_infer(7, "p", 1, 9)
            self.assertEqual(list(decoder.feed(frame[:10])), [])
            self.assertIsNone(decoder.wholeInfer(frame))  # the buffered bytes come first
            self.assertEqual(FrameDecoder(1 << 20).wholeInfer(frame), (7, 1, 9, "p"))
            self.assertIsNone(FrameDecoder(4).wholeInfer(frame))  # over the limit: feed says so

        def test_notWhenTheHeaderLengthDisagrees(self) -> None:
            """A header that announces more or fewer bytes than the read holds is the decoder's to buffer or split."""
            frame = encode_infer(7, "prompt", 1, 9)
            magic, version, kind, reqId, flags, length = HEADER.unpack_from(frame)
            for announced in (length - 1, length + 1, length + 100):
                lying = HEADER.pack(magic, version, kind, reqId, flags, announced) + frame[HEADER_SIZE:]
                self.assertIsNone(FrameDecoder(1 << 20).wholeInfer(lying), announced)

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)
