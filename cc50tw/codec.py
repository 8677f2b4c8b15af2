"""
The CC50 wire format, as the C++ CC50 client and server speak it.

This module is deliberately pure (no Twisted, no I/O): the server, the client
library, the benchmarks and the fuzz tests all share one definition of the
bytes, and a pure module is what property tests can hammer in microseconds.

Every integer is little-endian with no padding.  A frame is a 24-byte header
(``<IHHQII``: magic, version, type, req_id, flags, length) followed by
``length`` payload bytes.  See ``docs/protocol.md`` for the tables.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

from cc50tw.generation import NO_OPTIONS, GenerationOptions, OptionsError, decodeOptions, encodeOptions

MAGIC = 0x30354343  # b"CC50" read as a little-endian u32
VERSION = 1

HEADER = struct.Struct("<IHHQII")
HEADER_SIZE = HEADER.size  # 24
INFER_PREFIX = struct.Struct("<III")  # max_tokens, credit_bytes, prompt_len
DONE_CPP = struct.Struct("<IIQ")  # tokens, reserved, elapsed_us
DONE_EXTENSION = struct.Struct("<IIQ")  # prompt_tokens, generated_tokens, ttft_us
#: A whole RESP_DONE frame in cc50tw's form with no finish reason, header
#: included: what a server sends most, in one pack.
DONE_FRAME = struct.Struct("<" + HEADER.format[1:] + DONE_CPP.format[1:] + DONE_EXTENSION.format[1:])
DONE_PAYLOAD_SIZE = DONE_CPP.size + DONE_EXTENSION.size
CREDIT = struct.Struct("<I")
#: RESP_DONE's finish reason, after the cc50tw fields: its length, then UTF-8.
FINISH_REASON = struct.Struct("<H")
MAX_FINISH_REASON_BYTES = 255

MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF
#: Longest RESP_ERR text sent: an upstream can hand us any amount of text,
#: and a person reads the first lines anyway.
MAX_ERROR_TEXT_BYTES = 4096
MAX_REQ_ID = 0xFFFFFFFFFFFFFFFF

#: What a zero in REQ_INFER's credit_bytes means (the C++ client's window).
DEFAULT_CREDIT_BYTES = 262144


class MessageType(enum.IntEnum):
    REQ_INFER = 1
    RESP_CHUNK = 2
    RESP_DONE = 3
    RESP_ERR = 4
    REQ_CANCEL = 5
    REQ_CREDIT = 6
    HELLO = 7


class ErrorCode(enum.IntEnum):
    """
    The numbers that RESP_ERR carries in its header's ``flags``.

    The payload is text for people (the C++ client prints it); the code is
    for programs, so they can tell "retry later" from "fix your request".
    """

    UNKNOWN = 0
    BAD_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_TYPE = 3
    DUPLICATE_REQ_ID = 4
    TOO_LARGE = 5
    OVERLOADED = 6
    BACKEND_ERROR = 7
    CANCELLED = 8
    CREDIT_STALL = 9
    SHUTTING_DOWN = 10
    BAD_REQUEST = 11
    TIMEOUT = 12
    UPSTREAM_UNAVAILABLE = 13
    TOO_MANY_REQUESTS = 14
    UNAUTHORIZED = 15


class ProtocolError(Exception):
    """
    The one exception the codec raises: the input is not CC50 we can accept.

    It carries the error code to put in RESP_ERR's flags and the req_id it
    concerns (0 when the header itself could not be trusted).
    """

    def __init__(self, code: ErrorCode, message: str, req_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


class Frame(NamedTuple):
    """A whole frame off the wire; ``type`` stays an int so unknown types survive."""

    type: int
    req_id: int
    flags: int
    payload: bytes


class Oversized(NamedTuple):
    """
    A header whose length exceeds the receiver's limit.

    The decoder reports it instead of buffering the payload, then discards
    that many bytes as they arrive, so the connection stays in sync and the
    sender gets a TOO_LARGE error for just that request.
    """

    type: int
    req_id: int
    length: int


class InferRequest(NamedTuple):
    max_tokens: int
    credit_bytes: int
    prompt: str
    #: What followed the prompt (docs/protocol.md, "Generation options").
    options: GenerationOptions = NO_OPTIONS


class DoneStats(NamedTuple):
    """
    RESP_DONE's payload.

    ``tokens`` and ``elapsed_us`` are the 16 bytes the C++ client reads; the
    rest is cc50tw's extension, ``None`` when a C++ server sent the short form.
    """

    tokens: int
    elapsed_us: int
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    ttft_us: int | None = None
    #: Why generation stopped ("stop", "length", ...): sent only to a request
    #: that carried generation options, whose client knows the field.
    finish_reason: str | None = None


class ErrorReply(NamedTuple):
    code: int
    message: str


def encode_header(type: int, req_id: int, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type, req_id, flags, length)


def encode_frame(type: int, req_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type, req_id, flags, len(payload)) + payload


def encode_infer(
    req_id: int, prompt: str, max_tokens: int = 0, credit_bytes: int = 0, options: GenerationOptions | None = None
) -> bytes:
    """REQ_INFER; without options (or with none set) exactly the C++ client's bytes."""
    prompt_bytes = prompt.encode("utf-8")
    payload = INFER_PREFIX.pack(max_tokens, credit_bytes, len(prompt_bytes)) + prompt_bytes
    if options is not None:
        payload += encodeOptions(options)
    return encode_frame(MessageType.REQ_INFER, req_id, payload)


