"""
The client library's own cost, without a server or sockets: recorded server
bytes are fed to a ``CC50ClientProtocol`` on a ``StringTransport``, so the
figure is Python time in the client alone and barely moves with the
machine's load.  This is what the client-side changes of issue 7 are
measured with (``benchmarks/README.md``, work log).

(a) Receiving: one request's ``tokens`` RESP_CHUNK frames (``" token"``)
    and its DONE, fed in ``piece``-byte reads: ns per chunk frame.
(b) Requests: ``infer`` + its CHUNK and DONE + ``collect()`` firing, one
    request at a time: µs per request.

    python benchmarks/bench_client.py [--tokens 1000000] [--requests 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from twisted.internet.testing import StringTransport

from cc50tw.client import CC50ClientProtocol
from cc50tw.codec import DoneStats, encode_chunk, encode_done

TOKEN = b" token"


def receive_cost(tokens: int, piece: int = 65536) -> float:
    """Nanoseconds per chunk frame for one streamed request."""
    protocol = CC50ClientProtocol()
    protocol.makeConnection(StringTransport())
    response = protocol.infer("stream", tokens)
    parts: list[str] = []
    response.onChunk = parts.append
    data = encode_chunk(response.req_id, TOKEN) * tokens + encode_done(
        response.req_id, DoneStats(tokens, 1, 1, tokens, 1)
    )
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    started = time.perf_counter()
    for chunk in pieces:
        protocol.dataReceived(chunk)
    elapsed = time.perf_counter() - started
    if len(parts) != tokens or response.done.called is False:
        raise AssertionError(f"{len(parts)} chunks delivered, expected {tokens}")
    return elapsed / tokens * 1e9


def request_cost(requests: int) -> float:
    """Microseconds per 1-token request, from ``infer`` to ``collect()`` firing."""
    protocol = CC50ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    answers = {
        req_id: encode_chunk(req_id, TOKEN) + encode_done(req_id, DoneStats(1, 1, 1, 1, 1))
        for req_id in range(1, requests + 1)
    }
    finished = 0

    def count(_: Any) -> None:
        nonlocal finished
        finished += 1

    started = time.perf_counter()
    for _ in range(requests):
        response = protocol.infer("hi", 1)
        response.collect().addCallback(count)
        protocol.dataReceived(answers[response.req_id])
    elapsed = time.perf_counter() - started
    if finished != requests:
        raise AssertionError(f"{finished} of {requests} requests finished")
    return elapsed / requests * 1e6


def measure(tokens: int, requests: int, repeats: int) -> dict[str, Any]:
    receive = sorted(receive_cost(tokens) for _ in range(repeats))
    per_request = sorted(request_cost(requests) for _ in range(repeats))
    return {
        "tokens": tokens,
        "requests": requests,
        "repeats": repeats,
        "receive_ns_per_chunk": receive[len(receive) // 2],
        "receive_ns_per_chunk_runs": receive,
        "client_chunks_per_s": 1e9 / receive[len(receive) // 2],
        "request_us": per_request[len(per_request) // 2],
        "request_us_runs": per_request,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the median is shown")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    result = measure(args.tokens, args.requests, args.repeats)
    print(
        f"client receive: {result['receive_ns_per_chunk']:.0f} ns per chunk frame "
        f"({result['client_chunks_per_s']:,.0f} frames/s), runs {[round(r) for r in result['receive_ns_per_chunk_runs']]}"
    )
    print(
        f"client request: {result['request_us']:.2f} µs per 1-token request, "
        f"runs {[round(r, 2) for r in result['request_us_runs']]}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
