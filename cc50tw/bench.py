"""
The load generator behind ``cc50 bench``.

Requests are issued by ``concurrency`` workers spread over ``connections``
connections, so the same tool measures sequential round trips (1, 1) and
multiplexed load (many per connection).  Every request is checked for its
terminal frame; failures are counted, never silently dropped.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, DeferredList, gatherResults

from cc50tw.client import CC50ClientProtocol, connect
from cc50tw.errors import ClientError


class RequestRecord(NamedTuple):
    latency_ms: float
    ttft_ms: float
    tokens: int
    text: str | None


class BenchResult(NamedTuple):
    records: list[RequestRecord]
    errors: list[str]
    wall_s: float


async def run_bench(
    reactor: Any,
    server: str,
    prompt: str,
    max_tokens: int,
    iters: int,
    concurrency: int = 1,
    connections: int = 1,
    keep_text: int = 0,
    credit_bytes: int = 0,
    token: bytes | None = None,
) -> BenchResult:
    clients: list[CC50ClientProtocol] = list(
        await gatherResults([connect(reactor, server, token) for _ in range(max(1, connections))])
    )
    records: list[RequestRecord] = []
    errors: list[str] = []
    issued = 0

    async def worker(index: int) -> None:
        nonlocal issued
        client = clients[index % len(clients)]
        while issued < iters:
            number = issued
            issued += 1
            response = client.infer(prompt, max_tokens, credit_bytes)
            try:
                completion = await response.collect()
            except ClientError as e:
                errors.append(str(e))
                continue
            except Exception as e:  # connection lost and the like
                errors.append(f"request {number}: {e!r}")
                continue
            end = response.finishedAt or time.perf_counter()
            first = response.firstChunkAt or end
            records.append(
                RequestRecord(
                    latency_ms=(end - response.startedAt) * 1e3,
                    ttft_ms=(first - response.startedAt) * 1e3,
                    tokens=completion.stats.tokens,
                    text=completion.text if number < keep_text else None,
                )
            )

    started = time.perf_counter()
    workers = [Deferred.fromCoroutine(worker(i)) for i in range(max(1, concurrency))]
    await DeferredList(workers, consumeErrors=True)
    wall = time.perf_counter() - started
    await gatherResults([client.close() for client in clients])
    return BenchResult(records, errors, wall)