def encode_chunk(req_id: int, text: bytes) -> bytes:
    return encode_frame(MessageType.RESP_CHUNK, req_id, text)


def chunk_frame_pieces(req_id: int, texts: list[bytes]) -> list[bytes]:
    """
    One RESP_CHUNK per text, as header and payload pieces to be joined into
    one write: the transport then handles one object, not two per frame.
    """
    pack = HEADER.pack
    pieces: list[bytes] = []
    append = pieces.append
    for text in texts:
        append(pack(MAGIC, VERSION, 2, req_id, 0, len(text)))
        append(text)
    return pieces


def _fit(value: int, limit: int) -> int:
    """A count in range for its field: negative (a clock stepped back) is 0, too large is the field's maximum."""
    value = int(value)
    return 0 if value < 0 else limit if value > limit else value


def encode_plain_done(req_id: int, tokens: int, elapsed_us: int, prompt_tokens: int, ttft_us: int) -> bytes:
    """
    The commonest RESP_DONE (no finish reason: the client sent no options),
    header and payload in one pack with no ``DoneStats`` to build: a request
    answered at once spends a fair part of its time on its terminal frame.
    Raises ``struct.error`` for a figure that does not fit its field, where
    ``encode_done`` clamps.
    """
    return DONE_FRAME.pack(
        MAGIC, VERSION, _RESP_DONE, req_id, 0, DONE_PAYLOAD_SIZE, tokens, 0, elapsed_us, prompt_tokens, tokens, ttft_us
    )


def encode_done(req_id: int, stats: DoneStats) -> bytes:
    """
    RESP_DONE, with every count clamped to its field.

    This is a terminal frame, so it must be encodable whatever the figures
    are: a backend's count past 2**32 or an elapsed time below zero becomes
    the nearest value the field can hold instead of an exception.
    """
    generated = stats.generated_tokens if stats.generated_tokens is not None else stats.tokens
    if stats.finish_reason is None and stats.prompt_tokens is not None and stats.tokens == generated:
        try:
            return encode_plain_done(req_id, generated, stats.elapsed_us, stats.prompt_tokens, stats.ttft_us or 0)
        except struct.error:
            pass  # clamped below
    # Every figure clamped to its field: cheap next to a frame, and the one path left.
    payload = DONE_CPP.pack(_fit(stats.tokens, MAX_U32), 0, _fit(stats.elapsed_us, MAX_U64))
    if stats.prompt_tokens is not None:
        payload += DONE_EXTENSION.pack(
            _fit(stats.prompt_tokens, MAX_U32), _fit(generated, MAX_U32), _fit(stats.ttft_us or 0, MAX_U64)
        )
    if stats.prompt_tokens is not None and stats.finish_reason is not None:
        reason = stats.finish_reason.encode("utf-8", "replace")
        reason = reason[: utf8_prefix_length(reason, MAX_FINISH_REASON_BYTES)]
        payload += FINISH_REASON.pack(len(reason)) + reason
    return encode_frame(MessageType.RESP_DONE, req_id, payload)


