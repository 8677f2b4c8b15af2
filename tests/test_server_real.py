"""
The real thing: ``twistd cc50`` as a subprocess, driven over real sockets by
the real ``cc50`` CLI, by the client library, and by raw sockets that send
exactly the bytes a broken or hostile client would.

Most tests share one server for the module (``SHARED_SERVER_ARGS``) because
that is the point: whatever one client does, the same process goes on
serving everyone else.  Every misbehaving-client test therefore ends by
checking that a request already in flight on another connection (the
"bystander") and a request on a fresh connection both complete correctly,
and that the process is still alive; the fixture's teardown then checks the
server exits cleanly on SIGTERM with no traceback in its log.
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from cc50tw.client import CC50ClientProtocol, Response, connect
from cc50tw.codec import (
    MAGIC,
    VERSION,
    DoneStats,
    ErrorCode,
    Frame,
    MessageType,
    decode_error,
    encode_cancel,
    encode_credit,
    encode_frame,
    encode_header,
    encode_infer,
)
from cc50tw.errors import ClientError
from cc50tw.tap import _SERVER_OPTIONS
from tests.conftest import StartCC50
from tests.helpers import (
    CLEAN_EXIT_ON_SIGTERM,
    LOOPBACK,
    REPO_ROOT,
    Outcome,
    RawConnection,
    ServerProcess,
    apply_frame,
    cc50_command,
    cc50_server_command,
    describe_frame,
    free_port,
    port_in_use,
    raw_infer,
    twistd_command,
)

MAX_FRAME_BYTES = 4096
STALL_TIMEOUT = 2
SHARED_SERVER_ARGS = (
    "--toy-iters=0",
    f"--max-frame-bytes={MAX_FRAME_BYTES}",
    f"--stall-timeout={STALL_TIMEOUT}",
)

TOKEN = b" token"
ALL_CREDIT = 0xFFFFFFFF  # the largest initial window REQ_INFER can carry

CPP_SUMMARY = re.compile(r"^iters=20 mean_ms=\d+\.\d{3} p50_ms=\d+\.\d{3} p95_ms=\d+\.\d{3} p99_ms=\d+\.\d{3}$")


def tokens(n: int) -> bytes:
    return TOKEN * n


def run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_error(frame: Frame, req_id: int, code: ErrorCode, *fragments: str) -> str:
    """``frame`` is RESP_ERR for ``req_id`` with ``code`` in flags and a readable message."""
    assert frame.type == MessageType.RESP_ERR, describe_frame(frame)
    assert frame.req_id == req_id, describe_frame(frame)
    reply = decode_error(frame)
    assert reply.code == code, f"expected {code.name}, got {reply.code}: {reply.message}"
    for fragment in fragments:
        assert fragment in reply.message, reply.message
    return reply.message


def assert_completed(outcome: Outcome, n: int) -> None:
    assert outcome.error is None, f"request {outcome.req_id} failed: {outcome.error}"
    assert outcome.done is not None
    assert outcome.terminal_frames == 1
    assert outcome.text == tokens(n)
    assert outcome.done.tokens == n
    assert outcome.done.generated_tokens == n


# The bystander --------------------------------------------------------------

BYSTANDER_ID = 0xB5B5B5B5_00000001
BYSTANDER_TOKENS = 40_000  # 1.2 MB on the wire, read through a small receive window


class Bystander(NamedTuple):
    conn: RawConnection
    outcome: Outcome


@pytest.fixture
def bystander(shared_cc50_server: ServerProcess) -> Iterator[Bystander]:
    """
    A large request in flight on its own connection, unread while the test
    misbehaves on another one (so the server is holding it paused on a full
    send buffer); ``assert_unharmed`` then reads it to the end.
    """
    conn = shared_cc50_server.connect(recv_buffer=8192)
    conn.send_infer(BYSTANDER_ID, "an innocent bystander", BYSTANDER_TOKENS, ALL_CREDIT)
    outcome = Outcome(BYSTANDER_ID)
    apply_frame({BYSTANDER_ID: outcome}, conn.read_frame())  # it has started
    yield Bystander(conn, outcome)
    conn.close()


def assert_unharmed(server: ServerProcess, bystander: Bystander | None = None) -> None:
    """The server still serves: the bystander finishes intact, a new connection works, the process lives."""
    if bystander is not None:
        outcomes = {BYSTANDER_ID: bystander.outcome}
        while not bystander.outcome.finished:
            apply_frame(outcomes, bystander.conn.read_frame())
        assert_completed(bystander.outcome, BYSTANDER_TOKENS)
    fresh = raw_infer(server.socket_address, "still there?", 5, req_id=0xFEED)
    assert_completed(fresh, 5)
    assert fresh.done is not None and fresh.done.prompt_tokens == 2
    assert server.alive(), f"server exited:\n{server.log_tail()}"


# The cc50 CLI -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["address", "endpoint"])
def test_cli_infer_streams_tokens(shared_cc50_server: ServerProcess, form: str) -> None:
    server = getattr(shared_cc50_server, form)  # 127.0.0.1:PORT, or tcp:127.0.0.1:PORT
    result = run(
        cc50_command("infer", "--server", server, "--prompt", "Explain quantum computing", "--max-tokens", "7")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == " token" * 7 + "\n"
    assert re.search(r"^tokens=7 prompt_tokens=3 elapsed_us=\d+ ttft_us=\d+$", result.stderr, re.M), result.stderr


def test_cli_bench_ends_with_cpp_summary_line(shared_cc50_server: ServerProcess) -> None:
    result = run(
        cc50_command(
            "bench",
            f"--server={shared_cc50_server.address}",
            "--prompt=hi",
            "--max-tokens=3",
            "--iters=20",
            "--print=1",
        )
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == " token token token"  # --print=1: the first answer's text
    assert any(line.startswith("requests=20 errors=0 ") for line in lines), result.stdout
    assert CPP_SUMMARY.match(lines[-1]), lines[-1]


def test_cli_bench_concurrent(shared_cc50_server: ServerProcess) -> None:
    result = run(
        cc50_command(
            "bench",
            "--server",
            shared_cc50_server.endpoint,
            "--max-tokens=50",
            "--iters=200",
            "--concurrency=8",
            "--connections=4",
        )
    )
    assert result.returncode == 0, result.stderr
    assert "requests=200 errors=0 concurrency=8 connections=4" in result.stdout
    assert "tokens=10000 " in result.stdout
    assert result.stdout.splitlines()[-1].startswith("iters=200 mean_ms=")


def test_cli_reports_server_error(shared_cc50_server: ServerProcess) -> None:
    """A RESP_ERR reaches the user as its code and message, with a non-zero exit."""
    prompt = "x" * (MAX_FRAME_BYTES + 1)
    result = run(cc50_command("infer", "--server", shared_cc50_server.address, "--prompt", prompt, "--max-tokens", "3"))
    assert result.returncode == 1
    assert "error TOO_LARGE (5):" in result.stderr
    assert "--max-frame-bytes" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Unhandled error" not in result.stderr, result.stderr


def test_cli_connection_refused() -> None:
    """No server: a one-line message naming the server, no traceback, non-zero exit."""
    address = f"{LOOPBACK}:{free_port()}"
    result = run(cc50_command("infer", "--server", address, "--max-tokens", "1"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("cc50: "), result.stderr
    assert address in result.stderr and "refused" in result.stderr.lower(), result.stderr


# The client library -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_100_requests_over_10_connections(shared_cc50_server: ServerProcess) -> None:
    """
    Ten connections, ten requests in flight on each, all sent before any is
    answered: every connection uses req_ids 1-10, and on each connection the
    answers' chunks interleave.  Each request gets a different length, so a
    chunk delivered to the wrong req_id would show up as a wrong count.
    """
    from twisted.internet import reactor

    clients: list[CC50ClientProtocol] = await gatherResults(
        [connect(reactor, shared_cc50_server.endpoint) for _ in range(10)]
    )
    arrivals: list[list[int]] = [[] for _ in clients]
    try:
        requests: list[tuple[int, int, Response, list[str]]] = []
        for number in range(100):
            connection = number % 10
            # Some answers span several of the toy's 512-token batches, so
            # they can only complete by taking turns with the others.
            max_tokens = 1 + (number * 37) % 300 + (1500 if number % 3 == 0 else 0)
            response = clients[connection].infer(f"request number {number}", max_tokens)
            parts: list[str] = []

            def onChunk(
                text: str, parts: list[str] = parts, log: list[int] = arrivals[connection], rid: int = response.req_id
            ) -> None:
                parts.append(text)
                log.append(rid)

            response.onChunk = onChunk
            requests.append((number, max_tokens, response, parts))
        assert [client.inFlight for client in clients] == [10] * 10
        results: list[DoneStats] = await gatherResults([response.done for _, _, response, _ in requests])
        for (number, max_tokens, response, parts), stats in zip(requests, results):
            assert response.req_id == number // 10 + 1
            assert "".join(parts) == " token" * max_tokens, f"request {number}"
            assert response.chunkBytes == 6 * max_tokens
            assert stats.tokens == max_tokens
            assert stats.generated_tokens == max_tokens
            assert stats.prompt_tokens == 3
            assert stats.ttft_us is not None and stats.ttft_us <= stats.elapsed_us
        assert [client.inFlight for client in clients] == [0] * 10
        for log in arrivals:
            switches = sum(1 for a, b in zip(log, log[1:]) if a != b)
            assert switches > 10, f"chunks were not interleaved: only {switches} switches between req_ids"
    finally:
        await gatherResults([client.close() for client in clients])


@pytest_twisted.ensureDeferred
async def test_async_iteration_and_sequential_reuse(shared_cc50_server: ServerProcess) -> None:
    from twisted.internet import reactor

    client = await connect(reactor, shared_cc50_server.address)
    try:
        for round_ in range(3):
            response = client.infer("stream me", 40)
            texts = [text async for text in response]
            assert "".join(texts) == " token" * 40
            stats = await response.done
            assert stats.tokens == 40
            assert response.req_id == round_ + 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_client_errors_end_only_their_request(shared_cc50_server: ServerProcess) -> None:
    """A too-large prompt fails with TOO_LARGE; its neighbours on the connection finish."""
    from twisted.internet import reactor

    client = await connect(reactor, shared_cc50_server.endpoint)
    try:
        before = client.infer("before", 500)
        too_large = client.infer("x" * (MAX_FRAME_BYTES + 1), 5)
        after = client.infer("after", 7)
        with pytest.raises(ClientError) as caught:
            await too_large.done
        assert caught.value.code == ErrorCode.TOO_LARGE
        assert caught.value.req_id == too_large.req_id
        assert (await before.collect()).stats.tokens == 500
        completion = await after.collect()
        assert completion.text == " token" * 7
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_client_cancel(shared_cc50_server: ServerProcess) -> None:
    from twisted.internet import reactor

    client = await connect(reactor, shared_cc50_server.endpoint)
    try:
        response = client.infer("endless", 10_000_000)
        received = 0
        async for text in response:
            received += len(text)
            if received >= 6000:
                response.cancel()
                break
        with pytest.raises(ClientError) as caught:
            await response.done
        assert caught.value.code == ErrorCode.CANCELLED
        completion = await client.infer("next", 2).collect()
        assert completion.stats.tokens == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_collect_leaves_done_with_the_stats(shared_cc50_server: ServerProcess) -> None:
    from twisted.internet import reactor

    client = await connect(reactor, shared_cc50_server.endpoint)
    try:
        response = client.infer("both", 2)
        completion = await response.collect()
        assert completion.stats.tokens == 2
        stats = await response.done
        assert isinstance(stats, DoneStats), f"response.done fired with {stats!r}"
    finally:
        await client.close()


# Raw sockets: well-formed but demanding ------------------------------------------


def test_raw_multiplexing_with_arbitrary_req_ids(shared_cc50_server: ServerProcess) -> None:
    """C++ clients use time-derived 64-bit req_ids; any u64 but 0 works, and streams interleave."""
    ids = [0xFFFFFFFFFFFFFFFF, 1, 0x1234567890ABCDEF, 1 << 32, 42]  # any but 0, which is reserved
    lengths = {req_id: 1500 + 97 * i for i, req_id in enumerate(ids)}  # several 512-token toy batches each
    with shared_cc50_server.connect() as conn:
        conn.send(b"".join(encode_infer(req_id, "multiplex", lengths[req_id]) for req_id in ids))
        outcomes = {req_id: Outcome(req_id) for req_id in ids}
        order: list[int] = []
        while not all(o.finished for o in outcomes.values()):
            frame = conn.read_frame()
            apply_frame(outcomes, frame)
            if frame.type == MessageType.RESP_CHUNK:
                order.append(frame.req_id)
        conn.expect_silence(0.2)
    for req_id in ids:
        assert_completed(outcomes[req_id], lengths[req_id])
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 2 * len(ids), f"streams did not interleave ({switches} switches)"


def test_raw_cpp_client_request_bytes(shared_cc50_server: ServerProcess) -> None:
    """The exact REQ_INFER captured from the C++ client gets its 64 tokens."""
    vectors = json.loads((REPO_ROOT / "cc50tw" / "test" / "data" / "cc50-v1-captured.json").read_text())
    captured = vectors["cpp_client_req_infer"]
    with shared_cc50_server.connect() as conn:
        conn.send(bytes.fromhex(captured["hex"]))
        req_id = captured["fields"]["req_id"]
        outcome = conn.collect([req_id])[req_id]
    assert_completed(outcome, captured["fields"]["payload"]["max_tokens"])
    assert outcome.done is not None and outcome.done.prompt_tokens == 6  # the toy counts words


def test_credit_window_and_grant(shared_cc50_server: ServerProcess) -> None:
    """The server sends no more chunk bytes than granted, then waits for REQ_CREDIT."""
    with shared_cc50_server.connect() as conn:
        conn.send_infer(4, "credit", 5, credit_bytes=10)
        outcomes = {4: Outcome(4)}
        while len(outcomes[4].text) < 10:
            apply_frame(outcomes, conn.read_frame())
        assert outcomes[4].text == b" token tok"
        conn.expect_silence(0.3)
        conn.send(encode_credit(4, 100))
        while not outcomes[4].finished:
            apply_frame(outcomes, conn.read_frame())
    assert_completed(outcomes[4], 5)


def test_zero_max_tokens_means_the_server_default(shared_cc50_server: ServerProcess) -> None:
    with shared_cc50_server.connect() as conn:
        assert_completed(conn.infer(1, "as many as you like", 0), 256)  # --max-tokens default


def test_default_window_without_grants(shared_cc50_server: ServerProcess) -> None:
    """
    credit_bytes 0 is a 262144-byte window.  A client that never sends
    REQ_CREDIT (the C++ client) gets any answer that fits it; one byte more and
    the request ends in CREDIT_STALL, after exactly the window's bytes.
    """
    fits = 262144 // len(TOKEN)
    with shared_cc50_server.connect() as conn:
        assert_completed(conn.infer(1, "fits", fits), fits)
        conn.send_infer(2, "one token too many", fits + 1)
        outcome = conn.collect([2], timeout=STALL_TIMEOUT + 10)[2]
    assert outcome.text == tokens(fits + 1)[:262144]
    assert outcome.error is not None and outcome.error.code == ErrorCode.CREDIT_STALL, outcome.error


def test_credit_stall_timeout(shared_cc50_server: ServerProcess) -> None:
    with shared_cc50_server.connect() as conn:
        started = time.monotonic()
        conn.send_infer(5, "stall", 5, credit_bytes=6)
        first = conn.read_frame()
        assert (first.type, first.payload) == (MessageType.RESP_CHUNK, b" token")
        error = conn.read_frame(timeout=STALL_TIMEOUT + 5)
        waited = time.monotonic() - started
        assert_error(error, 5, ErrorCode.CREDIT_STALL, "REQ_CREDIT")
        assert STALL_TIMEOUT - 0.5 <= waited <= STALL_TIMEOUT + 3
        conn.send(encode_credit(5, 100))  # too late: ignored
        conn.expect_silence(0.3)
        assert_completed(conn.infer(6, "again", 2), 2)


def test_zero_credit_grants_do_not_defeat_the_stall_timeout(shared_cc50_server: ServerProcess) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send_infer(41, "stall", 5, credit_bytes=6)
        assert conn.read_frame().payload == b" token"
        for _ in range(3):  # 2.4 s of "grants" that grant nothing, past the 2 s stall timeout
            time.sleep(0.8)
            conn.send(encode_credit(41, 0))
        assert_error(conn.read_frame(timeout=1), 41, ErrorCode.CREDIT_STALL)


def test_cancel_mid_stream(shared_cc50_server: ServerProcess) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send_infer(8, "endless", 10_000_000, ALL_CREDIT)
        outcomes = {8: Outcome(8)}
        for _ in range(50):
            apply_frame(outcomes, conn.read_frame())
        conn.send(encode_cancel(8))
        while not outcomes[8].finished:
            apply_frame(outcomes, conn.read_frame())
        assert outcomes[8].error is not None and outcomes[8].error.code == ErrorCode.CANCELLED
        assert outcomes[8].done is None
        conn.send(encode_cancel(8))  # already finished: ignored
        conn.expect_silence(0.3)
        assert_completed(conn.infer(9, "next", 3), 3)


def test_cancel_and_credit_for_unknown_req_ids_are_ignored(shared_cc50_server: ServerProcess) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send(encode_cancel(99) + encode_credit(98, 1000))
        conn.expect_silence(0.3)
        assert_completed(conn.infer(1, "fine", 3), 3)


# Raw sockets: misbehaving clients -------------------------------------------------


def test_garbage_bytes(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    garbage = random.Random(50).randbytes(300)
    assert garbage[:4] != b"CC50"
    with shared_cc50_server.connect() as conn:
        conn.send(garbage)
        frames = conn.expect_closed()
    assert len(frames) == 1, [describe_frame(f) for f in frames]
    assert_error(frames[0], 0, ErrorCode.BAD_FRAME, "bad magic", "not a CC50 stream")
    assert_unharmed(shared_cc50_server, bystander)


def test_http_request_on_the_cc50_port(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        frames = conn.expect_closed()
    assert len(frames) == 1
    assert_error(frames[0], 0, ErrorCode.BAD_FRAME, "bad magic 0x20544547")
    assert_unharmed(shared_cc50_server, bystander)


def test_bad_magic_after_good_request(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    """A good request first, then a frame with bad magic: ERR with req_id 0, then close."""
    bad = struct.pack("<IHHQII", 0x31354343, VERSION, MessageType.REQ_INFER, 5, 0, 0)
    with shared_cc50_server.connect() as conn:
        assert_completed(conn.infer(1, "good", 2), 2)
        conn.send(bad)
        frames = conn.expect_closed()
    assert len(frames) == 1
    assert_error(frames[0], 0, ErrorCode.BAD_FRAME, "bad magic 0x31354343", "closing the connection")
    assert_unharmed(shared_cc50_server, bystander)


def test_wrong_version(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    payload = struct.pack("<III", 3, 0, 2) + b"hi"
    frame = struct.pack("<IHHQII", MAGIC, 2, MessageType.REQ_INFER, 5, 0, len(payload)) + payload
    with shared_cc50_server.connect() as conn:
        conn.send(frame)
        frames = conn.expect_closed()
    assert len(frames) == 1
    # Every error that closes the connection is on req_id 0, not the frame's.
    assert_error(frames[0], 0, ErrorCode.UNSUPPORTED_VERSION, "version 2")
    assert_unharmed(shared_cc50_server, bystander)


def test_infer_on_req_id_0_closes_the_connection(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    """
    req_id 0 is reserved for connection-level errors, so a REQ_INFER on it is
    one: RESP_ERR BAD_REQUEST on req_id 0 is the last frame, and a request in
    flight on the connection gets nothing more (no terminal frame of its own).
    """
    with shared_cc50_server.connect() as conn:
        conn.send_infer(3, "waits for credit", 5, credit_bytes=6)
        first = conn.read_frame()
        assert (first.type, first.req_id) == (MessageType.RESP_CHUNK, 3), describe_frame(first)
        assert first.payload == b" token", describe_frame(first)
        conn.send(encode_infer(0, "on the reserved id", 2) + encode_credit(3, 100) + encode_infer(4, "after it", 2))
        frames = conn.expect_closed()
    assert len(frames) == 1, [describe_frame(f) for f in frames]
    assert_error(frames[0], 0, ErrorCode.BAD_REQUEST, "req_id 0")
    assert_unharmed(shared_cc50_server, bystander)


def test_oversized_frame_is_refused_before_its_payload(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    """TOO_LARGE comes as soon as the header arrives; the payload is skipped and the connection goes on."""
    length = MAX_FRAME_BYTES * 3
    payload = struct.pack("<III", 3, 0, length - 12) + b"p" * (length - 12)
    with shared_cc50_server.connect() as conn:
        conn.send(encode_header(MessageType.REQ_INFER, 9, length) + payload[:100])
        assert_error(
            conn.read_frame(timeout=5), 9, ErrorCode.TOO_LARGE, f"frame of {length} bytes", "--max-frame-bytes"
        )
        conn.send(payload[100:])
        assert_completed(conn.infer(10, "after the big one", 4), 4)
    assert_unharmed(shared_cc50_server, bystander)


def test_huge_length_is_never_buffered(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send(encode_header(MessageType.REQ_INFER, 11, 0xFFFFFFFF))
        assert_error(conn.read_frame(timeout=5), 11, ErrorCode.TOO_LARGE, "4294967295")
        conn.send(b"\0" * (4 << 20))  # discarded as it arrives
        conn.expect_silence(0.3)
    assert_unharmed(shared_cc50_server, bystander)


@pytest.mark.parametrize(
    "fragment",
    [
        pytest.param(encode_infer(12, "cut short", 3)[:10], id="half-a-header"),
        pytest.param(encode_infer(12, "cut short", 3)[:30], id="header-and-part-of-the-payload"),
        pytest.param(encode_infer(12, "done", 3) + encode_infer(13, "cut", 3)[:30], id="a-request-then-a-fragment"),
    ],
)
def test_truncated_frame_then_close(shared_cc50_server: ServerProcess, bystander: Bystander, fragment: bytes) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send(fragment)
        conn.shutdown_write()
        frames = conn.expect_closed()
    # Whatever was complete may be answered (or dropped as the connection
    # closes); the fragment never is.
    assert all(f.req_id == 12 for f in frames), [describe_frame(f) for f in frames]
    assert_unharmed(shared_cc50_server, bystander)


def wait_for_log(server: ServerProcess, text: str, timeout: float = 3.0) -> bool:
    """Poll the server's log until it contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log():
            return True
        time.sleep(0.05)
    return text in server.log()


