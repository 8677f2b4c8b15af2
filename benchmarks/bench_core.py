"""
Core data-plane benchmark (issue 2): a real ``twistd cc50`` process with the
toy backend doing no work (``--toy-iters=0``), measured over loopback TCP.

(a) Round trip: sequential 1-token requests on one connection (REQ_INFER out,
    RESP_CHUNK + RESP_DONE back), latency p50/p99 in microseconds, and the
    server's CPU time per request.
(b) Streaming: one request of 100,000 tokens; RESP_CHUNK frames/s, payload
    MB/s and wire MB/s, from sending REQ_INFER to receiving RESP_DONE.

Each is measured with two clients: ``raw`` (blocking socket, headers walked by
hand, so the client costs as little as Python allows and the figure is mostly
the server's) and ``library`` (``cc50tw.client`` on a Twisted reactor, what an
application gets, credit grants included).

    python benchmarks/bench_core.py [--requests 2000] [--tokens 100000] [--json out.json]

The server runs with ``--quiet-requests`` (no log line per request) unless
``--log-requests`` is given; extra server options go after ``--server-arg``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.helpers when run as a script

from cc50tw.codec import HEADER, HEADER_SIZE, MessageType, encode_infer  # noqa: E402
from cc50tw.stats import summarize  # noqa: E402
from tests.helpers import ServerProcess, cc50_server_command, start_server  # noqa: E402

ALL_CREDIT = 0xFFFFFFFF
TOKEN_BYTES = len(b" token")


# Raw client --------------------------------------------------------------------


class HeaderWalker:
    """
    Reads a CC50 stream from a blocking socket, walking headers without
    copying payloads: the cheapest client Python can be, so the figures are
    the server's rather than the client's.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.offset = 0
        self.terminal_at = 0

    def until_terminal(self) -> tuple[int, int, int]:
        """
        Read to the next DONE/ERR; returns (chunk frames, chunk payload bytes,
        terminal type).  ``terminal_payload()`` then gives that frame's payload.
        """
        frames = payload = 0
        unpack_from = HEADER.unpack_from
        while True:
            buffer, offset = self.buffer, self.offset
            end = len(buffer)
            while end - offset >= HEADER_SIZE:
                _magic, _version, kind, _req_id, _flags, length = unpack_from(buffer, offset)
                if end - offset < HEADER_SIZE + length:
                    break
                offset += HEADER_SIZE + length
                if kind == MessageType.RESP_CHUNK:
                    frames += 1
                    payload += length
                else:
                    # Left in the buffer (compacted before the next read) for
                    # terminal_payload(), which is rarely wanted: no copy here.
                    self.terminal_at = offset - length
                    self.offset = offset
                    return frames, payload, kind
            self.offset = offset
            self._compact()
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buffer += data

    def terminal_payload(self) -> bytes:
        """The payload of the frame the last ``until_terminal`` stopped at."""
        return bytes(self.buffer[self.terminal_at : self.offset])

    def _compact(self) -> None:
        if self.offset:
            del self.buffer[: self.offset]
            self.offset = 0


def raw_round_trips(address: tuple[str, int], count: int, warmup: int) -> list[float]:
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        walker = HeaderWalker(sock)
        latencies: list[float] = []
        for number in range(warmup + count):
            frame = encode_infer(number + 1, "hi", 1)
            started = time.perf_counter_ns()
            sock.sendall(frame)
            frames, _, kind = walker.until_terminal()
            elapsed = time.perf_counter_ns() - started
            if kind != MessageType.RESP_DONE or frames != 1:
                raise AssertionError(f"request {number + 1}: {frames} chunks then type {kind}")
            if number >= warmup:
                latencies.append(elapsed / 1e3)
    return latencies


def raw_stream(address: tuple[str, int], tokens: int) -> dict[str, float]:
    with socket.create_connection(address) as sock:
        walker = HeaderWalker(sock)
        started = time.perf_counter()
        sock.sendall(encode_infer(1, "stream", tokens, ALL_CREDIT))
        frames, payload, kind = walker.until_terminal()
        elapsed = time.perf_counter() - started
    if kind != MessageType.RESP_DONE or payload != tokens * TOKEN_BYTES:
        raise AssertionError(f"stream: {payload} bytes in {frames} chunks then type {kind}")
    return stream_figures(frames, payload, elapsed)


def stream_figures(frames: int, payload: int, elapsed: float) -> dict[str, float]:
    wire = frames * HEADER_SIZE + payload
    return {
        "seconds": elapsed,
        "chunk_frames": frames,
        "frames_per_s": frames / elapsed,
        "payload_MB_per_s": payload / elapsed / 1e6,
        "wire_MB_per_s": wire / elapsed / 1e6,
    }


# Library client ------------------------------------------------------------------


async def library_round_trips(client: Any, count: int, warmup: int) -> list[float]:
    """Sequential 1-token requests through ``cc50tw.client``; latencies in µs (warm-up dropped)."""
    latencies: list[float] = []
    for number in range(warmup + count):
        started = time.perf_counter_ns()
        completion = await client.infer("hi", 1).collect()
        elapsed = time.perf_counter_ns() - started
        if completion.stats.tokens != 1:
            raise AssertionError(f"request {number}: {completion.stats}")
        if number >= warmup:
            latencies.append(elapsed / 1e3)
    return latencies