def error_text(message: str) -> bytes:
    """
    A RESP_ERR payload for any ``str``: UTF-8 with replacement (a lone
    surrogate from upstream JSON becomes ``?``), cut on a character boundary
    to ``MAX_ERROR_TEXT_BYTES``.
    """
    data = message.encode("utf-8", "replace")
    if len(data) > MAX_ERROR_TEXT_BYTES:
        data = data[: utf8_prefix_length(data, MAX_ERROR_TEXT_BYTES)]
    return data


def encode_error(req_id: int, code: int, message: str) -> bytes:
    """RESP_ERR; never raises for any text, so the one terminal frame can always be written."""
    return encode_frame(MessageType.RESP_ERR, req_id, error_text(message), flags=_fit(int(code), MAX_U32))


def encode_cancel(req_id: int) -> bytes:
    return encode_frame(MessageType.REQ_CANCEL, req_id)


def encode_credit(req_id: int, credit_bytes: int) -> bytes:
    return encode_frame(MessageType.REQ_CREDIT, req_id, CREDIT.pack(credit_bytes))


def encode_hello(token: bytes = b"") -> bytes:
    """HELLO from a client carries its shared-secret token; from a server, its name."""
    return encode_frame(MessageType.HELLO, 0, token)


def decode_infer(frame: Frame) -> InferRequest:
    payload = frame.payload
    if len(payload) < INFER_PREFIX.size:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"REQ_INFER payload is {len(payload)} bytes; it needs at least "
            f"{INFER_PREFIX.size} (max_tokens, credit_bytes, prompt_len)",
            frame.req_id,
        )
    max_tokens, credit_bytes, prompt_len = INFER_PREFIX.unpack_from(payload)
    end = INFER_PREFIX.size + prompt_len
    if end > len(payload):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"REQ_INFER prompt_len is {prompt_len} but {len(payload) - INFER_PREFIX.size} "
            "prompt bytes followed",
            frame.req_id,
        )
    try:
        prompt = payload[INFER_PREFIX.size : end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"REQ_INFER prompt is not valid UTF-8 ({e.reason} at byte {e.start})", frame.req_id
        ) from None
    if end == len(payload):
        return new_tuple(InferRequest, (max_tokens, credit_bytes, prompt, NO_OPTIONS))  # type: ignore[no-any-return]
    try:
        options = decodeOptions(payload[end:])
    except OptionsError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"REQ_INFER {e}", frame.req_id) from None
    except Exception as e:  # whatever else a hostile block provokes is still only this request's problem
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"REQ_INFER options unreadable ({type(e).__name__})", frame.req_id) from None
    return InferRequest(max_tokens, credit_bytes, prompt, options)


def decode_done(frame: Frame) -> DoneStats:
    payload = frame.payload
    if len(payload) < DONE_CPP.size:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"RESP_DONE payload is {len(payload)} bytes; it needs at least 16", frame.req_id
        )
    tokens, _reserved, elapsed_us = DONE_CPP.unpack_from(payload)
    if len(payload) < DONE_CPP.size + DONE_EXTENSION.size:
        return DoneStats(tokens, elapsed_us)
    prompt_tokens, generated, ttft_us = DONE_EXTENSION.unpack_from(payload, DONE_CPP.size)
    reason = None
    at = DONE_CPP.size + DONE_EXTENSION.size
    if len(payload) >= at + FINISH_REASON.size:
        (size,) = FINISH_REASON.unpack_from(payload, at)
        if at + FINISH_REASON.size + size <= len(payload):
            reason = payload[at + FINISH_REASON.size : at + FINISH_REASON.size + size].decode("utf-8", "replace")
    return DoneStats(tokens, elapsed_us, prompt_tokens, generated, ttft_us, reason)


