"""
Answers sent at once (issue 18a), against a real ``twistd cc50 --toy-iters=0``.

At zero iterations the toy answers up to 512 tokens at once, in one write,
with no stream; longer answers and answers over the client's credit window
still stream.  A client must not be able to tell the two apart except by
speed: the same frames, the same counts, the same log line and metrics, the
same credit rules.
"""

from __future__ import annotations

import re

from cc50tw.codec import MessageType, decode_done, encode_credit, encode_infer
from tests.conftest import StartCC50
from tests.helpers import RawConnection, send_until_blocked
from tests.test_operations_real import http_get, metric, start_with_metrics

#: The toy's answer-at-once limit (``SYNCHRONOUS_BATCH_TOKENS``): 512 answered at once, 513 streamed.
AT_ONCE, STREAMED = 512, 513


def test_same_frames_at_once_and_streamed(cc50_server: StartCC50) -> None:
    server, base = start_with_metrics(cc50_server, "--toy-iters=0")
    with RawConnection(server.socket_address) as conn:
        for req_id, tokens in ((1, AT_ONCE), (2, STREAMED), (3, 1)):
            outcome = conn.infer(req_id, "two words", tokens)
            assert outcome.terminal_frames == 1 and outcome.error is None, outcome
            assert (outcome.chunk_frames, outcome.text) == (tokens, b" token" * tokens)  # a frame per token, either way
            done = outcome.done
            assert done is not None
            assert (done.tokens, done.prompt_tokens, done.generated_tokens) == (tokens, 2, tokens)
            assert done.ttft_us is not None and done.elapsed_us >= done.ttft_us >= 0
    _, _, text = http_get(base + "/metrics")
    assert metric(text, "cc50_requests_total", outcome="done") == 3
    assert metric(text, "cc50_generated_tokens_total") == AT_ONCE + STREAMED + 1
    assert metric(text, "cc50_request_duration_seconds_count") == 3
    server.stop()
    lines = [line for line in server.log_path.read_text().splitlines() if re.search(r"request \d from ", line)]
    assert len(lines) == 3, lines
    for line, tokens in zip(lines, (AT_ONCE, STREAMED, 1)):
        assert f": done backend=toy tokens={tokens} prompt_tokens=2 bytes={6 * tokens} " in line, line


def test_answer_over_the_credit_window_waits_for_credit(cc50_server: StartCC50) -> None:
    """A client granting a byte at a time gets exactly its window, and the rest on credit."""
    server = cc50_server("--toy-iters=0")
    with RawConnection(server.socket_address) as conn:
        conn.send(encode_infer(1, "p", 3, credit_bytes=8))  # 18 bytes of answer
        first = conn.read_frames(2)
        assert [f.payload for f in first] == [b" token", b" t"]
        conn.expect_silence(0.3)
        received = b""
        for _ in range(10):
            conn.send(encode_credit(1, 1))
            frame = conn.read_frame()
            assert frame.type == MessageType.RESP_CHUNK and len(frame.payload) == 1, frame
            received += frame.payload
        assert received == b"oken token"
        done = conn.read_frame()  # the answer is all sent: RESP_DONE follows the last byte at once
        assert done.type == MessageType.RESP_DONE and decode_done(done).tokens == 3, done
    # A new connection sees nothing of the other's window.
    with RawConnection(server.socket_address) as conn:
        outcome = conn.infer(1, "p", 3)
        assert outcome.finished and outcome.error is None


def test_client_that_never_reads_cannot_grow_the_server(cc50_server: StartCC50) -> None:
    """Thousands of answers-at-once to a client that reads nothing: the server stops reading it, and serves others."""
    server = cc50_server("--toy-iters=0")
    flooder = RawConnection(server.socket_address, recv_buffer=4096)
    try:
        # 200,000 requests (7 MB) for 15 KB of answer each: far more than socket buffers hold.
        request = b"".join(encode_infer(n % 1000 + 1, "p", AT_ONCE) for n in range(200_000))
        sent = send_until_blocked(flooder.sock, request, 10, pause=0.05)
        assert sent < len(request), "the server read every request although none of the answers was read"
        with RawConnection(server.socket_address) as other:
            outcome = other.infer(1, "p", 5)
            assert outcome.finished and outcome.error is None
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{server.process.pid}/status").read()).group(1))  # type: ignore[union-attr]
        assert rss_kb < 200_000, rss_kb
    finally:
        flooder.abort()
