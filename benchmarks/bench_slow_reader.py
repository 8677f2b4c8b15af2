"""
Slow reader: how much does the server hold for a client that stops reading?

One client sends REQUESTS requests of TOKENS tokens and reads nothing for
STALL seconds; meanwhile another client measures its request latency.  The
server runs in this process (real sockets) so its per-connection queued bytes
can be sampled directly.  Prints a table and, with --json, writes the figures.

    python benchmarks/bench_slow_reader.py [--requests 100] [--tokens 100000] [--stall 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater, react

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import TOKEN_TEXT, ToyBackend
from cc50tw.client import connect
from cc50tw.server import CC50ServerFactory, ServerConfig
from cc50tw.stats import summarize
from cc50tw.testing import SlowReader, rss_bytes


async def measure_latency(reactor: Any, port: int, seconds: float) -> list[float]:
    client = await connect(reactor, f"tcp:127.0.0.1:{port}")
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        await client.infer("meanwhile", max_tokens=100).collect()
        latencies.append((time.perf_counter() - started) * 1e3)
        await deferLater(reactor, 0.01, lambda: None)
    await client.close()
    return latencies


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    backend = ToyBackend(reactor, CPUEngine(reactor, reactor.getThreadPool()), iters=0)
    factory = CC50ServerFactory(backend, ServerConfig(max_inflight_per_connection=max(256, args.requests)), reactor)
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    port = listening.getHost().port

    baseline = await measure_latency(reactor, port, 2.0)
    rss_before = rss_bytes()
    slow = SlowReader(args.requests, args.tokens, TOKEN_TEXT.encode())
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), slow)
    await deferLater(reactor, 0.2, lambda: None)
    [server_side] = list(factory.connections)
    peak_queued = 0
    peak_rss = rss_before

    def sample() -> None:
        nonlocal peak_queued, peak_rss
        peak_queued = max(peak_queued, server_side.queuedBytes)
        peak_rss = max(peak_rss, rss_bytes())

    from twisted.internet.task import LoopingCall

    sampler = LoopingCall(sample)
    sampler.clock = reactor
    sampler.start(0.05)
    during = await measure_latency(reactor, port, args.stall)
    started = time.perf_counter()
    await slow.startReading()
    drain_s = time.perf_counter() - started
    sampler.stop()
    problems = slow.verify()
    slow.transport.loseConnection()  # type: ignore[union-attr]
    await listening.stopListening()
    base, stalled = summarize(baseline), summarize(during)
    return {
        "requests": args.requests,
        "tokens_per_request": args.tokens,
        "stall_s": args.stall,
        "peak_queued_bytes": peak_queued,
        "rss_before_mib": rss_before / 2**20,
        "peak_rss_mib": peak_rss / 2**20,
        "other_client_p50_ms_baseline": base.p50,
        "other_client_p99_ms_baseline": base.p99,
        "other_client_p50_ms_during": stalled.p50,
        "other_client_p99_ms_during": stalled.p99,
        "drain_s": drain_s,
        "frames_delivered": sum(slow.chunks.values()) + len(slow.done),
        "problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100000)
    parser.add_argument("--stall", type=float, default=10.0)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    def go(reactor: Any) -> Deferred[None]:
        async def body() -> None:
            result = await run(reactor, args)
            width = max(len(key) for key in result)
            for key, value in result.items():
                print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
            if args.json:
                with open(args.json, "w") as out:
                    json.dump(result, out, indent=2)
            if result["problems"]:
                sys.exit(1)

        return Deferred.fromCoroutine(body())

    react(go)


if __name__ == "__main__":
    main()
