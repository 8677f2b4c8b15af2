"""
Backpressure over real sockets: a client that sends many long requests and
then stops reading must not make the server buffer without bound, must not
slow other clients, and must receive every byte once it reads again.

The server runs in this process (real TCP listener, real Twisted transport)
so the test can read its per-connection queued bytes directly; the slow
client stops reading by pausing its own transport, which closes the TCP
window exactly as an application that never calls recv() does.

As the issue asks: 100 requests of 100,000 tokens (300 MB of frames once the
client reads), and 10 s without reading; CC50_SLOW_READER_TOKENS and
CC50_SLOW_READER_SECONDS change that.  About 50 s on 2 cores.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater

from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import TOKEN_TEXT, ToyBackend
from cc50tw.client import connect
from cc50tw.server import CC50ServerFactory, CC50ServerProtocol, ServerConfig
from cc50tw.testing import SlowReader, rss_bytes

reactor: Any = _reactor
REQUESTS = 100
TOKENS = int(os.environ.get("CC50_SLOW_READER_TOKENS", "100000"))
STALL_SECONDS = float(os.environ.get("CC50_SLOW_READER_SECONDS", "10"))

#: The documented bound on what one connection may hold (docs/protocol.md):
#: the transport's 64 KiB high-water mark, plus at most one write per stream
#: that was already under way when the pause arrived.
QUEUED_BYTES_BOUND = 1 << 20


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read RSS")
@pytest_twisted.ensureDeferred
async def test_slow_reader_is_bounded_and_loses_nothing() -> None:
    backend = ToyBackend(reactor, CPUEngine(reactor, reactor.getThreadPool()), iters=0)
    factory = CC50ServerFactory(backend, ServerConfig(max_inflight_per_connection=REQUESTS), reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    address = port.getHost()
    try:
        slow = SlowReader(REQUESTS, TOKENS, TOKEN_TEXT.encode())
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", address.port), slow)
        await deferLater(reactor, 0.5, lambda: None)
        [server_side] = [p for p in factory.connections if isinstance(p, CC50ServerProtocol)]

        rss_before = rss_bytes()
        peak_queued = 0
        other = await connect(reactor, f"tcp:127.0.0.1:{address.port}")
        other_latencies = []
        deadline = time.monotonic() + STALL_SECONDS
        while time.monotonic() < deadline:
            peak_queued = max(peak_queued, server_side.queuedBytes)
            started = time.perf_counter()
            completion = await other.infer("meanwhile", max_tokens=100).collect()
            other_latencies.append(time.perf_counter() - started)
            assert completion.text == TOKEN_TEXT * 100
            await deferLater(reactor, 0.05, lambda: None)
        rss_during = rss_bytes()
        assert server_side.transportPaused, "the full socket never paused the server"
        assert len(slow.done) < REQUESTS, "the slow reader got everything without reading: the test proves nothing"
        print(
            f"\nslow reader: peak queued {peak_queued} B, RSS {rss_before >> 20} -> {rss_during >> 20} MiB; "
            f"other client: {len(other_latencies)} requests, worst {max(other_latencies) * 1e3:.1f} ms"
        )
        assert peak_queued < QUEUED_BYTES_BOUND
        assert rss_during - rss_before < 64 << 20

        await slow.startReading()
        assert slow.verify() == []
        await other.close()
        slow.transport.loseConnection()
    finally:
        await port.stopListening()
