"""
Half-open and slow clients against a real ``twistd cc50`` (issue 8).

Three kinds of client tie up a connection without ever finishing anything:

- ``half_header``: sends the first 10 bytes of a header, then waits;
- ``silent``: connects and sends nothing;
- ``never_reads``: sends long requests and reads nothing, so the server's
  send buffer fills and its streams pause.

Each must be dealt with by the documented timeouts (docs/protocol.md,
"Limits"): the first two are closed after ``--idle-timeout``; the third's
requests end with CREDIT_STALL after ``--stall-timeout`` without a byte read,
the connection is then idle and is closed after ``--idle-timeout``, and since
its client reads nothing (so a graceful close would wait forever for the send
buffer to drain) it is cut off ``--stall-timeout`` later.  Meanwhile another
client keeps making requests; their latency is printed, and every one must
complete (no timing assertion: the machine may be shared).
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass, field

import pytest

from cc50tw.codec import encode_infer
from cc50tw.stats import summarize
from tests.conftest import HOSTILE_SUMMARY, StartCC50
from tests.helpers import RawConnection, ServerProcess

IDLE_TIMEOUT = 1.5
STALL_TIMEOUT = 1.5
SERVER_ARGS = ("--toy-iters=0", f"--idle-timeout={IDLE_TIMEOUT}", f"--stall-timeout={STALL_TIMEOUT}")
#: Slack on every deadline: timers are exact, but this machine may be busy.
SLACK = 3.0
ALL_CREDIT = 0xFFFFFFFF
NEVER_READS_REQUESTS = 8

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc to see server sockets")


def server_socket_open(pid: int, server_port: int, client_port: int) -> bool:
    """Whether process ``pid`` still holds its end of the TCP connection from ``client_port``."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if (local_port, remote_port) == (server_port, client_port) and fields[9] != "0":
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}") in inodes:
                return True
        except OSError:
            continue
    return False


def closed_by_peer(conn: RawConnection) -> bool:
    """Whether the server has closed this connection (without reading anything it sent)."""
    # select first: a socket with a timeout waits for it in recv(), MSG_DONTWAIT or not.
    readable, _, _ = select.select([conn.sock], [], [], 0)
    if not readable:
        return False
    try:
        data = conn.sock.recv(1, socket.MSG_PEEK)
    except ConnectionResetError:
        return True
    return data == b""


@dataclass
class Hostile:
    kind: str
    conn: RawConnection
    since: float
    #: Earliest and latest the server may close it, in seconds after ``since``.
    window: tuple[float, float]
    closed_after: float | None = None
    client_port: int = field(init=False)

    def __post_init__(self) -> None:
        self.client_port = self.conn.sock.getsockname()[1]

    def check(self, server: ServerProcess, now: float) -> None:
        if self.closed_after is not None:
            return
        if self.kind == "never_reads":
            assert server.port is not None
            gone = not server_socket_open(server.pid, server.port, self.client_port)
        else:
            gone = closed_by_peer(self.conn)
        if gone:
            self.closed_after = now - self.since


def test_half_open_and_slow_clients_are_closed_while_others_are_served(cc50_server: StartCC50) -> None:
    server = cc50_server(*SERVER_ARGS)
    normal = server.connect(timeout=10)
    hostile: list[Hostile] = []
    for _ in range(5):
        conn = server.connect()
        conn.send(encode_infer(1, "ten bytes of this header, then nothing", 3)[:10])
        hostile.append(Hostile("half_header", conn, time.monotonic(), (IDLE_TIMEOUT - 0.3, IDLE_TIMEOUT + SLACK)))
    for _ in range(5):
        conn = server.connect()
        hostile.append(Hostile("silent", conn, time.monotonic(), (IDLE_TIMEOUT - 0.3, IDLE_TIMEOUT + SLACK)))
    for _ in range(3):
        conn = server.connect(recv_buffer=4096)
        conn.send(
            b"".join(
                encode_infer(req_id, "read nothing", 1_000_000, ALL_CREDIT)
                for req_id in range(1, NEVER_READS_REQUESTS + 1)
            )
        )
        # The requests stall, end with CREDIT_STALL, the connection goes idle,
        # is closed, and is cut off when its unread buffer never drains.
        latest = STALL_TIMEOUT + IDLE_TIMEOUT + STALL_TIMEOUT + SLACK
        hostile.append(Hostile("never_reads", conn, time.monotonic(), (IDLE_TIMEOUT, latest)))

    latencies: list[float] = []
    deadline = time.monotonic() + max(h.window[1] for h in hostile) + 1
    req_id = 0
    while time.monotonic() < deadline and any(h.closed_after is None for h in hostile):
        req_id += 1
        started = time.perf_counter()
        outcome = normal.infer(req_id, "business as usual", 100)
        latencies.append((time.perf_counter() - started) * 1e3)
        assert outcome.error is None and outcome.done is not None, outcome
        assert outcome.done.tokens == 100 and outcome.text == b" token" * 100
        now = time.monotonic()
        for h in hostile:
            h.check(server, now)
        time.sleep(0.02)
    normal.close()

    summary = summarize(latencies)
    print(
        f"\nother client meanwhile: {len(latencies)} requests of 100 tokens, latency p50 {summary.p50:.2f} ms, "
        f"p99 {summary.p99:.2f} ms, max {summary.maximum:.2f} ms"
    )
    for h in hostile:
        closed = "not closed" if h.closed_after is None else f"closed after {h.closed_after:.2f}s"
        print(f"  {h.kind:<12} {closed} (allowed {h.window[0]:g}-{h.window[1]:g}s)")
    for kind in ("half_header", "silent", "never_reads"):
        group = [h for h in hostile if h.kind == kind]
        HOSTILE_SUMMARY.append(
            {
                "suite": "slow clients",
                "category": kind,
                "cases": len(group),
                "crashes": 0 if server.alive() else 1,
                "lost": 0,
            }
        )
    HOSTILE_SUMMARY.append(
        {"suite": "slow clients", "category": "other client's requests", "cases": len(latencies), "lost": 0}
    )

    for h in hostile:
        assert h.closed_after is not None, f"{h.kind} client still connected after {h.window[1]:g}s"
        low, high = h.window
        assert low <= h.closed_after <= high, (
            f"{h.kind} client closed after {h.closed_after:.2f}s, not {low:g}-{high:g}s"
        )
    log = server.log()
    for h in hostile:
        if h.kind == "never_reads":
            peer = f"127.0.0.1:{h.client_port}"
            for number in range(1, NEVER_READS_REQUESTS + 1):
                assert f"request {number} from {peer}: credit_stall" in log, f"request {number} from {peer}"
            assert f"aborting connection from {peer}" in log
        else:
            assert f"closing idle connection from 127.0.0.1:{h.client_port}" in log
        h.conn.close()
    assert server.alive()