async def library_stream(client: Any, tokens: int) -> dict[str, float]:
    """One request of ``tokens`` tokens through ``cc50tw.client`` (default window, credit granted back)."""
    response = client.infer("stream", tokens)
    began = time.perf_counter()
    streamed = await response.collect()
    seconds = time.perf_counter() - began
    if streamed.stats.tokens != tokens or response.chunkBytes != tokens * TOKEN_BYTES:
        raise AssertionError(f"stream: {streamed.stats}, {response.chunkBytes} bytes")
    return stream_figures(response.chunkFrames, response.chunkBytes, seconds)


def library_measurements(endpoint: str, count: int, warmup: int, tokens: int, repeats: int) -> dict[str, Any]:
    """Both measurements through ``cc50tw.client``, on a reactor in this process (so once per process)."""
    from cc50tw.bench import run_on_reactor
    from cc50tw.client import connect

    async def main(reactor: Any) -> dict[str, Any]:
        client = await connect(reactor, endpoint)
        results: dict[str, Any] = {"round_trip_us": await library_round_trips(client, count, warmup)}
        results["stream_runs"] = [await library_stream(client, tokens) for _ in range(repeats)]
        await client.close()
        return results

    return run_on_reactor(main)


# Reporting -----------------------------------------------------------------------


def latency_summary(latencies_us: list[float]) -> dict[str, float]:
    s = summarize(latencies_us)
    return {"samples": s.samples, "mean": s.mean, "p50": s.p50, "p99": s.p99, "min": s.minimum, "max": s.maximum}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    ordered = sorted(runs, key=lambda r: r["frames_per_s"])
    best = dict(ordered[len(ordered) // 2])
    best["runs"] = len(runs)
    return best


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import twisted

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "platform": platform.platform(),
    }


def server_cpu(server: ServerProcess) -> float:
    try:
        return server.cpu_seconds()
    except OSError:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="sequential 1-token requests (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring (default 200)")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens in the streaming request (default 100000)")
    parser.add_argument("--repeats", type=int, default=3, help="streaming runs per client; the median is reported")
    parser.add_argument("--log-requests", action="store_true", help="keep the server's per-request log line")
    parser.add_argument("--server-arg", action="append", default=[], help="extra twistd cc50 option (repeatable)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    server_args = ["--toy-iters=0", *([] if args.log_requests else ["--quiet-requests"]), *args.server_arg]
    with tempfile.TemporaryDirectory(prefix="cc50-bench-") as directory:
        server = start_server(lambda d: cc50_server_command(d, *server_args), Path(directory) / "server.log")
        try:
            address = server.socket_address
            assert isinstance(address, tuple)
            cpu_before = server_cpu(server)
            raw_rtt = raw_round_trips(address, args.requests, args.warmup)
            cpu_per_request_us = (server_cpu(server) - cpu_before) / (args.requests + args.warmup) * 1e6
            raw_runs = [raw_stream(address, args.tokens) for _ in range(args.repeats)]
            library = library_measurements(server.endpoint, args.requests, args.warmup, args.tokens, args.repeats)
        finally:
            status = server.stop()
    report: dict[str, Any] = {
        "benchmark": "bench_core",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "server_args": server_args,
        "round_trip_us": {
            "requests": args.requests,
            "warmup": args.warmup,
            "raw": latency_summary(raw_rtt),
            "library": latency_summary(library["round_trip_us"]),
            "server_cpu_us_per_request": cpu_per_request_us,
        },
        "stream": {
            "tokens": args.tokens,
            "raw": median_run(raw_runs),
            "library": median_run(library["stream_runs"]),
        },
        "server_exit_status": status,
    }

    m = report["machine"]
    print(f"cc50 core benchmark: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, Twisted {m['twisted']}")
    print(f"server: twistd cc50 {' '.join(server_args)} (loopback TCP)\n")
    rtt = report["round_trip_us"]
    print(f"(a) round trip, 1-token requests, sequential, one connection, n={args.requests} (µs)")
    print(f"    {'client':<8} {'p50':>8} {'p99':>8} {'mean':>8} {'min':>8} {'max':>9}")
    for name in ("raw", "library"):
        r = rtt[name]
        print(f"    {name:<8} {r['p50']:8.1f} {r['p99']:8.1f} {r['mean']:8.1f} {r['min']:8.1f} {r['max']:9.1f}")
    print(f"    server CPU per request (raw client run): {rtt['server_cpu_us_per_request']:.1f} µs\n")
    print(f"(b) one streaming request of {args.tokens} tokens (median of {args.repeats})")
    print(f"    {'client':<8} {'seconds':>8} {'frames/s':>10} {'payload MB/s':>13} {'wire MB/s':>10}")
    for name in ("raw", "library"):
        r = report["stream"][name]
        print(
            f"    {name:<8} {r['seconds']:8.3f} {r['frames_per_s']:10.0f} "
            f"{r['payload_MB_per_s']:13.2f} {r['wire_MB_per_s']:10.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
