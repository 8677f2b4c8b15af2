"""
Socket fuzzing against a real ``twistd cc50`` (issue 8).

Over 10,000 generated cases, deterministic (``random.Random(FUZZ_SEED)``), go
over real loopback connections in batches, in five categories:

- ``random_bytes``: random bytes, sometimes after valid frames or after a
  valid header's first six bytes (magic and version);
- ``mutated_field``: one valid frame with one field changed: magic, version,
  type, length, flags, req_id, or in REQ_INFER prompt_len, the prompt's bytes,
  max_tokens (0, 2^32-1, the limit and one past it, random) or credit (0);
- ``truncated_then_close``: valid frames, then part of one, then FIN or RST;
- ``many_frames_one_write``: 10 to 120 frames, valid or mutated without
  losing the framing, in one ``send``;
- ``one_byte_per_write``: a few frames, one byte per ``send`` (TCP_NODELAY).

Valid REQ_INFERs sometimes carry a window smaller than their answer, so
requests stay in flight waiting for REQ_CREDIT, and the frames that follow
(grants, cancels, duplicates, junk, with req_ids drawn from a few hot values)
often land on them.  Every reply is checked exactly, against ``ServerModel``:
what the protocol (docs/protocol.md, "One terminal frame per request") says
the server must answer, written here from the specification with plain
``struct`` and independently of ``cc50tw.codec``'s decoder.  It is exact
because, at ``--toy-iters=0`` and ``--max-tokens-limit=16`` (the toy's first
batch), every request is generated whole within the reactor turn that read
it, so replies come in the order of what they answer.  Requests still waiting
after a few cases are cancelled, well before ``--stall-timeout``.  A
connection is reused for the next case while the model says its framing is
intact, and closed otherwise (after checking that the server closes it itself
where it must, with nothing after its error frame).

Beside the polite cases run two adversaries (``Flooder``, ``Granter``): a
client that sends reply-earning frames and requests on a small receive window
without reading for a batch, then reads everything, and one that keeps a
request alive by granting one byte at a time, which must lose it to
CREDIT_STALL after ``--stall-timeout`` while the polite cases go on.

After every batch a fresh connection's well-formed request is answered
correctly; at the end the server's open descriptors are back to where they
started, its RSS is within ``RSS_BOUND`` of where it was after warm-up, and
its log holds no traceback.

``CC50_FUZZ_CASES`` scales the number of cases (default 10,000).
"""

from __future__ import annotations

import functools
import json
import os
import random
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cc50tw.backends.toy import FIRST_BATCH_TOKENS
from cc50tw.codec import Frame, FrameDecoder
from cc50tw.testing import ProcessSampler
from tests.conftest import HOSTILE_SUMMARY, StartCC50
from tests.helpers import (
    ConnectionClosed,
    Outcome,
    RawConnection,
    ServerProcess,
    apply_frame,
    describe_frame,
    raw_infer,
)

FUZZ_SEED = 20261126
CASES = int(os.environ.get("CC50_FUZZ_CASES", "10000"))
BATCH = 500

MAX_FRAME_BYTES = 4096
DEFAULT_MAX_TOKENS = 8
#: The toy's first batch: a request no longer than this is generated whole in
#: the reactor turn that read it, which is what keeps replies in request order.
MAX_TOKENS_LIMIT = FIRST_BATCH_TOKENS
MAX_INFLIGHT = 64
#: Small, for the 1-byte granter; polite requests never wait this long.
STALL_TIMEOUT = 2.0
SERVER_ARGS = (
    "--toy-iters=0",
    "--toy-device=cpu",
    f"--max-frame-bytes={MAX_FRAME_BYTES}",
    f"--max-tokens={DEFAULT_MAX_TOKENS}",
    f"--max-tokens-limit={MAX_TOKENS_LIMIT}",
    f"--max-inflight-per-connection={MAX_INFLIGHT}",
    # Short timeouts, so that any connection the fuzzer leaves behind goes soon.
    "--idle-timeout=5",
    f"--stall-timeout={STALL_TIMEOUT:g}",
)
#: How much the server's RSS may grow over the run, from after the warm-up.
#: Measured: under 2 MiB (benchmarks/RESULTS.md).  Unbounded buffering of
#: what the fuzzer sends (some 10 MB) or a per-connection leak would exceed it.
RSS_BOUND = 32 << 20
#: Cases on one connection before it is replaced, even when still usable.
CASES_PER_CONNECTION = 150
#: A request left waiting for credit is cancelled by the fuzzer after this
#: many more cases, or this many seconds (a slow machine), so that it never
#: meets --stall-timeout, whose moment the model cannot know.
LIVE_CASES = 3
LIVE_SECONDS = STALL_TIMEOUT / 4

# The wire format, restated from docs/protocol.md.
HEADER = struct.Struct("<IHHQII")
INFER = struct.Struct("<III")
MAGIC = 0x30354343
TOKEN = b" token"
DEFAULT_WINDOW = 262144
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF

# Error codes (flags of RESP_ERR).
BAD_FRAME, UNSUPPORTED_VERSION, UNKNOWN_TYPE, DUPLICATE_REQ_ID, TOO_LARGE = 1, 2, 3, 4, 5
CANCELLED, CREDIT_STALL, BAD_REQUEST, TOO_MANY_REQUESTS = 8, 9, 11, 14
INFER_T, CHUNK_T, DONE_T, ERR_T, CANCEL_T, CREDIT_T, HELLO_T = 1, 2, 3, 4, 5, 6, 7