#: Frames that are a per-frame error whatever their req_id: (frame for a
#: req_id, the error that ends a request in flight on it, part of its message).
JUNK_FRAMES = [
    pytest.param(
        lambda rid: encode_frame(99, rid, b"whatever"),
        ErrorCode.UNKNOWN_TYPE,
        "unknown frame type 99",
        id="unknown-type",
    ),
    pytest.param(
        lambda rid: encode_frame(MessageType.RESP_CHUNK, rid, b" token"),
        ErrorCode.UNKNOWN_TYPE,
        "RESP_CHUNK",
        id="resp-chunk",
    ),
    pytest.param(
        lambda rid: encode_frame(MessageType.RESP_ERR, rid, b"no", flags=ErrorCode.CANCELLED),
        ErrorCode.UNKNOWN_TYPE,
        "RESP_ERR",
        id="resp-err",
    ),
    pytest.param(
        lambda rid: encode_header(MessageType.REQ_CREDIT, rid, MAX_FRAME_BYTES + 1) + bytes(MAX_FRAME_BYTES + 1),
        ErrorCode.TOO_LARGE,
        "--max-frame-bytes",
        id="oversized-credit",
    ),
    pytest.param(
        lambda rid: encode_frame(MessageType.REQ_CREDIT, rid, b"\x01\x00\x00"),
        ErrorCode.BAD_REQUEST,
        "4 bytes",
        id="short-credit",
    ),
]


