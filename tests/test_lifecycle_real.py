"""
Request and connection lifecycle against a real ``twistd cc50``, as an
adversarial client found it broken (toy backend, ``--toy-iters=0``).

docs/protocol.md promises more than the happy path exercises: every request
ends in exactly one terminal frame and nothing follows it; a connection-level
error is the last thing sent; a request blocked on its client loses its
backend slot after ``--stall-timeout``; an idle close is an orderly close; an
unauthenticated peer gets UNAUTHORIZED and nothing else; and a client cannot
make the server buffer without bound.  Each test here drives one of those
promises to its edge with raw bytes over a real socket, so it checks the
bytes a peer actually sees (a TCP reset, a frame after EOF was due, RSS of
the server process) rather than what the protocol object believes it did.

Every read has a deadline, and timeouts are small, so a server that gets one
of these wrong fails the test in seconds rather than hanging it.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from cc50tw.codec import (
    HEADER_SIZE,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    encode_credit,
    encode_frame,
    encode_header,
    encode_hello,
    encode_infer,
)
from tests.conftest import StartCC50
from tests.fake_upstream import Script, SwitchablePort, in_stream
from tests.helpers import ConnectionClosed, Outcome, RawConnection, describe_frame, raw_infer

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads server RSS from Linux /proc")

ALL_CREDIT = 0xFFFFFFFF
SMALL_RECV_BUFFER = 4096
UNKNOWN_FRAME_TYPE = 99
TERMINAL_TYPES = (MessageType.RESP_DONE, MessageType.RESP_ERR)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def read_until_quiet(conn: RawConnection, quiet: float, deadline: float) -> tuple[list[Frame], bool]:
    """
    Frames until none arrives for ``quiet`` seconds, the server closes, or
    ``deadline`` (monotonic) passes; returns them and whether it closed.
    """
    frames: list[Frame] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return frames, False
        try:
            frames.append(conn.read_frame(min(quiet, remaining)))
        except TimeoutError:
            return frames, False
        except ConnectionClosed:
            return frames, True


def poll_frames(conn: RawConnection, seconds: float) -> list[Frame]:
    """Whatever frames arrive within ``seconds`` (none is fine); stops early on a close."""
    frames, _ = read_until_quiet(conn, seconds, time.monotonic() + seconds)
    return frames


def error_code(frame: Frame) -> int | None:
    return frame.flags if frame.type == MessageType.RESP_ERR else None


def wait_for_log(server_log: Callable[[], str], text: str, timeout: float) -> bool:
    """Poll ``server_log()`` until it contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server_log():
            return True
        time.sleep(0.05)
    return text in server_log()


# 1. A client that sends but never reads ------------------------------------

FLOOD_SECONDS = 4.0
FLOOD_MAX_BYTES = 64 << 20
RSS_GROWTH_LIMIT = 32 << 20
#: Past this growth the server is plainly queueing everything: stop pushing.
RSS_GROWTH_GIVE_UP = 4 * RSS_GROWTH_LIMIT


