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

Every reply is checked exactly, against ``ServerModel``: what the protocol
(docs/protocol.md) says the server must answer, written here from the
specification with plain ``struct`` and independently of ``cc50tw.codec``'s
decoder.  It is exact because, at ``--toy-iters=0`` and
``--max-tokens-limit=16`` (the toy's first batch), every accepted request finishes within the reactor
turn that read it, so replies come in request order.  A connection is reused
for the next case while the model says its framing is intact, and closed
otherwise (after checking that the server closes it itself where it must).

After every batch a fresh connection's well-formed request is answered
correctly; at the end the server's open descriptors are back to where they
started, its RSS is within ``RSS_BOUND`` of where it was after warm-up, and
its log holds no traceback.

``CC50_FUZZ_CASES`` scales the number of cases (default 10,000).
"""

from __future__ import annotations

import functools
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from cc50tw.backends.toy import FIRST_BATCH_TOKENS
from cc50tw.testing import ProcessSampler
from tests.conftest import HOSTILE_SUMMARY, StartCC50
from tests.helpers import ConnectionClosed, RawConnection, ServerProcess, describe_frame, raw_infer

FUZZ_SEED = 20261126
CASES = int(os.environ.get("CC50_FUZZ_CASES", "10000"))
BATCH = 500

MAX_FRAME_BYTES = 4096
DEFAULT_MAX_TOKENS = 8
#: The toy's first batch: a request no longer than this is answered whole in
#: the reactor turn that read it, which is what keeps replies in request order.
MAX_TOKENS_LIMIT = FIRST_BATCH_TOKENS
SERVER_ARGS = (
    "--toy-iters=0",
    "--toy-device=cpu",
    f"--max-frame-bytes={MAX_FRAME_BYTES}",
    f"--max-tokens={DEFAULT_MAX_TOKENS}",
    f"--max-tokens-limit={MAX_TOKENS_LIMIT}",
    # Short timeouts, so that any connection the fuzzer leaves behind goes soon.
    "--idle-timeout=5",
    "--stall-timeout=5",
)
#: How much the server's RSS may grow over the run, from after the warm-up.
#: Measured: under 2 MiB (benchmarks/RESULTS.md).  Unbounded buffering of
#: what the fuzzer sends (some 10 MB) or a per-connection leak would exceed it.
RSS_BOUND = 32 << 20
#: Cases on one connection before it is replaced, even when still usable.
CASES_PER_CONNECTION = 150

# The wire format, restated from docs/protocol.md.
HEADER = struct.Struct("<IHHQII")
INFER = struct.Struct("<III")
MAGIC = 0x30354343
TOKEN = b" token"
DEFAULT_WINDOW = 262144
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF

# Error codes (flags of RESP_ERR).
BAD_FRAME, UNSUPPORTED_VERSION, UNKNOWN_TYPE, TOO_LARGE, BAD_REQUEST = 1, 2, 3, 5, 11
INFER_T, CHUNK_T, DONE_T, ERR_T, CANCEL_T, CREDIT_T, HELLO_T = 1, 2, 3, 4, 5, 6, 7


# The model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer the server owes: ``done`` (with its tokens), ``err`` (with its code) or ``hello``."""

    kind: str
    req_id: int
    value: int = 0


class Unpredictable(Exception):
    """A case whose answer depends on timing (a request that would wait for credit): not generated."""


class ServerModel:
    """What the server must answer to a byte stream, from the protocol's rules."""

    def __init__(self) -> None:
        self.buffer = b""
        self.skip = 0  # payload bytes of an oversized frame still to be discarded
        self.closed = False

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
                self.closed = True
                break
            if version != 1:
                replies.append(Reply("err", req_id, UNSUPPORTED_VERSION))
                self.closed = True
                break
            available = len(buffer) - pos - HEADER.size
            if length > MAX_FRAME_BYTES:
                replies.append(Reply("err", req_id, TOO_LARGE))  # at once, before the payload
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
        self.buffer = b"" if self.closed else buffer[pos:]
        return replies

    @staticmethod
    def frame(kind: int, req_id: int, payload: bytes) -> list[Reply]:
        if kind == INFER_T:
            if len(payload) < INFER.size:
                return [Reply("err", req_id, BAD_REQUEST)]
            max_tokens, credit, prompt_len = INFER.unpack_from(payload)
            if prompt_len != len(payload) - INFER.size:
                return [Reply("err", req_id, BAD_REQUEST)]
            try:
                payload[INFER.size :].decode("utf-8")
            except UnicodeDecodeError:
                return [Reply("err", req_id, BAD_REQUEST)]
            if max_tokens > MAX_TOKENS_LIMIT:
                return [Reply("err", req_id, TOO_LARGE)]
            tokens = max_tokens or DEFAULT_MAX_TOKENS
            if (credit or DEFAULT_WINDOW) < tokens * len(TOKEN):
                raise Unpredictable("the answer would wait for REQ_CREDIT")
            return [Reply("done", req_id, tokens)]
        if kind in (CANCEL_T, CREDIT_T):
            return []  # for a request not in flight: ignored
        if kind == HELLO_T:
            return [Reply("hello", req_id)]
        return [Reply("err", req_id, UNKNOWN_TYPE)]  # unknown, or a server-to-client type


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

    def req_id(self) -> int:
        rng = self.rng
        return rng.choice([0, 1, rng.randint(0, 1000), rng.randint(0, U64), U64])

    def valid_frame(self) -> bytes:
        rng = self.rng
        draw = rng.random()
        if draw < 0.6:
            return infer_frame(
                self.req_id(),
                rng.choice(PROMPTS),
                rng.choice([0, 1, rng.randint(1, 16)]),
                rng.choice([0, 4096, U32]),
            )
        if draw < 0.75:
            return header(CANCEL_T, self.req_id(), 0)
        if draw < 0.9:
            return header(CREDIT_T, self.req_id(), 4) + struct.pack("<I", rng.randint(0, U32))
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
            frame = bytearray(infer_frame(self.req_id(), prompt, rng.randint(0, 16), 0))
        return name, bytes(frame)

    def oversized_frame(self) -> bytes:
        """A frame over --max-frame-bytes with its whole payload: TOO_LARGE, and the stream goes on."""
        length = MAX_FRAME_BYTES + self.rng.choice([1, 2, 100, 5000])
        return header(self.rng.choice([INFER_T, 99]), self.req_id(), length) + self.rng.randbytes(length)

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


def read_replies(conn: RawConnection, expected: list[Reply], context: Callable[[], str], tally: Tally) -> None:
    """Read exactly the frames ``expected`` calls for, in order, and check each."""
    for reply in expected:
        chunks = bytearray()
        while True:
            try:
                frame = conn.read_frame(timeout=5)
            except (TimeoutError, ConnectionClosed) as e:
                raise FuzzFailure(f"waiting for {reply}: {e}\n{context()}") from None
            tally.frames_checked += 1
            if reply.kind == "done" and frame.type == CHUNK_T and frame.req_id == reply.req_id:
                chunks += frame.payload
                continue
            break
        got = describe_frame(frame)
        if frame.req_id != reply.req_id:
            raise FuzzFailure(f"expected {reply}, got {got}\n{context()}")
        if reply.kind == "done":
            if frame.type != DONE_T or struct.unpack_from("<I", frame.payload)[0] != reply.value:
                raise FuzzFailure(f"expected {reply}, got {got}\n{context()}")
            if bytes(chunks) != TOKEN * reply.value:
                raise FuzzFailure(f"expected {reply.value} tokens of text, got {bytes(chunks)!r}\n{context()}")
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


class Fuzzer:
    def __init__(self, server: ServerProcess, seed: int) -> None:
        self.server = server
        self.gen = Generator(seed)
        self.rng = random.Random(seed + 1)  # for choices that are not part of a case
        self.tally = Tally(Counter(), Counter())
        self.conn: RawConnection | None = None
        self.model = ServerModel()
        self.used = 0

    def connection(self) -> RawConnection:
        if self.conn is None:
            self.conn = self.server.connect(timeout=5)
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.model = ServerModel()
            self.used = 0
            self.tally.connections += 1
        return self.conn

    def finish_connection(self, context: Callable[[], str]) -> None:
        """Prove an in-sync connection has nothing unexpected queued, then close it."""
        conn = self.conn
        if conn is None:
            return
        if self.model.in_sync:
            conn.send(infer_frame(0xC105E, b"last", 2, 0))
            read_replies(conn, [Reply("done", 0xC105E, 2)], context, self.tally)
        self.close(context)

    def close(self, context: Callable[[], str]) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.model.closed:
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
        while True:
            state = gen.rng.getstate()
            if category == "mutated_field":
                field, writes = gen.mutated_field()
            else:
                writes = getattr(gen, category)()
            trial = ServerModel()
            trial.buffer, trial.skip = self.model.buffer, self.model.skip
            try:
                for data in writes:
                    trial.feed(data)
            except Unpredictable:
                gen.rng.setstate(state)
                gen.rng.random()  # move on to another case
                continue
            break
        self.tally.cases[category] += 1
        if field:
            self.tally.fields[field] += 1
        conn = self.connection()
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


def test_socket_fuzzing(cc50_server: StartCC50) -> None:
    server = cc50_server(*SERVER_ARGS)
    sampler = ProcessSampler(server.pid)
    cold_rss, cold_fds = sampler.sample()
    assert_serves(server, "before fuzzing")
    started = time.monotonic()
    fuzzer = Fuzzer(server, FUZZ_SEED)
    rss_before, _ = sampler.sample()
    for first in range(0, CASES, BATCH):
        for number in range(first, min(CASES, first + BATCH)):
            fuzzer.run_case(number)
        fuzzer.finish_connection(functools.partial(str, f"end of the batch starting at case {first}"))
        assert_serves(server, f"after the batch starting at case {first}")
        sampler.sample()
    elapsed = time.monotonic() - started

    deadline = time.monotonic() + 10
    while sampler.fds() > cold_fds and time.monotonic() < deadline:
        time.sleep(0.1)
    rss_after, fds_after = sampler.sample()
    tally = fuzzer.tally
    print(
        f"\nsocket fuzzing: {sum(tally.cases.values())} cases in {elapsed:.1f}s over {tally.connections} connections "
        f"({tally.closed_by_server} closed by the server, as they had to be), {tally.frames_checked} reply frames "
        f"checked, {tally.requests_answered} requests answered\n"
        f"  cases: {dict(sorted(tally.cases.items()))}\n"
        f"  mutated fields: {dict(sorted(tally.fields.items()))}\n"
        f"  server RSS {cold_rss / 2**20:.1f} MiB at start, {rss_before / 2**20:.1f} after warm-up, "
        f"{rss_after / 2**20:.1f} after (peak {sampler.peak_rss / 2**20:.1f}); fds {cold_fds} -> {fds_after}"
    )
    for category, count in sorted(tally.cases.items()):
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
    assert fds_after <= cold_fds, f"the server holds {fds_after} descriptors, {cold_fds} before fuzzing"
    assert rss_after - rss_before < RSS_BOUND, f"server RSS grew by {(rss_after - rss_before) >> 20} MiB"
    assert not server.log_problems(), server.log_problems()[:5]