@pytest.mark.parametrize("junk, code, fragment", JUNK_FRAMES)
def test_junk_frame_is_dropped_on_an_idle_req_id_and_ends_a_live_request(
    shared_cc50_server: ServerProcess,
    bystander: Bystander,
    junk: Callable[[int], bytes],
    code: ErrorCode,
    fragment: str,
) -> None:
    """
    A per-frame error answers for a request only if one is in flight on its
    req_id: there it is the request's one terminal frame; on a req_id with
    nothing in flight it is dropped (no reply) and the connection goes on.
    """
    with shared_cc50_server.connect() as conn:
        peer = f"127.0.0.1:{conn.sock.getsockname()[1]}"
        # Nothing in flight on 21.  The server reads in order, so a reply to
        # the junk would come before 22's frames, and collect() fails on it.
        conn.send(junk(21))
        assert_completed(conn.infer(22, "still talking", 3), 3)
        # A request waiting for credit on 24: the same frame ends it.
        conn.send_infer(24, "waits for credit", 5, credit_bytes=6)
        first = conn.read_frame()
        assert (first.type, first.req_id) == (MessageType.RESP_CHUNK, 24), describe_frame(first)
        assert first.payload == b" token", describe_frame(first)
        conn.send(junk(24))
        assert_error(conn.read_frame(), 24, code, fragment)
        # Nothing more for 24: the credit and more junk on it are dropped now.
        conn.send(encode_credit(24, 100) + junk(24))
        assert_completed(conn.infer(25, "nothing more for 24", 2), 2)
        assert_completed(conn.infer(24, "the id is free again", 2), 2)
    if code != ErrorCode.BAD_REQUEST:
        # (A REQ_CREDIT for a req_id with nothing in flight is ignored without
        # a log line, malformed or not: it may cross a terminal frame.)
        dropped = f"dropped a frame from {peer} on req_id 21, which has no request in flight"
        assert wait_for_log(shared_cc50_server, dropped), f"no {dropped!r} in the server log"
    assert_unharmed(shared_cc50_server, bystander)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"\x01\x00\x00", "at least 12"),
        (struct.pack("<III", 3, 0, 10) + b"short", "prompt_len is 10"),
        (struct.pack("<III", 3, 0, 2) + b"\xff\xfe", "not valid UTF-8"),
    ],
    ids=["short-prefix", "prompt-len-mismatch", "bad-utf8"],
)
def test_malformed_infer_payload(
    shared_cc50_server: ServerProcess, bystander: Bystander, payload: bytes, fragment: str
) -> None:
    with shared_cc50_server.connect() as conn:
        conn.send(encode_frame(MessageType.REQ_INFER, 31, payload))
        assert_error(conn.read_frame(), 31, ErrorCode.BAD_REQUEST, fragment)
        assert_completed(conn.infer(31, "the same id, now valid", 2), 2)
    assert_unharmed(shared_cc50_server, bystander)