def test_reply_flood_from_a_client_that_never_reads_is_bounded(cc50_server: StartCC50) -> None:
    """
    Every HELLO earns a reply (as unknown-type frames earned a RESP_ERR
    three times their size before they were dropped), so a client that
    sends them and reads nothing made the server queue replies at the rate
    it read requests.  The only bound is to stop reading while the replies
    cannot be sent: the client's sends then block (EAGAIN here).
    """
    server = cc50_server("--toy-iters=0")
    warm = raw_infer(server.socket_address, max_tokens=3, timeout=5)
    assert warm.done is not None, warm
    baseline = rss_bytes(server.pid)

    flood = encode_frame(MessageType.HELLO, 1)
    assert len(flood) == HEADER_SIZE
    block = memoryview(flood * ((64 << 10) // HEADER_SIZE))
    with server.connect(timeout=5, recv_buffer=SMALL_RECV_BUFFER) as conn:
        sock = conn.sock
        sock.setblocking(False)
        sent = 0
        would_block = 0
        peak = baseline
        bystander_checked = False
        started = time.monotonic()
        next_sample = started
        while True:
            now = time.monotonic()
            if now >= next_sample:
                peak = max(peak, rss_bytes(server.pid))
                next_sample = now + 0.05
            if now - started >= FLOOD_SECONDS or sent >= FLOOD_MAX_BYTES or peak - baseline > RSS_GROWTH_GIVE_UP:
                break
            if not bystander_checked and now - started >= FLOOD_SECONDS / 2:
                # Another connection is served while this one floods.
                other = raw_infer(server.socket_address, max_tokens=3, timeout=5)
                assert other.error is None and other.done is not None, f"another connection's request: {other}"
                assert other.text == b" token" * 3
                bystander_checked = True
            try:
                # The stream is the same 24-byte frame over and over, so after
                # a partial send it resumes at ``sent % HEADER_SIZE``.
                sent += sock.send(block[sent % HEADER_SIZE :])
            except BlockingIOError:
                would_block += 1
                select.select([], [sock], [], 0.05)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let the server work through what it has already read
        peak = max(peak, rss_bytes(server.pid))
        growth = peak - baseline
        print(
            f"\nflood: pushed {sent / (1 << 20):.1f} MiB in {elapsed:.1f}s ({would_block} EAGAIN waits); "
            f"server RSS {baseline / (1 << 20):.1f} -> peak {peak / (1 << 20):.1f} MiB"
        )
        assert growth < RSS_GROWTH_LIMIT, (
            f"server RSS grew by {growth / (1 << 20):.0f} MiB (limit {RSS_GROWTH_LIMIT >> 20} MiB) while a client "
            f"that reads nothing pushed {sent / (1 << 20):.1f} MiB of HELLO frames: it queues every reply"
        )
        if not bystander_checked:
            other = raw_infer(server.socket_address, max_tokens=3, timeout=5)
            assert other.error is None and other.done is not None, f"another connection's request: {other}"

        # Now read: every whole frame sent earns one HELLO reply, unless
        # the server chose to cut the connection off (an abort past a cap of
        # unread replies is allowed).
        expected = sent // HEADER_SIZE
        decoder = FrameDecoder(1 << 20)
        replies = 0
        closed = False
        sock.setblocking(True)
        read_deadline = time.monotonic() + 8.0
        while replies < expected:
            remaining = read_deadline - time.monotonic()
            assert remaining > 0, f"read {replies} of {expected} replies before the deadline"
            sock.settimeout(remaining)
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed = True
                break
            for item in decoder.feed(data):
                assert isinstance(item, Frame), item
                assert item.type == MessageType.HELLO and item.req_id == 1, describe_frame(item)
                replies += 1
        print(f"read {replies} of {expected} replies; {'closed by the server' if closed else 'still open'}")
        assert closed or replies == expected


# 2. A request kept alive one byte of credit at a time ----------------------


def test_one_byte_credit_trickle_does_not_hold_the_backend_slot(cc50_server: StartCC50) -> None:
    """
    A grant of 1 byte every half second restarts the stall clock today, so a
    client can hold a backend slot forever while receiving almost nothing;
    with ``--max-concurrency=1`` that starves every other client.  A request
    that makes no real progress for ``--stall-timeout`` must end.
    """
    stall = 2.0
    server = cc50_server("--toy-iters=0", "--max-concurrency=1", f"--stall-timeout={stall:g}")
    with server.connect(timeout=5) as a, server.connect(timeout=5) as b:
        a.send_infer(1, "trickle", 1000, credit_bytes=1)
        first = a.read_frame(5)
        assert first.type == MessageType.RESP_CHUNK and first.payload == b" ", describe_frame(first)
        b.send_infer(2, "one token please", 1)
        started = time.monotonic()
        deadline = started + stall + 6.0
        a_frames: list[Frame] = [first]
        b_frames: list[Frame] = []
        a_ended = b_ended = False
        while time.monotonic() < deadline and not (a_ended and b_ended):
            if not a_ended:
                a.send(encode_credit(1, 1))
            for frame in poll_frames(a, 0.25):
                a_frames.append(frame)
                a_ended = a_ended or frame.type in TERMINAL_TYPES
            for frame in poll_frames(b, 0.25):
                b_frames.append(frame)
                b_ended = b_ended or frame.type in TERMINAL_TYPES
        waited = time.monotonic() - started
        a_terminal = [f for f in a_frames if f.type in TERMINAL_TYPES]
        b_terminal = [f for f in b_frames if f.type in TERMINAL_TYPES]
        a_bytes = sum(len(f.payload) for f in a_frames if f.type == MessageType.RESP_CHUNK)
        assert a_terminal, (
            f"the trickling request still holds the only backend slot after {waited:.1f}s "
            f"(--stall-timeout={stall:g}; it received {a_bytes} bytes); the other client got "
            f"{[describe_frame(f) for f in b_frames]}"
        )
        assert error_code(a_terminal[0]) == ErrorCode.CREDIT_STALL, describe_frame(a_terminal[0])
        assert b_terminal and b_terminal[0].type == MessageType.RESP_DONE, (
            f"the other client's request after {waited:.1f}s: {[describe_frame(f) for f in b_frames]}"
        )


# 3. One request, one terminal frame ----------------------------------------


def test_errors_for_a_request_in_flight_do_not_add_terminal_frames(cc50_server: StartCC50) -> None:
    """
    An unknown-type frame or an oversized frame that carries the req_id of a
    request in flight was answered with RESP_ERR for that req_id, a terminal
    frame, while the request itself went on to its chunks and its own DONE.
    Now the first such frame ends the request (its one terminal frame) and
    the later junk on that req_id, which then has nothing in flight, is
    dropped.  (A REQ_INFER on it would start a new request, with its own
    terminal frame: that is req_id reuse, not junk.)
    """
    max_frame = 4096
    server = cc50_server("--toy-iters=0", f"--max-frame-bytes={max_frame}")
    with server.connect(timeout=5) as conn:
        conn.send(encode_infer(7, "one byte of window", 5, credit_bytes=1))
        conn.send(encode_frame(UNKNOWN_FRAME_TYPE, 7))
        oversized = max_frame + 904
        conn.send(encode_header(MessageType.REQ_CREDIT, 7, oversized) + bytes(oversized))
        conn.send(encode_credit(7, 1 << 20))
        frames, closed = read_until_quiet(conn, quiet=1.0, deadline=time.monotonic() + 6.0)
        mine = [f for f in frames if f.req_id == 7]
        seen = " ".join(MessageType(f.type).name.removeprefix("RESP_") for f in mine)
        terminal_at = [i for i, f in enumerate(mine) if f.type in TERMINAL_TYPES]
        assert len(terminal_at) <= 1, f"req_id 7 got {len(terminal_at)} terminal frames: {seen}"
        if terminal_at:
            after = mine[terminal_at[0] + 1 :]
            assert len(after) == 0, f"frames for req_id 7 after its terminal frame: {seen}"
        assert not closed, "UNKNOWN_TYPE and TOO_LARGE leave the connection open"
        # The connection goes on (docs/protocol.md: both errors "continue").
        outcome = conn.infer(8, "still there?", 2)
        assert outcome.done is not None and outcome.text == b" token" * 2, outcome


# 4. Nothing after a connection-level error ---------------------------------


def test_nothing_follows_a_connection_level_error(cc50_server: StartCC50) -> None:
    """
    Bad magic closes the connection: the RESP_ERR BAD_FRAME (req_id 0) must
    be the last frame.  A request paused on a full socket when the garbage
    arrives must be abandoned with the connection, not resumed into the
    closing transport as its buffer drains.
    """
    server = cc50_server("--toy-iters=0")
    with server.connect(timeout=5, recv_buffer=SMALL_RECV_BUFFER) as conn:
        conn.send(encode_infer(1, "a long answer", 1_000_000, ALL_CREDIT))  # more than any kernel buffers hold
        time.sleep(1.0)  # read nothing: the server's buffers fill and the request pauses
        conn.send(b"XXXX" + bytes(20))
        frames = conn.expect_closed(timeout=10)
    errors = [i for i, f in enumerate(frames) if f.req_id == 0 and error_code(f) == ErrorCode.BAD_FRAME]
    assert errors, f"no RESP_ERR BAD_FRAME among {len(frames)} frames; last: {[describe_frame(f) for f in frames[-3:]]}"
    at = errors[0]
    before = frames[:at]
    assert not any(f.type in TERMINAL_TYPES for f in before), (
        "the long request ended before the bad frame arrived: the scenario did not happen"
    )
    after = frames[at + 1 :]
    assert len(after) == 0, (
        f"{len(after)} frames after RESP_ERR BAD_FRAME ({sum(f.type == MessageType.RESP_CHUNK for f in after)} chunks); "
        f"first: {describe_frame(after[0])}"
    )


# 5. An idle close is an orderly close --------------------------------------


def test_idle_close_of_an_unread_connection_ends_in_eof_not_reset(cc50_server: StartCC50) -> None:
    """
    A client that stopped reading is closed as idle once its request has
    stalled, and gets ``--stall-timeout`` more to read what was sent before
    it is aborted.  One that does read in that time must get all of it and
    an orderly FIN, not a reset that can destroy the unread tail.
    """
    stall, idle = 2.5, 2.0
    server = cc50_server("--toy-iters=0", f"--stall-timeout={stall:g}", f"--idle-timeout={idle:g}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECV_BUFFER)
        sock.settimeout(5)
        sock.connect(server.socket_address)
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendall(encode_infer(1, "read nothing for a while", 1_000_000, ALL_CREDIT))
        # The request stalls (stall), the connection is then idle (idle) and
        # closed; it would be aborted a further ``stall`` later.  Read between.
        closing = f"closing idle connection from {peer}"
        assert wait_for_log(server.log, closing, stall + idle + 3.0), f"the server never logged {closing!r}"
        log = server.log()
        assert f"aborting connection from {peer}" not in log, "aborted before the client could read"
        assert f"request 1 from {peer}: credit_stall" in log

        decoder = FrameDecoder(1 << 30)
        frames: list[Frame] = []
        received = 0
        reading_since = last_data_at = time.monotonic()
        deadline = reading_since + 10.0
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no EOF within 10s of reading ({received} bytes read)"
            sock.settimeout(remaining)
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except ConnectionResetError:
                pytest.fail(
                    f"connection reset by the server after {received} bytes and {len(frames)} frames "
                    f"(the last of them {last_data_at - reading_since:.2f}s into reading, the reset at "
                    f"{time.monotonic() - reading_since:.2f}s) "
                    f"(last: {[describe_frame(f) for f in frames[-2:]]}), instead of an orderly close",
                    pytrace=False,
                )
            if not data:
                break
            received += len(data)
            last_data_at = time.monotonic()
            frames.extend(item for item in decoder.feed(data) if isinstance(item, Frame))
    finally:
        sock.close()
    terminal = [f for f in frames if f.type in TERMINAL_TYPES]
    assert len(terminal) == 1 and error_code(terminal[0]) == ErrorCode.CREDIT_STALL, [
        describe_frame(f) for f in terminal
    ]
    assert frames[-1] is terminal[0], f"frames after the terminal frame: {describe_frame(frames[-1])}"
    print(f"\nread {received} bytes, {len(frames)} frames, then EOF after {time.monotonic() - reading_since:.2f}s")


# 6. Authentication comes first ---------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_bytes(b"s3cret\n")
    return path


def test_unauthenticated_oversized_header_gets_unauthorized_and_close(cc50_server: StartCC50, token_file: Path) -> None:
    """
    Before HELLO nothing but HELLO is acceptable, whatever its size: an
    unauthenticated peer must not learn the server's frame limit or keep the
    connection by sending oversized headers.
    """
    server = cc50_server("--toy-iters=0", f"--auth-token-file={token_file}", "--max-frame-bytes=4096")
    with server.connect(timeout=5) as conn:
        conn.send(encode_header(MessageType.REQ_INFER, 1, 5000))
        frames = conn.expect_closed(timeout=3)
    assert [error_code(f) for f in frames] == [ErrorCode.UNAUTHORIZED], [describe_frame(f) for f in frames]


def test_wrong_hello_then_garbage_gets_exactly_one_error(cc50_server: StartCC50, token_file: Path) -> None:
    """
    The refusal closes the connection, so bytes that arrived with the wrong
    HELLO are never parsed: one RESP_ERR UNAUTHORIZED, then EOF.
    """
    server = cc50_server("--toy-iters=0", f"--auth-token-file={token_file}")
    with server.connect(timeout=5) as conn:
        conn.send(encode_hello(b"wrong") + b"garbage!" * 4)
        frames = conn.expect_closed(timeout=5)
    assert [error_code(f) for f in frames] == [ErrorCode.UNAUTHORIZED], [describe_frame(f) for f in frames]


# 6(b). An error text that cannot be encoded ----------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_error_with_a_lone_surrogate_still_ends_the_request(cc50_server: StartCC50) -> None:
    """
    An upstream's error message can carry a lone surrogate (``\\ud800`` is
    valid JSON); the strict UTF-8 encoding of RESP_ERR raised on it, so the
    request got no terminal frame and kept its backend slot.  Now: one
    RESP_ERR with the character replaced, and the slot free for the next
    request (``--max-concurrency=1``).
    """
    script = Script()
    port = SwitchablePort("surrogate", script)
    await port.switch("http")
    try:
        tail = (b'data: {"error": {"message": "upstream broke \\ud800 MARK"}}\n\n',)
        script.set(in_stream("surrogate", "/completion", tail), faults=1)
        server = cc50_server(
            "--backend=llama_server",
            f"--llama-url={port.url}",
            "--llama-health-interval=0",
            "--max-concurrency=1",
        )

        def twoRequests() -> tuple[Outcome, Outcome]:
            with server.connect(timeout=10) as conn:
                first = conn.infer(1, "hello", 8)
                second = conn.infer(2, "hello", 8)
                return first, second

        first, second = await deferToThread(twoRequests)
    finally:
        await port.switch("refused")
    assert first.error is not None and first.done is None, first
    assert first.error.code == ErrorCode.BACKEND_ERROR
    assert "upstream broke ? MARK" in first.error.message, first.error.message
    assert second.done is not None, f"the slot was not freed: {second}"