def decode_error(frame: Frame) -> ErrorReply:
    return ErrorReply(frame.flags, frame.payload.decode("utf-8", errors="replace"))


def decode_credit(frame: Frame) -> int:
    if len(frame.payload) != CREDIT.size:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"REQ_CREDIT payload must be 4 bytes (u32 credit); got {len(frame.payload)}",
            frame.req_id,
        )
    (credit,) = CREDIT.unpack(frame.payload)
    return int(credit)


def utf8_char_length(lead: int) -> int:
    """Bytes in the UTF-8 character that starts with byte ``lead`` (1 for a byte that cannot start one)."""
    if lead >= 0xF0:
        return 4
    if lead >= 0xE0:
        return 3
    if lead >= 0xC0:
        return 2
    return 1


def utf8_prefix_length(data: bytes, limit: int) -> int:
    """
    The longest prefix of ``data`` no longer than ``limit`` that ends on a
    character boundary, so a credit window never splits a UTF-8 character.

    Returns 0 when even the first character does not fit.
    """
    if limit >= len(data):
        return len(data)
    cut = limit
    # Walk back over continuation bytes (10xxxxxx) to the start of a character.
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


DecodedItem = Frame | Oversized

#: ``Frame(...)``, as any NamedTuple's constructor, goes through a generated
#: Python ``__new__``; ``new_tuple(Frame, (...))`` builds the tuple directly,
#: skipping that call (measured: 0.24 -> 0.14 µs per frame).  For hot paths,
#: with every field given in order.
new_tuple = tuple.__new__
_RESP_CHUNK = int(MessageType.RESP_CHUNK)  # a plain int compares faster than the enum member
_RESP_DONE = int(MessageType.RESP_DONE)
_REQ_INFER = int(MessageType.REQ_INFER)
_INFER_HEADERS_SIZE = HEADER_SIZE + INFER_PREFIX.size  # where a REQ_INFER's prompt starts