def test_duplicate_req_id(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    """
    A second REQ_INFER on a req_id in flight ends the request in flight with
    one RESP_ERR DUPLICATE_REQ_ID (its backend work cancelled); the duplicate
    is not started, nothing more comes for that req_id, and it is free again.
    """
    with shared_cc50_server.connect() as conn:
        conn.send(encode_infer(7, "original", 10_000_000, ALL_CREDIT) + encode_infer(7, "duplicate", 3))
        outcomes = {7: Outcome(7)}
        while not outcomes[7].finished:
            apply_frame(outcomes, conn.read_frame())
        original = outcomes[7]
        assert original.done is None, "the original went on to its DONE"
        assert original.error is not None and original.error.code == ErrorCode.DUPLICATE_REQ_ID, original.error
        assert "sent again while in flight" in original.error.message, original.error.message
        received = len(original.text)
        assert original.text == tokens(received // len(TOKEN) + 1)[:received], "not the original's text"
        assert received < 10_000_000 * len(TOKEN)
        # collect() fails on any frame for 7 (the duplicate's answer, say) before 8's DONE.
        assert_completed(conn.infer(8, "nothing more for 7", 2), 2)
        assert_completed(conn.infer(7, "reused after it ended", 2), 2)
    assert_unharmed(shared_cc50_server, bystander)


@pytest.mark.parametrize("how", ["reset", "close"])
def test_disconnect_mid_stream(shared_cc50_server: ServerProcess, bystander: Bystander, how: str) -> None:
    conn = shared_cc50_server.connect()
    conn.send(encode_infer(1, "endless", 10_000_000, ALL_CREDIT) + encode_infer(2, "endless", 10_000_000, ALL_CREDIT))
    conn.read_frames(100)
    if how == "reset":
        conn.abort()
    else:
        conn.close()
    assert_unharmed(shared_cc50_server, bystander)


def test_disconnect_stops_the_backend(shared_cc50_server: ServerProcess) -> None:
    """After the client goes, its 10M-token requests stop using the server's CPU."""
    conn = shared_cc50_server.connect()
    conn.send(encode_infer(1, "endless", 10_000_000, ALL_CREDIT))
    busy_start = shared_cc50_server.cpu_seconds()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # keep it busy: read as fast as we can
        conn.read_frame()
    busy = shared_cc50_server.cpu_seconds() - busy_start
    conn.abort()
    time.sleep(0.3)
    idle_start = shared_cc50_server.cpu_seconds()
    time.sleep(1.0)
    idle = shared_cc50_server.cpu_seconds() - idle_start
    # Thresholds are loose because this machine may be shared: streaming must
    # have cost measurable CPU, and the second after the disconnect almost none.
    assert busy >= 0.05, f"the server did not look busy while streaming ({busy:.2f} s CPU in 0.5 s)"
    assert idle <= min(0.06, busy / 3), f"the server used {idle:.2f} s of CPU in the second after its client vanished"
    assert_unharmed(shared_cc50_server)


def test_many_misbehaving_connections_at_once(shared_cc50_server: ServerProcess, bystander: Bystander) -> None:
    rng = random.Random(4)
    conns = [shared_cc50_server.connect() for _ in range(30)]
    for i, conn in enumerate(conns):
        kind = i % 3
        if kind == 0:
            conn.send(rng.randbytes(64))
        elif kind == 1:
            conn.send(encode_infer(i, "abandoned", 1_000_000, ALL_CREDIT))
        else:
            conn.send(encode_header(MessageType.REQ_INFER, i, 50)[:20])
    for conn in conns:
        conn.abort()
    assert_unharmed(shared_cc50_server, bystander)


def test_startup_log_names_backend_and_endpoint(shared_cc50_server: ServerProcess) -> None:
    log = shared_cc50_server.log()
    assert "cc50 backend: toy backend, 0 LCG iterations per token" in log
    assert f"cc50 serving backend 'toy' on tcp:{shared_cc50_server.port}:interface=127.0.0.1" in log


# twistd cc50: starting, options, endpoints -------------------------------------------


def test_help_lists_options_and_backends() -> None:
    result = run(twistd_command("cc50", "--help"))
    assert result.returncode == 0, result.stderr
    for option in [row[0] for row in _SERVER_OPTIONS] + ["listen", "toy-iters"]:
        assert f"--{option}=" in result.stdout, option
    backends = result.stdout.split("Backends (--backend):", 1)[1]
    assert re.search(r"^\s+toy\s+\S", backends, re.M), backends


def test_unknown_backend_fails_at_start() -> None:
    port = free_port()
    result = run(cc50_server_command(f"tcp:{port}:interface=127.0.0.1", "--backend=nope"), timeout=30)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    installed = re.search(r"unknown backend 'nope'; installed backends: (.*)", output)
    assert installed is not None, output
    assert "toy" in installed.group(1).split(", ")
    assert not port_in_use(port)


@pytest.mark.parametrize(
    "option, message",
    [
        ("--max-frame-bytes=0", "--max-frame-bytes must be at least 1"),
        ("--stall-timeout=-1", "--stall-timeout must be a positive number of seconds"),
        ("--toy-iters=lots", "--toy-iters=lots: must be a whole number"),
        ("--no-such-option", "no-such-option"),
        ("--listen=nonsense:a:b", "bad --listen 'nonsense:a:b'"),
    ],
)
def test_bad_options_fail_at_start(option: str, message: str) -> None:
    result = run(cc50_server_command(f"tcp:{free_port()}:interface=127.0.0.1", option), timeout=30)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_port_in_use_fails_at_start() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run(cc50_server_command(f"tcp:{port}:interface=127.0.0.1", "--toy-iters=0"), timeout=30)
        assert time.monotonic() - started < 20
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_listen_host_port_form(cc50_server: StartCC50) -> None:
    port = free_port()
    server = cc50_server("--toy-iters=0", listen=f"127.0.0.1:{port}", port=port)
    assert f"on tcp:{port}:interface=127.0.0.1" in server.log()
    assert_completed(raw_infer(server.socket_address, "host:port", 4), 4)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="cc50-") as name:
        yield Path(name)


def test_listen_unix_socket(cc50_server: StartCC50, short_dir: Path) -> None:
    path = short_dir / "cc50.sock"
    server = cc50_server("--toy-iters=0", unix_path=path)
    result = run(
        cc50_command("infer", "--server", f"unix:{path}", "--prompt", "over a unix socket", "--max-tokens", "7")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == " token" * 7 + "\n"
    assert_completed(raw_infer(str(path), "raw unix", 3), 3)
    assert server.alive()


def test_listen_repeats(cc50_server: StartCC50, short_dir: Path) -> None:
    path = short_dir / "second.sock"
    server = cc50_server("--toy-iters=0", f"--listen=unix:{path}")
    assert_completed(raw_infer(server.socket_address, "tcp", 2), 2)
    assert_completed(raw_infer(str(path), "unix", 2), 2)
    assert f"unix:{path}" in server.log()


def test_toy_iters_work_does_not_block_other_connections(cc50_server: StartCC50) -> None:
    """With real per-token work (in threads), a quick request is not stuck behind a slow one."""
    server = cc50_server("--toy-iters=20000")
    with server.connect() as slow:
        slow.send_infer(1, "slow", 100)
        slow.read_frame()
        started = time.monotonic()
        assert_completed(raw_infer(server.socket_address, "quick", 1), 1)
        quick = time.monotonic() - started
        outcome = slow.collect([1], timeout=60)[1]
    assert outcome.done is not None and outcome.done.tokens == 100
    assert quick < 1.0, f"a 1-token request took {quick:.2f} s next to a 100-token one"


def test_unread_streams_do_not_hold_backend_slots_forever(cc50_server: StartCC50) -> None:
    server = cc50_server("--toy-iters=0", "--max-concurrency=1", "--max-queue=1", "--stall-timeout=0.5")
    with server.connect(recv_buffer=8192) as hog:
        hog.send_infer(1, "read nothing", 10_000_000, ALL_CREDIT)
        hog.read_frame()
        time.sleep(1.5)  # well past --stall-timeout with nothing read
        assert_completed(raw_infer(server.socket_address, "anyone else?", 2, timeout=1.5), 2)


def test_sigterm_with_clients_connected(cc50_server: StartCC50) -> None:
    """
    SIGTERM with requests in flight: after --drain-timeout each one ends with
    SHUTTING_DOWN (a client still reading sees it as its terminal frame),
    clients that read nothing are cut off, and the process exits cleanly in
    bounded time.
    """
    server = cc50_server("--toy-iters=0", "--drain-timeout=1")
    stalled = [server.connect(recv_buffer=8192) for _ in range(2)]
    for i, conn in enumerate(stalled):
        conn.send_infer(i, "never read", 10_000_000, ALL_CREDIT)
    reader = server.connect()
    reader.send_infer(7, "read to the end", 10_000_000, ALL_CREDIT)
    outcomes = {7: Outcome(7)}
    apply_frame(outcomes, reader.read_frame())
    started = time.monotonic()
    server.terminate()
    while not outcomes[7].finished:
        apply_frame(outcomes, reader.read_frame())
    assert outcomes[7].error is not None, "the request should have been cut short"
    assert outcomes[7].error.code == ErrorCode.SHUTTING_DOWN, outcomes[7].error
    assert 0.5 < time.monotonic() - started < 5
    assert reader.expect_closed() == []
    status = server.stop(timeout=20)
    assert status in CLEAN_EXIT_ON_SIGTERM, server.log_tail()
    assert time.monotonic() - started < 15
    assert not server.log_problems(), server.log_problems()
    for conn in stalled + [reader]:
        conn.close()
