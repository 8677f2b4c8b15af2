"""
Attacks on answers sent at once, against a real ``twistd cc50 --toy-iters=0``.

The unit attacks (``cc50tw/test/test_immediate_attacks.py``) try a buggy
``answerNow``; here the toy's real one meets real sockets: a pipelined mix of
answers at once, streamed, held for credit and reused ids on one connection;
authentication; and a flood of answers at once to a client that resets the
connection while they are written.  Metrics, request log lines and slots must
come out exact.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from cc50tw.codec import (
    ErrorCode,
    Frame,
    MessageType,
    decode_done,
    decode_error,
    encode_cancel,
    encode_credit,
    encode_hello,
    encode_infer,
)
from cc50tw.generation import GenerationOptions
from tests.conftest import StartCC50
from tests.helpers import RawConnection, describe_frame, send_until_blocked
from tests.test_operations_real import http_get, metric, start_with_metrics

REQUEST_LINE = re.compile(r"request (\d+) from ")


def read_until_terminals(conn: RawConnection, wanted: int, timeout: float = 10.0) -> list[Frame]:
    """Frames until ``wanted`` terminal frames have come."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while sum(f.type in (MessageType.RESP_DONE, MessageType.RESP_ERR) for f in frames) < wanted:
        frames.append(conn.read_frame(max(0.01, deadline - time.monotonic())))
    return frames


def request_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if REQUEST_LINE.search(line)]


def test_pipelined_mix_one_terminal_each_exact_records(cc50_server: StartCC50) -> None:
    """
    One write holding answers at once, a streamed answer, an answer held for
    credit, a req_id reused after its answer, late cancel/credit frames and a
    request with options: each REQ_INFER ends once, nothing follows a terminal
    frame, the window holds, and metrics and log lines count every request
    once (fewer than the 256 the metrics fold at).
    """
    server, base = start_with_metrics(cc50_server, "--toy-iters=0")
    with RawConnection(server.socket_address) as conn:
        conn.send(
            b"".join(
                [
                    encode_infer(1, "a b c", 3),  # at once
                    encode_infer(2, "a", 600),  # over the toy's 512: streamed
                    encode_infer(3, "a", 3, credit_bytes=8),  # 18 bytes of answer: held
                    encode_infer(4, "a", 1),  # at once...
                    encode_infer(4, "a", 1),  # ...so 4 is free again: a second request
                    encode_cancel(1),  # 1 is over: ignored
                    encode_credit(1, 5),  # ignored
                    encode_infer(5, "a", 2, options=GenerationOptions(model="toy")),
                ]
            )
        )
        frames = read_until_terminals(conn, 5)
        chunk_bytes_3 = sum(len(f.payload) for f in frames if f.req_id == 3 and f.type == MessageType.RESP_CHUNK)
        assert chunk_bytes_3 == 8, [describe_frame(f) for f in frames if f.req_id == 3]
        conn.expect_silence(0.2)
        conn.send(encode_credit(3, 10))
        frames += read_until_terminals(conn, 1)
        conn.expect_silence(0.2)  # nothing more: no second terminal frame for anyone
    ended: dict[int, int] = {}
    text: dict[int, bytes] = {}
    for frame in frames:
        if frame.type == MessageType.RESP_CHUNK:
            assert ended.get(frame.req_id, 0) < (2 if frame.req_id == 4 else 1), describe_frame(frame)
            text[frame.req_id] = text.get(frame.req_id, b"") + frame.payload
        else:
            assert frame.type == MessageType.RESP_DONE, describe_frame(frame)
            ended[frame.req_id] = ended.get(frame.req_id, 0) + 1
    assert ended == {1: 1, 2: 1, 3: 1, 4: 2, 5: 1}
    assert text == {1: b" token" * 3, 2: b" token" * 600, 3: b" token" * 3, 4: b" token" * 2, 5: b" token" * 2}
    [done5] = [f for f in frames if f.req_id == 5 and f.type == MessageType.RESP_DONE]
    assert decode_done(done5).finish_reason == "length"
    _, _, scraped = http_get(base + "/metrics")
    assert metric(scraped, "cc50_requests_total", outcome="done") == 6
    assert metric(scraped, "cc50_request_duration_seconds_count") == 6
    assert metric(scraped, "cc50_generated_tokens_total") == 3 + 600 + 3 + 1 + 1 + 2
    assert metric(scraped, "cc50_model_requests_total", model="toy", outcome="done") == 1
    assert metric(scraped, "cc50_requests_in_flight") == 0
    server.stop()
    lines = request_lines(server.log())
    assert sorted(int(REQUEST_LINE.search(line).group(1)) for line in lines) == [1, 2, 3, 4, 4, 5], lines  # type: ignore[union-attr]


def test_hello_still_required_first(cc50_server: StartCC50, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"s3cret\n")
    server = cc50_server("--toy-iters=0", f"--auth-token-file={token}")
    with server.connect(timeout=5) as conn:
        conn.send(encode_infer(1, "p", 3) + encode_hello(b"s3cret") + encode_infer(2, "p", 3))
        frames = conn.expect_closed(timeout=5)
    assert [(f.type, f.req_id, decode_error(f).code) for f in frames] == [
        (MessageType.RESP_ERR, 0, ErrorCode.UNAUTHORIZED)
    ], [describe_frame(f) for f in frames]
    with server.connect(timeout=5) as conn:
        conn.send(encode_hello(b"s3cret") + encode_infer(1, "p", 2))
        frames = conn.read_frames(4)
        assert [f.type for f in frames] == [
            MessageType.HELLO,
            MessageType.RESP_CHUNK,
            MessageType.RESP_CHUNK,
            MessageType.RESP_DONE,
        ], [describe_frame(f) for f in frames]


def test_reset_while_answers_are_written_leaks_nothing(cc50_server: StartCC50) -> None:
    """
    A client floods answers-at-once of 15 KB each and resets the connection
    while they are being written: the server frees every slot, serves the
    next client, and its metrics and request log agree request for request.
    """
    server, base = start_with_metrics(cc50_server, "--toy-iters=0")
    for round_ in range(3):
        flooder = RawConnection(server.socket_address, recv_buffer=4096)
        request = b"".join(encode_infer(n % 500 + 1, "p", 512) for n in range(20_000))
        send_until_blocked(flooder.sock, request, 1.5)
        try:
            flooder.sock.recv(1000)  # take a little, so the server is mid-write
        except (BlockingIOError, OSError):
            pass
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        flooder.sock.close()
        with RawConnection(server.socket_address, timeout=5) as other:
            outcome = other.infer(1, "p", 5)
            assert outcome.done is not None and outcome.terminal_frames == 1, (round_, outcome)
    time.sleep(0.3)
    _, _, scraped = http_get(base + "/metrics")
    assert metric(scraped, "cc50_requests_in_flight") == 0
    assert metric(scraped, "cc50_requests_queued") == 0
    assert metric(scraped, "cc50_connections_open") == 0
    done = metric(scraped, "cc50_requests_total", outcome="done")
    total = sum(
        metric(scraped, "cc50_requests_total", outcome=o)
        for o in ("done", "disconnected", "credit_stall", "backend_error", "cancelled")
    )
    assert metric(scraped, "cc50_request_duration_seconds_count") == total
    server.stop()
    lines = request_lines(server.log())
    assert len(lines) == total, (len(lines), total)
    assert sum(": done " in line for line in lines) == done