# The model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """
    One answer the server owes, in the order it must come:

    - ``chunk``: RESP_CHUNK frames for ``req_id`` carrying exactly ``text``
      (a request's text up to the end of its credit window);
    - ``done``: RESP_CHUNK frames carrying ``text``, then RESP_DONE with
      ``value`` tokens;
    - ``err``: RESP_ERR with code ``value`` (a request's pending text is dropped);
    - ``hello``: the server's HELLO.
    """

    kind: str
    req_id: int
    value: int = 0
    text: bytes = b""


@dataclass
class LiveRequest:
    """An accepted request waiting for credit: its whole answer, and how much of it has gone."""

    answer: bytes
    sent: int
    #: The case that sent its REQ_INFER, and when (monotonic).
    case: int
    born: float


class ServerModel:
    """
    What the server must answer to a byte stream, from the protocol's rules
    (docs/protocol.md, "One terminal frame per request").

    A request whose answer fits its window ends at once.  One that does not
    is *live*: it sends its window's worth and waits, and the model keeps it
    until a frame on its req_id ends it.  Per-frame errors then follow three
    rules: on a live req_id the error is that request's one terminal frame; a
    refused REQ_INFER gets its own RESP_ERR; anything else on a req_id with
    nothing in flight is dropped (counted in ``dropped``).  Bad magic, a bad
    version and a REQ_INFER on req_id 0 (reserved) are connection-level
    errors: one RESP_ERR on req_id 0 is the last frame, and live requests get
    nothing more.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.skip = 0  # payload bytes of an oversized frame still to be discarded
        self.closed = False
        self.live: dict[int, LiveRequest] = {}
        #: The case now being fed (set by the fuzzer), for the age of live requests.
        self.case = 0
        self.live_started = 0
        self.live_abandoned = 0
        self.dropped = 0

    @property
    def in_sync(self) -> bool:
        """Whether the next byte sent will be read as the start of a frame."""
        return not (self.closed or self.buffer or self.skip)

    def feed(self, data: bytes) -> list[Reply]:
        replies: list[Reply] = []
        if self.closed:
            return replies
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
        buffer, pos = self.buffer + data, 0
        while len(buffer) - pos >= HEADER.size:
            magic, version, kind, req_id, _flags, length = HEADER.unpack_from(buffer, pos)
            if magic != MAGIC:
                replies.append(Reply("err", 0, BAD_FRAME))
                self.close()
                break
            if version != 1:
                replies.append(Reply("err", 0, UNSUPPORTED_VERSION))  # connection-level: on req_id 0
                self.close()
                break
            available = len(buffer) - pos - HEADER.size
            if length > MAX_FRAME_BYTES:
                if kind == INFER_T and req_id == 0:  # a request on the reserved req_id: a connection error
                    replies.append(Reply("err", 0, BAD_REQUEST))
                    self.close()
                    break
                # At once, before the payload; a reply only for a request.
                replies.extend(self.refuse(req_id, TOO_LARGE, starts_request=kind == INFER_T))
                if length > available:
                    self.skip = length - available
                    pos = len(buffer)
                else:
                    pos += HEADER.size + length
                continue
            if length > available:
                break
            payload = buffer[pos + HEADER.size : pos + HEADER.size + length]
            pos += HEADER.size + length
            replies.extend(self.frame(kind, req_id, payload))
            if self.closed:
                break
        self.buffer = b"" if self.closed else buffer[pos:]
        return replies

    def close(self) -> None:
        """A connection-level error: every live request is abandoned, with no frame of its own."""
        self.closed = True
        self.live_abandoned += len(self.live)
        self.live.clear()

    def refuse(self, req_id: int, code: int, starts_request: bool = False) -> list[Reply]:
        """A per-frame error: ends the live request on ``req_id``, answers a REQ_INFER, or is dropped."""
        if self.live.pop(req_id, None) is not None or starts_request:
            return [Reply("err", req_id, code)]
        self.dropped += 1
        return []

    def frame(self, kind: int, req_id: int, payload: bytes) -> list[Reply]:
        live = self.live.get(req_id)
        if kind == INFER_T:
            if req_id == 0:  # reserved for connection-level errors, so this is one
                self.close()
                return [Reply("err", 0, BAD_REQUEST)]
            if live is not None:
                return self.refuse(req_id, DUPLICATE_REQ_ID)  # ends the one in flight; not started
            if len(payload) < INFER.size:
                return [Reply("err", req_id, BAD_REQUEST)]
            max_tokens, credit, prompt_len = INFER.unpack_from(payload)
            end = INFER.size + prompt_len
            if end > len(payload):
                return [Reply("err", req_id, BAD_REQUEST)]
            try:
                payload[INFER.size : end].decode("utf-8")
            except UnicodeDecodeError:
                return [Reply("err", req_id, BAD_REQUEST)]
            if end < len(payload) and not well_framed_options(payload[end:]):
                return [Reply("err", req_id, BAD_REQUEST)]
            if len(self.live) >= MAX_INFLIGHT:
                return [Reply("err", req_id, TOO_MANY_REQUESTS)]
            if max_tokens > MAX_TOKENS_LIMIT:
                return [Reply("err", req_id, TOO_LARGE)]
            tokens = max_tokens or DEFAULT_MAX_TOKENS
            answer = TOKEN * tokens
            window = credit or DEFAULT_WINDOW
            if window >= len(answer):
                return [Reply("done", req_id, tokens, answer)]
            self.live[req_id] = LiveRequest(answer, window, self.case, time.monotonic())
            self.live_started += 1
            return [Reply("chunk", req_id, text=answer[:window])]
        if kind == CANCEL_T:
            if self.live.pop(req_id, None) is not None:
                return [Reply("err", req_id, CANCELLED)]
            return []  # a request not in flight (perhaps just ended): ignored
        if kind == CREDIT_T:
            if live is None:
                return []  # as for REQ_CANCEL
            if len(payload) != 4:
                return self.refuse(req_id, BAD_REQUEST)
            (grant,) = struct.unpack("<I", payload)
            text = live.answer[live.sent : live.sent + grant]
            live.sent += len(text)
            if live.sent == len(live.answer):
                del self.live[req_id]
                return [Reply("done", req_id, len(live.answer) // len(TOKEN), text)]
            return [Reply("chunk", req_id, text=text)] if text else []
        if kind == HELLO_T:
            return [Reply("hello", req_id)]
        return self.refuse(req_id, UNKNOWN_TYPE)  # unknown, or a server-to-client type


def well_framed_options(block: bytes) -> bool:
    """
    Whether the bytes after a prompt are an options block: ``<I`` options_len,
    then that many bytes of a UTF-8 JSON object.  Anything else is BAD_REQUEST.
    The fuzzer sends no options on purpose, and what the server makes of a
    well-framed block depends on its keys, so the model stops there.
    """
    if len(block) < 4 or struct.unpack_from("<I", block)[0] != len(block) - 4:
        return False
    try:
        value = json.loads(block[4:].decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return False
    if not isinstance(value, dict):
        return False
    raise AssertionError(f"a fuzz case carries a well-framed options block, which the model does not cover: {block!r}")


# Generating cases ---------------------------------------------------------------------


def header(kind: int, req_id: int, length: int, flags: int = 0, magic: int = MAGIC, version: int = 1) -> bytes:
    return HEADER.pack(magic, version, kind, req_id, flags, length)


def infer_frame(req_id: int, prompt: bytes, max_tokens: int, credit: int, prompt_len: int | None = None) -> bytes:
    payload = INFER.pack(max_tokens, credit, len(prompt) if prompt_len is None else prompt_len) + prompt
    return header(INFER_T, req_id, len(payload)) + payload


PROMPTS = [b"", b"hello", b"Explain quantum computing", "ünïcödé ✓ 日本語".encode(), b"x" * 300]


class Generator:
    """Deterministic fuzz cases from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def req_id(self, infer: bool = False) -> int:
        """
        A few hot values, so that frames often land on a request in flight;
        seldom 0 for a REQ_INFER, which is a connection-level error.
        """
        rng = self.rng
        hot = [0, 1, rng.randint(0, 1000), rng.randint(0, U64), U64]
        if infer and rng.random() < 0.98:
            hot[0] = 2
        return rng.choice(hot)

    def valid_frame(self) -> bytes:
        rng = self.rng
        draw = rng.random()
        if draw < 0.6:
            return infer_frame(
                self.req_id(infer=True),
                rng.choice(PROMPTS),
                rng.choice([0, 1, rng.randint(1, 16)]),
                # A window smaller than the answer keeps the request waiting for REQ_CREDIT.
                rng.choice([0, 4096, U32, rng.randint(1, MAX_TOKENS_LIMIT * len(TOKEN))]),
            )
        if draw < 0.75:
            return header(CANCEL_T, self.req_id(), 0)
        if draw < 0.9:
            grant = rng.choice([0, rng.randint(1, 64), rng.randint(0, U32)])
            return header(CREDIT_T, self.req_id(), 4) + struct.pack("<I", grant)
        token = rng.randbytes(rng.randint(0, 16))
        return header(HELLO_T, self.req_id(), len(token)) + token

    def mutated_frame(self, keep_framing: bool = False) -> tuple[str, bytes]:
        """A valid frame with one field changed; ``keep_framing``: only changes that keep the stream in sync."""
        rng = self.rng
        frame = bytearray(self.valid_frame())
        is_infer = struct.unpack_from("<H", frame, 6)[0] == INFER_T
        fields = ["type", "flags", "req_id"]
        if is_infer:
            fields += ["prompt_len", "max_tokens", "max_tokens", "credit", "prompt_bytes"]
        if not keep_framing:
            fields += ["magic", "version", "length", "length"]
        name = rng.choice(fields)
        if name == "magic":
            magic = rng.choice([0, 0x43433530, MAGIC ^ (1 << rng.randrange(32)), rng.randint(0, U32)])
            struct.pack_into("<I", frame, 0, magic if magic != MAGIC else 0)
        elif name == "version":
            struct.pack_into("<H", frame, 4, rng.choice([0, 2, 0xFFFF, rng.randint(2, 0xFFFF)]))
        elif name == "type":
            kind = rng.choice([0, CHUNK_T, DONE_T, ERR_T, CANCEL_T, CREDIT_T, HELLO_T, 8, 99, 0xFFFF])
            struct.pack_into("<H", frame, 6, rng.choice([kind, rng.randint(0, 0xFFFF)]))
        elif name == "req_id":
            struct.pack_into("<Q", frame, 8, rng.randint(0, U64))
        elif name == "flags":
            struct.pack_into("<I", frame, 16, rng.randint(0, U32))
        elif name == "length":
            actual = len(frame) - HEADER.size
            length = rng.choice(
                [
                    0,
                    max(0, actual - 1),
                    actual + 1,
                    rng.randint(0, 64),
                    MAX_FRAME_BYTES,
                    MAX_FRAME_BYTES + 1,
                    rng.randint(0, U32),
                    U32,
                ]
            )
            struct.pack_into("<I", frame, 20, length)
        elif name == "prompt_len":
            actual = len(frame) - HEADER.size - INFER.size
            struct.pack_into("<I", frame, 32, rng.choice([0, actual + 1, max(0, actual - 1), rng.randint(0, U32), U32]))
        elif name == "max_tokens":
            value = rng.choice([0, U32, MAX_TOKENS_LIMIT, MAX_TOKENS_LIMIT + 1, rng.randint(0, U32)])
            struct.pack_into("<I", frame, 24, value)
        elif name == "credit":
            struct.pack_into("<I", frame, 28, 0)
        elif name == "prompt_bytes":
            prompt = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\x80", b"\xf4\x90\x80\x80"])
            frame = bytearray(infer_frame(self.req_id(infer=True), prompt, rng.randint(0, 16), 0))
        return name, bytes(frame)

    def oversized_frame(self) -> bytes:
        """A frame over --max-frame-bytes with its whole payload: TOO_LARGE, and the stream goes on."""
        length = MAX_FRAME_BYTES + self.rng.choice([1, 2, 100, 5000])
        kind = self.rng.choice([INFER_T, 99])
        return header(kind, self.req_id(infer=kind == INFER_T), length) + self.rng.randbytes(length)

    def in_sync_frame(self) -> bytes:
        draw = self.rng.random()
        if draw < 0.5:
            return self.valid_frame()
        if draw < 0.97:
            return self.mutated_frame(keep_framing=True)[1]
        return self.oversized_frame()

    # The categories: each returns (label, list of writes, how to close if the stream is out of sync)

    def random_bytes(self) -> list[bytes]:
        rng = self.rng
        junk = rng.randbytes(rng.randint(1, 512))
        draw = rng.random()
        if draw < 0.2:
            junk = HEADER.pack(MAGIC, 1, 0, 0, 0, 0)[:6] + junk  # magic and version, then anything
        elif draw < 0.45:
            junk = b"".join(self.valid_frame() for _ in range(rng.randint(1, 3))) + junk
        return [junk]

    def mutated_field(self) -> tuple[str, list[bytes]]:
        name, frame = self.mutated_frame()
        if self.rng.random() < 0.3:
            frame += self.valid_frame()  # what does the server make of what follows?
        return name, [frame]

    def truncated_then_close(self) -> list[bytes]:
        rng = self.rng
        whole = b"".join(self.valid_frame() for _ in range(rng.randint(0, 4)))
        victim = self.valid_frame()
        return [whole + victim[: rng.randint(1, len(victim) - 1)]]

    def many_frames_one_write(self) -> list[bytes]:
        return [b"".join(self.in_sync_frame() for _ in range(self.rng.randint(10, 120)))]

    def one_byte_per_write(self) -> list[bytes]:
        data = b"".join(self.in_sync_frame() for _ in range(self.rng.randint(1, 4)))
        return [data[i : i + 1] for i in range(len(data))]


# Running cases ------------------------------------------------------------------------


class FuzzFailure(AssertionError):
    pass


@dataclass
class Tally:
    cases: Counter[str]
    fields: Counter[str]
    frames_checked: int = 0
    requests_answered: int = 0
    connections: int = 0
    closed_by_server: int = 0
    #: Requests that waited for credit, and how those the cases did not end were ended.
    live_requests: int = 0
    live_cancelled: int = 0
    live_abandoned: int = 0
    #: Frames the model expects the server to drop (a per-frame error on a req_id with nothing in flight).
    dropped: int = 0
    flooders: int = 0
    flooders_closed: int = 0
    flood_bytes: int = 0
    flood_frames: int = 0
    flood_reading: float = 0.0
    granters: int = 0
    granter_stalls: list[float] = field(default_factory=list)


def read_replies(conn: RawConnection, expected: list[Reply], context: Callable[[], str], tally: Tally) -> None:
    """Read exactly the frames ``expected`` calls for, in order, and check each."""
    for reply in expected:
        chunks = bytearray()
        frame: Frame | None = None
        while reply.kind != "chunk" or len(chunks) < len(reply.text):
            try:
                frame = conn.read_frame(timeout=5)
            except (TimeoutError, ConnectionClosed) as e:
                raise FuzzFailure(f"waiting for {reply}: {e}\n{context()}") from None
            tally.frames_checked += 1
            if reply.kind in ("chunk", "done") and frame.type == CHUNK_T and frame.req_id == reply.req_id:
                chunks += frame.payload
                frame = None
                continue
            break
        if reply.kind == "chunk":
            if frame is not None:
                raise FuzzFailure(
                    f"expected {len(reply.text) - len(chunks)} more chunk bytes for req_id {reply.req_id}, "
                    f"got {describe_frame(frame)}\n{context()}"
                )
            if bytes(chunks) != reply.text:
                raise FuzzFailure(f"expected {reply}, got chunks of {bytes(chunks)!r}\n{context()}")
            continue
        assert frame is not None
        got = describe_frame(frame)
        if frame.req_id != reply.req_id:
            raise FuzzFailure(f"expected {reply}, got {got}\n{context()}")
        if reply.kind == "done":
            if frame.type != DONE_T or struct.unpack_from("<I", frame.payload)[0] != reply.value:
                raise FuzzFailure(f"expected {reply}, got {got}\n{context()}")
            if bytes(chunks) != reply.text:
                raise FuzzFailure(f"expected {reply}, got chunks of {bytes(chunks)!r} before DONE\n{context()}")
            tally.requests_answered += 1
        elif reply.kind == "err":
            if frame.type != ERR_T or frame.flags != reply.value:
                raise FuzzFailure(f"expected {reply}, got {got}\n{context()}")
            frame.payload.decode("utf-8")  # a message for people, never binary
        elif frame.type != HELLO_T:
            raise FuzzFailure(f"expected {reply}, got {got}\n{context()}")


def assert_serves(server: ServerProcess, label: str) -> None:
    """A fresh connection's well-formed request gets its whole answer."""
    assert server.alive(), f"server exited {label}:\n{server.log_tail()}"
    outcome = raw_infer(server.socket_address, "fresh after the fuzz", 5, req_id=0xF022, timeout=10)
    assert outcome.error is None and outcome.done is not None, f"{label}: {outcome}"
    assert outcome.done.tokens == 5 and outcome.text == TOKEN * 5, f"{label}: {outcome}"


# Adversaries ----------------------------------------------------------------------------
#
# Clients that misuse the protocol without breaking it, run beside the polite
# cases (the polite connection is their bystander): a flooder that sends and
# does not read, and a granter that keeps a request alive a byte at a time.

#: The flooder's socket buffers, set before connect: a small receive window,
#: so the server's send buffer fills at once, and a small send buffer, so the
#: kernel does not absorb megabytes of its frames (it grows to 4 MiB otherwise).
FLOOD_RECV_BUFFER = 4096
FLOOD_SEND_BUFFER = 8192
#: Its receive buffer once it reads (the window then grows to 64 KiB, the most
#: the window scale fixed at connect allows: 4 KiB a round trip is slow).
FLOOD_READ_BUFFER = 1 << 20
#: Bytes a flooder offers without reading.  A server that stops reading while
#: it cannot write makes the flooder's sends block for good after a few hundred
#: KiB (what the server read before its send buffer filled, plus socket
#: buffers); one that reads on and queues the replies takes all of it.
FLOOD_BUDGET = 4 << 20
#: Before it reads, the flooder's sends must have been blocked this long.
FLOOD_BLOCKED_SECONDS = 0.2
#: A flooder is started with every FLOOD_EVERY-th batch and reads at its end.
FLOOD_EVERY = 2
FLOOD_HELLO_ID = 0x4F4C4C4548  # b"HELLO": every HELLO the flooder sends, but the last
FLOOD_MARKER_ID = 0x444E45  # b"END": its last frame, whose reply says every reply came
FLOOD_FIRST_ID = 0xF100_0000
#: Requests of a flooder's that wait for credit (so stay in flight): well under MAX_INFLIGHT.
FLOOD_LIVE = 8
#: Shares of what a flooder sends, cumulative: HELLO, refused REQ_INFER, junk
#: (dropped), 16-token requests, then requests waiting for credit.
FLOOD_MIX = (0.45, 0.75, 0.9, 0.98)
#: The flooder's MSS.  On loopback it is 64 KiB, and the kernel sizes the
#: server's send buffer from it (to some MiB), which a flood would have to fill
#: with replies before the server stops reading; with a small one that takes
#: about 100 KiB, and the flood's replies are read back in a fraction of a second.
FLOOD_MSS = 536

#: The granter's request: answer and pace.  At one grant per GRANT_INTERVAL
#: it cannot take the whole answer (96 bytes) within STALL_TIMEOUT.
GRANT_TOKENS = MAX_TOKENS_LIMIT
GRANT_INTERVAL = 0.05
GRANTER_ID = 0x6772616E74  # b"grant"
#: How late the stall may come: the timer is exact, the fuzzer looks between cases.
STALL_SLACK = 2.0


def non_blocking_connection(
    server: ServerProcess, recv_buffer: int | None = None, send_buffer: int | None = None, mss: int | None = None
) -> socket.socket:
    """A TCP connection to ``server``, non-blocking once connected; buffer sizes and MSS are set before connect."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if recv_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    if mss is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.settimeout(5)
    sock.connect(server.socket_address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


@dataclass
class FloodFrame:
    kind: str  # hello, refused, junk, full (answered whole), live (waits for credit)
    req_id: int
    start: int
    end: int
    window: int = 0


class Flooder:
    """
    A never-reading client: on a small receive window it sends HELLOs and
    refused REQ_INFERs (each earns a reply), junk on idle req_ids (dropped),
    and requests as long as this server allows, some of them waiting for
    credit, for a batch of polite cases without reading; then it grants what
    its waiting requests need, sends a last HELLO and reads up to that
    HELLO's reply.

    The rules it checks: its sends block (the server stopped reading while it
    could not write, so it queued no more than a bounded amount); every reply
    it earned arrives; every request it made ends in exactly one terminal
    frame, the right one, with nothing after it, unless the server closed the
    connection.
    """

    def __init__(self, server: ServerProcess, rng: random.Random) -> None:
        self.sock = non_blocking_connection(server, FLOOD_RECV_BUFFER, FLOOD_SEND_BUFFER, FLOOD_MSS)
        self.rng = rng
        self.frames: list[FloodFrame] = []
        self.out = bytearray()  # generated, not yet sent
        self.generated = 0
        self.pushed = 0
        self.blocked = 0  # sends that would have blocked
        self.last_sent_at = time.monotonic()
        self.next_id = FLOOD_FIRST_ID
        self.live = 0

    def _generate(self, count: int) -> None:
        rng = self.rng
        for _ in range(count):
            draw = rng.random()
            self.next_id += 1
            req_id, window = self.next_id, 0
            if draw < FLOOD_MIX[0]:
                kind, data = "hello", header(HELLO_T, FLOOD_HELLO_ID, 0)
            elif draw < FLOOD_MIX[1]:
                kind, data = "refused", infer_frame(req_id, b"too long", MAX_TOKENS_LIMIT + 1, 0)
            elif draw < FLOOD_MIX[2]:
                kind, data = "junk", header(rng.choice([99, CHUNK_T, DONE_T]), req_id, 0)
            elif draw < FLOOD_MIX[3] or self.live >= FLOOD_LIVE:
                kind, data = "full", infer_frame(req_id, b"flood", MAX_TOKENS_LIMIT, 0)
            else:
                self.live += 1
                window = rng.randint(1, MAX_TOKENS_LIMIT * len(TOKEN) - 1)
                kind, data = "live", infer_frame(req_id, b"flood, slowly", MAX_TOKENS_LIMIT, window)
            self.frames.append(FloodFrame(kind, req_id, self.generated, self.generated + len(data), window))
            self.out += data
            self.generated += len(data)

    def step(self) -> None:
        """Send what the socket takes now, up to the budget; never read."""
        while self.pushed < FLOOD_BUDGET:
            if not self.out:
                self._generate(256)
            try:
                sent = self.sock.send(self.out[: 64 << 10])
            except BlockingIOError:
                self.blocked += 1
                return
            del self.out[:sent]
            self.pushed += sent
            self.last_sent_at = time.monotonic()

    def finish(self, tally: Tally, context: Callable[[], str], between: Callable[[], None]) -> None:
        """
        Prove the server stopped reading (the flooder's sends have been
        blocked for a while), then complete the frame under way, grant, mark
        the end, and read everything.
        """
        began = time.monotonic()
        give_up = began + 5
        while time.monotonic() - self.last_sent_at < FLOOD_BLOCKED_SECONDS:
            if self.pushed >= FLOOD_BUDGET or time.monotonic() > give_up:
                raise FuzzFailure(
                    f"flooder: the server read {self.pushed} bytes from a client that reads nothing, and its "
                    f"last send went through {time.monotonic() - self.last_sent_at:.3f}s ago: it reads on while "
                    f"it cannot write\n{context()}"
                )
            time.sleep(0.002)
            self.step()
        sent = [frame for frame in self.frames if frame.start < self.pushed]
        end = sent[-1].end if sent else self.pushed
        outgoing = bytearray(self.out[: end - self.pushed])
        answer = TOKEN * MAX_TOKENS_LIMIT
        requests = {frame.req_id: frame for frame in sent if frame.kind in ("refused", "full", "live")}
        for frame in sent:
            if frame.kind == "live":
                outgoing += header(CREDIT_T, frame.req_id, 4) + struct.pack("<I", len(answer))
        outgoing += header(HELLO_T, FLOOD_MARKER_ID, 0)
        hellos_sent = sum(frame.kind == "hello" for frame in sent)

        def failure(message: str) -> FuzzFailure:
            return FuzzFailure(
                f"flooder ({self.pushed} bytes pushed, {len(sent)} frames, {self.blocked} blocked sends): "
                f"{message}\n{context()}"
            )

        outcomes = {req_id: Outcome(req_id) for req_id in requests}
        decoder = FrameDecoder(1 << 20)
        hellos = 0
        marked = closed = False

        def on_chunk(req_id: int, payload: bytes) -> None:
            # The decoder's fast path for RESP_CHUNK: most of what comes back.
            outcome = outcomes.get(req_id)
            if marked or outcome is None or outcome.finished:
                where = "after the reply to the last HELLO" if marked else "for no request in flight"
                raise failure(f"RESP_CHUNK(req_id={req_id}, {payload!r}) {where}")
            outcome.chunks += payload
            outcome.chunk_frames += 1

        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FLOOD_READ_BUFFER)
        deadline = time.monotonic() + 15
        while not (marked or closed):
            between()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise failure(f"no reply to the last HELLO within 15 s; {hellos} of {hellos_sent} HELLO replies")
            readable, writable, _ = select.select(
                [self.sock], [self.sock] if outgoing else [], [], min(remaining, 0.05)
            )
            if writable:
                try:
                    del outgoing[: self.sock.send(outgoing)]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    outgoing.clear()  # closed by the server: read what it sent first
            if not readable:
                continue
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed = True
                break
            for item in decoder.feed(data, on_chunk):
                if not isinstance(item, Frame):
                    raise failure(f"an oversized frame header from the server: {item}")
                if marked:
                    raise failure(f"a frame after the reply to the last HELLO: {describe_frame(item)}")
                tally.frames_checked += 1
                if item.type == HELLO_T and item.req_id in (FLOOD_HELLO_ID, FLOOD_MARKER_ID):
                    marked = item.req_id == FLOOD_MARKER_ID
                    hellos += not marked
                    continue
                try:
                    apply_frame(outcomes, item)
                except AssertionError as e:
                    raise failure(str(e)) from None
        self.sock.close()
        tally.frames_checked += sum(outcome.chunk_frames for outcome in outcomes.values())

        if hellos > hellos_sent or (not closed and hellos != hellos_sent):
            raise failure(f"{hellos} HELLO replies to {hellos_sent} HELLOs")
        for req_id, frame in requests.items():
            outcome = outcomes[req_id]
            if not outcome.finished:
                if not closed:
                    raise failure(f"{frame.kind} request {req_id} has no terminal frame: {outcome}")
                continue
            error = outcome.error.code if outcome.error is not None else None
            if frame.kind == "refused":
                right = error == TOO_LARGE and not outcome.chunks
            elif frame.kind == "full" or error is None:
                right = outcome.done is not None and outcome.done.tokens == MAX_TOKENS_LIMIT and outcome.text == answer
            else:  # a request waiting for credit may have stalled while the flooder did not read
                right = error == CREDIT_STALL and outcome.text == answer[: frame.window]
            if not right:
                raise failure(f"{frame.kind} request {req_id}: {outcome}")
            tally.requests_answered += outcome.done is not None
        tally.flooders += 1
        tally.flood_bytes += self.pushed
        tally.flood_frames += len(sent)
        tally.flood_reading += time.monotonic() - began
        tally.flooders_closed += closed


class Granter:
    """
    A REQ_INFER with a 1-byte window whose client grants 1 byte at a time:
    never real progress, so the request must end in CREDIT_STALL about
    ``STALL_TIMEOUT`` after it started, while the polite cases go on.
    """

    def __init__(self, server: ServerProcess, tally: Tally) -> None:
        self.sock = non_blocking_connection(server)
        self.decoder = FrameDecoder(1 << 20)
        self.sock.sendall(infer_frame(GRANTER_ID, b"one byte at a time", GRANT_TOKENS, 1))
        self.started = self.last_grant = time.monotonic()
        self.answered_before = tally.requests_answered
        self.grants = 0
        self.outcome = Outcome(GRANTER_ID)
        self.ended = False

    def step(self, tally: Tally, context: Callable[[], str]) -> None:
        now = time.monotonic()
        waited = now - self.started

        def failure(message: str) -> FuzzFailure:
            return FuzzFailure(f"1-byte granter after {waited:.2f}s and {self.grants} grants: {message}\n{context()}")

        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            data = None
        except ConnectionResetError:
            data = b""
        if data == b"":
            raise failure(f"the server closed the connection; the request got {self.outcome}")
        for item in self.decoder.feed(data or b""):
            if not isinstance(item, Frame):
                raise failure(f"an oversized frame header from the server: {item}")
            try:
                apply_frame({GRANTER_ID: self.outcome}, item)
            except AssertionError as e:
                raise failure(str(e)) from None
        outcome = self.outcome
        answer = TOKEN * GRANT_TOKENS
        if outcome.text != answer[: len(outcome.text)] or len(outcome.text) > 1 + self.grants:
            raise failure(f"{outcome.text!r} is not the answer's first bytes, 1 + 1 per grant")
        if outcome.finished:
            if outcome.error is None or outcome.error.code != CREDIT_STALL:
                raise failure(f"it ended other than in CREDIT_STALL: {outcome}")
            if not STALL_TIMEOUT - 0.05 <= waited <= STALL_TIMEOUT + STALL_SLACK:
                raise failure(f"CREDIT_STALL outside {STALL_TIMEOUT:g}-{STALL_TIMEOUT + STALL_SLACK:g}s")
            if tally.requests_answered <= self.answered_before:
                raise failure("no other request was answered meanwhile")
            self.sock.close()
            self.ended = True
            tally.granters += 1
            tally.granter_stalls.append(waited)
            return
        if waited > STALL_TIMEOUT + STALL_SLACK:
            raise failure(f"still in flight past --stall-timeout={STALL_TIMEOUT:g} plus {STALL_SLACK:g}s: {outcome}")
        if now - self.last_grant >= GRANT_INTERVAL:
            self.sock.send(header(CREDIT_T, GRANTER_ID, 4) + struct.pack("<I", 1))
            self.grants += 1
            self.last_grant = now


class Fuzzer:
    def __init__(self, server: ServerProcess, seed: int) -> None:
        self.server = server
        self.gen = Generator(seed)
        self.rng = random.Random(seed + 1)  # for choices that are not part of a case
        self.adversary_rng = random.Random(seed + 2)
        self.tally = Tally(Counter(), Counter())
        self.conn: RawConnection | None = None
        self.model = ServerModel()
        self.used = 0
        self.flooder: Flooder | None = None
        self.granter: Granter | None = None

    def connection(self) -> RawConnection:
        if self.conn is None:
            self.conn = self.server.connect(timeout=5)
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.model = ServerModel()
            self.used = 0
            self.tally.connections += 1
        return self.conn

    def send_and_check(self, data: bytes, context: Callable[[], str]) -> None:
        """Frames of the fuzzer's own on an in-sync connection, and their replies."""
        assert self.conn is not None and self.model.in_sync
        expected = self.model.feed(data)
        self.conn.send(data)
        read_replies(self.conn, expected, context, self.tally)

    def cancel_live(self, context: Callable[[], str], every: bool = False) -> None:
        """Cancel the requests still waiting for credit that are old enough (or ``every`` one)."""
        now = time.monotonic()
        stale = [
            req_id
            for req_id, live in self.model.live.items()
            if every or self.model.case - live.case >= LIVE_CASES or now - live.born >= LIVE_SECONDS
        ]
        if stale:
            self.tally.live_cancelled += len(stale)
            self.send_and_check(b"".join(header(CANCEL_T, req_id, 0) for req_id in stale), context)

    def finish_connection(self, context: Callable[[], str]) -> None:
        """Prove an in-sync connection has nothing unexpected queued, then close it."""
        if self.conn is None:
            return
        if self.model.in_sync:
            self.cancel_live(context, every=True)
            self.send_and_check(infer_frame(0xC105E, b"last", 2, 0), context)
        self.close(context)

    def close(self, context: Callable[[], str]) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        model = self.model
        self.tally.live_requests += model.live_started
        self.tally.live_abandoned += len(model.live) + model.live_abandoned
        self.tally.dropped += model.dropped
        if model.closed:
            # The error frame is the last: nothing for requests still in flight.
            try:
                extra = conn.expect_closed(timeout=5)
            except AssertionError as e:
                raise FuzzFailure(f"{e}\n{context()}") from None
            if extra:
                raise FuzzFailure(
                    f"frames after the last expected one: {[describe_frame(f) for f in extra]}\n{context()}"
                )
            self.tally.closed_by_server += 1
            conn.close()
        elif self.rng.random() < 0.5:
            conn.abort()  # RST
        else:
            conn.close()  # FIN

    def run_case(self, number: int) -> None:
        gen = self.gen
        category = gen.rng.choice(
            ["mutated_field"] * 8
            + ["many_frames_one_write"] * 3
            + ["one_byte_per_write"] * 2
            + ["truncated_then_close"] * 3
            + ["random_bytes"] * 4
        )
        field = ""
        if category == "mutated_field":
            field, writes = gen.mutated_field()
        else:
            writes = getattr(gen, category)()
        self.tally.cases[category] += 1
        if field:
            self.tally.fields[field] += 1
        conn = self.connection()
        self.model.case = number
        sent = b"".join(writes)

        def context() -> str:
            return f"case {number} ({category}{' ' + field if field else ''}): sent {sent[:300].hex()}"

        expected: list[Reply] = []
        try:
            for data in writes:
                expected += self.model.feed(data)
                conn.send(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            if not self.model.closed:
                raise FuzzFailure(f"the server dropped the connection: {e}\n{context()}") from None
        read_replies(conn, expected, context, self.tally)
        self.used += 1
        if category == "truncated_then_close" or not self.model.in_sync:
            self.close(context)
        elif self.used >= CASES_PER_CONNECTION:
            self.finish_connection(context)
        else:
            self.cancel_live(context)

    # The adversaries, beside the polite cases

    def start_batch(self, batch: int, batches: int) -> None:
        if batch % FLOOD_EVERY == 0:
            self.flooder = Flooder(self.server, self.adversary_rng)
        if self.granter is None and (batch < batches - 2 or self.tally.granters == 0):
            # (Not in the last two batches, which end sooner than a granter would.)
            self.granter = Granter(self.server, self.tally)

    def step_adversaries(self, context: Callable[[], str]) -> None:
        if self.flooder is not None:
            self.flooder.step()
        self.step_granter(context)

    def step_granter(self, context: Callable[[], str]) -> None:
        if self.granter is not None:
            self.granter.step(self.tally, context)
            if self.granter.ended:
                self.granter = None

    def end_batch(self, context: Callable[[], str]) -> None:
        """The polite connection is proved and closed; then the flooder reads at last (the granter goes on meanwhile)."""
        self.finish_connection(context)
        if self.flooder is not None:
            flooder, self.flooder = self.flooder, None
            flooder.finish(self.tally, context, between=functools.partial(self.step_granter, context))

    def end_adversaries(self, context: Callable[[], str]) -> None:
        """Let a granter still in flight run to its CREDIT_STALL, with polite requests beside it."""
        while self.granter is not None:
            assert_serves(self.server, "beside the last 1-byte granter")
            self.tally.requests_answered += 1
            time.sleep(GRANT_INTERVAL / 2)
            self.step_adversaries(context)


def test_socket_fuzzing(cc50_server: StartCC50) -> None:
    server = cc50_server(*SERVER_ARGS)
    sampler = ProcessSampler(server.pid)
    cold_rss, cold_fds = sampler.sample()
    assert_serves(server, "before fuzzing")
    started = time.monotonic()
    fuzzer = Fuzzer(server, FUZZ_SEED)
    rss_before, _ = sampler.sample()
    batches = range(0, CASES, BATCH)
    for batch, first in enumerate(batches):
        context = functools.partial(str, f"the batch starting at case {first}")
        fuzzer.start_batch(batch, len(batches))
        for number in range(first, min(CASES, first + BATCH)):
            fuzzer.run_case(number)
            fuzzer.step_adversaries(context)
        fuzzer.end_batch(context)
        assert_serves(server, f"after the batch starting at case {first}")
        sampler.sample()
    fuzzer.end_adversaries(functools.partial(str, "after the last batch"))
    elapsed = time.monotonic() - started

    deadline = time.monotonic() + 10
    while sampler.fds() > cold_fds and time.monotonic() < deadline:
        time.sleep(0.1)
    rss_after, fds_after = sampler.sample()
    tally = fuzzer.tally
    stalls = tally.granter_stalls
    print(
        f"\nsocket fuzzing: {sum(tally.cases.values())} cases in {elapsed:.1f}s over {tally.connections} connections "
        f"({tally.closed_by_server} closed by the server, as they had to be), {tally.frames_checked} reply frames "
        f"checked, {tally.requests_answered} requests answered\n"
        f"  cases: {dict(sorted(tally.cases.items()))}\n"
        f"  mutated fields: {dict(sorted(tally.fields.items()))}\n"
        f"  {tally.live_requests} requests waited for credit ({tally.live_cancelled} cancelled by the fuzzer, "
        f"{tally.live_abandoned} abandoned with their connection); {tally.dropped} frames to be dropped\n"
        f"  {tally.flooders} flooders pushed {tally.flood_bytes / 2**20:.1f} MiB ({tally.flood_frames} frames) "
        f"without reading, then read for {tally.flood_reading:.1f}s ({tally.flooders_closed} closed by the server); {tally.granters} 1-byte granters stalled "
        f"after {min(stalls, default=0):.2f}-{max(stalls, default=0):.2f}s (--stall-timeout={STALL_TIMEOUT:g})\n"
        f"  server RSS {cold_rss / 2**20:.1f} MiB at start, {rss_before / 2**20:.1f} after warm-up, "
        f"{rss_after / 2**20:.1f} after (peak {sampler.peak_rss / 2**20:.1f}); fds {cold_fds} -> {fds_after}"
    )
    for category, count in sorted(tally.cases.items()):
        HOSTILE_SUMMARY.append(
            {"suite": "socket fuzzing", "category": category, "cases": count, "crashes": 0, "lost": 0}
        )
    for category, count in (("never-reading flooder", tally.flooders), ("1-byte granter", tally.granters)):
        HOSTILE_SUMMARY.append(
            {"suite": "socket fuzzing", "category": category, "cases": count, "crashes": 0, "lost": 0}
        )
    HOSTILE_SUMMARY.append(
        {
            "suite": "socket fuzzing",
            "category": "total",
            "cases": sum(tally.cases.values()),
            "crashes": 0 if server.alive() and not server.log_problems() else 1,
            "lost": 0,
            "peak_rss": sampler.peak_rss,
        }
    )
    assert sum(tally.cases.values()) >= CASES
    assert tally.live_requests > 0 and tally.dropped > 0, "the cases never had a request wait, or a frame dropped"
    assert tally.flooders > 0 and tally.granters > 0, "the adversaries did not run"
    assert fds_after <= cold_fds, f"the server holds {fds_after} descriptors, {cold_fds} before fuzzing"
    assert rss_after - rss_before < RSS_BOUND, f"server RSS grew by {(rss_after - rss_before) >> 20} MiB"
    assert not server.log_problems(), server.log_problems()[:5]