class FrameDecoder:
    """
    Turns a byte stream, cut anywhere, into frames.

    This is the one parsing loop of the project, shaped like Twisted's
    ``IntNStringReceiver.dataReceived``: one buffer, an offset walking over it,
    and the length limit checked before a payload is buffered.  Magic and
    version are checked before the length is trusted; either being wrong
    raises ``ProtocolError`` and leaves the decoder unusable, since a stream
    that lost its framing cannot be resynchronised.
    """

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buffer = b""
        self._offset = 0
        self._discard = 0
        self._broken: ProtocolError | None = None
        # While a frame whose length is known is incomplete, its bytes are
        # kept as a list and joined once, when the frame is whole: a large
        # frame trickling in small reads would otherwise be copied per read.
        self._pieces: list[bytes] = []
        self._piecesSize = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return self._piecesSize if self._need else len(self._buffer) - self._offset

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self._broken = error
        self._buffer = b""
        self._offset = 0
        self._pieces, self._piecesSize, self._need = [], 0, 0
        return error

    def whole(self, data: bytes) -> Frame | None:
        """
        ``data`` as one frame, when it is exactly one whole frame that ``feed``
        would yield, and nothing is buffered: the request-and-answer case,
        one read, one frame.  None otherwise, and ``feed`` then takes ``data``
        (and says what is wrong with it, if anything is).
        """
        if (
            self._need
            or self._discard
            or self._broken is not None
            or self._offset < len(self._buffer)
            or len(data) < HEADER_SIZE
        ):
            return None
        magic, version, type, req_id, flags, length = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or length > self.max_payload or len(data) != HEADER_SIZE + length:
            return None
        return new_tuple(Frame, (type, req_id, flags, data[HEADER_SIZE:]))  # type: ignore[no-any-return]

    def wholeInfer(self, data: bytes) -> tuple[int, int, int, str] | None:
        """
        ``data`` as one whole REQ_INFER without options, read at once as
        ``(req_id, max_tokens, credit_bytes, prompt)``, when nothing is
        buffered: a client waiting for each answer, in one step with no
        ``Frame`` and no copy of the payload.  None for anything else
        (another type, options, a bad length or prompt), which ``whole`` or
        ``feed`` and ``decode_infer`` then take, errors included.
        """
        if (
            self._need
            or self._discard
            or self._broken is not None
            or self._offset < len(self._buffer)
            or len(data) < _INFER_HEADERS_SIZE
        ):
            return None
        magic, version, type, req_id, _flags, length = HEADER.unpack_from(data)
        if type != _REQ_INFER or magic != MAGIC or version != VERSION or length > self.max_payload:
            return None
        max_tokens, credit_bytes, prompt_len = INFER_PREFIX.unpack_from(data, HEADER_SIZE)
        if len(data) != _INFER_HEADERS_SIZE + prompt_len or length != INFER_PREFIX.size + prompt_len:
            return None  # options follow the prompt, or the lengths disagree
        try:
            prompt = data[_INFER_HEADERS_SIZE:].decode()
        except UnicodeDecodeError:
            return None
        return req_id, max_tokens, credit_bytes, prompt

    def feed(self, data: bytes, on_chunk: Callable[[int, bytes], object] | None = None) -> Iterator[DecodedItem]:
        """
        Yield every complete frame (or oversized header) that ``data`` finishes.

        The consumer may stop iterating after any item (say, because it closed
        the connection); what it has not taken stays buffered, which is why the
        offset is stored before each yield.

        With ``on_chunk``, RESP_CHUNK frames are not yielded: each is handed
        to ``on_chunk(req_id, payload)`` as it is parsed (no ``Frame``, no
        trip through the consumer's loop: the client's streaming fast path).
        A true return value stops there, as stopping the iteration does.
        """
        if self._broken is not None:
            raise self._broken
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = data[skipped:]
        if self._need:
            self._pieces.append(data)
            self._piecesSize += len(data)
            if self._piecesSize < self._need:
                return
            buffer = b"".join(self._pieces)
            self._pieces, self._piecesSize, self._need = [], 0, 0
        elif self._offset < len(self._buffer):
            buffer = self._buffer[self._offset :] + data
        else:
            buffer = data
        self._buffer = buffer
        self._offset = offset = 0
        end = len(buffer)
        unpack_from = HEADER.unpack_from
        max_payload = self.max_payload
        while end - offset >= HEADER_SIZE:
            magic, version, type, req_id, flags, length = unpack_from(buffer, offset)
            if magic != MAGIC:
                raise self._fail(
                    ProtocolError(
                        ErrorCode.BAD_FRAME,
                        f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}, b'CC50'): not a CC50 stream",
                    )
                )
            if version != VERSION:
                raise self._fail(
                    ProtocolError(
                        ErrorCode.UNSUPPORTED_VERSION,
                        f"unsupported CC50 version {version}; this server speaks version {VERSION}",
                        req_id,
                    )
                )
            frame_end = offset + HEADER_SIZE + length
            if length > max_payload:
                if frame_end > end:
                    self._discard = frame_end - end
                    frame_end = end
                self._offset = offset = frame_end
                yield Oversized(type, req_id, length)
                continue
            if frame_end > end:
                rest = buffer[offset:] if offset else buffer
                self._pieces, self._piecesSize, self._need = [rest], len(rest), frame_end - offset
                self._buffer, self._offset = b"", 0
                return
            payload = buffer[offset + HEADER_SIZE : frame_end]
            self._offset = offset = frame_end
            if type == _RESP_CHUNK and on_chunk is not None:
                if on_chunk(req_id, payload):
                    return
                continue
            yield new_tuple(Frame, (type, req_id, flags, payload))
        if offset:
            self._buffer = buffer[offset:]
            self._offset = 0
