"""
Where the llama-server bridge's time goes: per-token arrival times of the
same greedy request on three paths, in one process run.

- ``direct``: treq + ``cc50tw.sse`` straight to llama-server (the baseline);
- ``backend``: ``LlamaServerBackend`` driven in this process with a sink that
  only records times: the bridge's HTTP, SSE and JSON work without CC50;
- ``inproc``: ``cc50tw.client`` to a CC50 server with that backend in this
  process: the whole bridge's code, without a third process to wake;
- ``bridge``: ``cc50tw.client`` to a ``twistd cc50 --backend=llama_server``
  subprocess: the whole bridge.

The paths take turns, one request each, for ``--rounds`` rounds, with
``--gap`` milliseconds between requests (0: back to back, as the throughput
benchmark runs them).  For each path it prints medians of the time to the
first text, to text pieces 1/4, 1/2 and 3/4 of the way and to the last one,
to the end of the request, and of the gap between pieces: a delay that grows
with the piece number is a per-token cost; one that stays flat is a
per-request one.

    python benchmarks/trace_llama_bridge.py [--preset small] [--rounds 10]
        [--max-tokens 128] [--gap 0] [--concurrency 1] [--paths direct backend inproc bridge] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater, react
from zope.interface import implementer

from cc50tw.backends.llama_server import LlamaServerBackend
from cc50tw.client import CC50ClientProtocol, connect
from cc50tw.interfaces import InferenceRequest, ITokenSink
from cc50tw.server import CC50ServerFactory, ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_llama_bridge import DirectClient  # noqa: E402
from tests.helpers import cc50_server_command, start_server, stop_process  # noqa: E402
from tests.llama_support import LlamaServer, find_llama_server, generated_model  # noqa: E402

PATHS = ("direct", "backend", "inproc", "bridge")
PROMPT = "The history of the printing press"


class Trace(NamedTuple):
    """Seconds from sending the request: each text piece's arrival, and the end."""

    arrivals: list[float]
    end: float
    text: str
    #: Seconds from the CC50 server's receipt of the request to its first chunk (CC50 paths).
    server_first: float | None = None


async def trace_direct(direct: DirectClient, url: str, max_tokens: int) -> Trace:
    started = time.perf_counter()
    arrivals: list[float] = []
    pieces: list[str] = []

    def collect(text: str) -> None:
        arrivals.append(time.perf_counter() - started)
        pieces.append(text)

    await direct.stream(url, PROMPT, max_tokens, collect)
    return Trace(arrivals, time.perf_counter() - started, "".join(pieces))


@implementer(ITokenSink)
class RecordingSink:
    """An ``ITokenSink`` that keeps each write's arrival time, as the CC50 stream would send it."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.arrivals: list[float] = []
        self.pieces: list[str] = []

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, text: str) -> None:
        self.arrivals.append(time.perf_counter() - self.started)
        self.pieces.append(text)

    def writeSequence(self, texts: Any) -> None:
        for text in texts:
            self.write(text)


async def trace_backend(backend: LlamaServerBackend, max_tokens: int) -> Trace:
    sink = RecordingSink()
    await backend.generate(InferenceRequest(1, PROMPT, max_tokens), sink)
    return Trace(sink.arrivals, time.perf_counter() - sink.started, "".join(sink.pieces))


async def trace_bridge(client: CC50ClientProtocol, max_tokens: int) -> Trace:
    started = time.perf_counter()
    response = client.infer(PROMPT, max_tokens=max_tokens)
    arrivals: list[float] = []
    pieces: list[str] = []

    def chunk(text: str) -> None:
        arrivals.append(time.perf_counter() - started)
        pieces.append(text)

    response.onChunk = chunk
    stats = await response.done
    serverFirst = stats.ttft_us / 1e6 if stats.ttft_us is not None else None
    return Trace(arrivals, time.perf_counter() - started, "".join(pieces), serverFirst)


def milestones(traces: list[Trace]) -> dict[str, float]:
    """Median milliseconds to the first piece, pieces at 1/4, 1/2, 3/4, the last, the end; median gap."""
    out: dict[str, float] = {}
    count = min(len(t.arrivals) for t in traces)
    if count == 0:
        return {"end_ms": statistics.median(t.end for t in traces) * 1e3}
    for label, index in (("first", 0), ("q1", count // 4), ("half", count // 2), ("q3", 3 * count // 4)):
        out[f"{label}_ms"] = statistics.median(t.arrivals[index] for t in traces) * 1e3
    out["last_ms"] = statistics.median(t.arrivals[-1] for t in traces) * 1e3
    out["end_ms"] = statistics.median(t.end for t in traces) * 1e3
    out["after_last_ms"] = statistics.median(t.end - t.arrivals[-1] for t in traces) * 1e3
    gaps = [b - a for t in traces for a, b in zip(t.arrivals, t.arrivals[1:])]
    out["gap_p50_us"] = statistics.median(gaps) * 1e6 if gaps else 0.0
    out["pieces"] = statistics.median(len(t.arrivals) for t in traces)
    servers = [t.server_first for t in traces if t.server_first is not None]
    if servers:
        out["srv_first_ms"] = statistics.median(servers) * 1e3
    return out


async def main(reactor: Any, args: argparse.Namespace) -> None:
    binary, how = find_llama_server()
    if binary is None:
        raise SystemExit(f"trace_llama_bridge: {how}")
    workdir = Path(tempfile.mkdtemp(prefix="cc50-trace-llama-"))
    llama = LlamaServer(
        binary, generated_model(args.preset), workdir / "llama-server.log", parallel=args.concurrency, threads=1
    )
    llama.start()
    bridge = start_server(
        lambda listen: cc50_server_command(listen, "--backend=llama_server", f"--llama-url={llama.url}"),
        workdir / "cc50.log",
    )
    if args.pid_file:
        Path(args.pid_file).write_text(f"{bridge.process.pid}\n")
    directClient = DirectClient(reactor)
    backend = LlamaServerBackend(reactor, llama.url, health_interval=0)
    client = await connect(reactor, bridge.endpoint)
    inprocBackend = LlamaServerBackend(reactor, llama.url, health_interval=0)
    factory = CC50ServerFactory(inprocBackend, ServerConfig(), reactor)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    inprocClient = await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}")
    makers = {
        "direct": lambda: trace_direct(directClient, llama.url, args.max_tokens),
        "backend": lambda: trace_backend(backend, args.max_tokens),
        "inproc": lambda: trace_bridge(inprocClient, args.max_tokens),
        "bridge": lambda: trace_bridge(client, args.max_tokens),
    }
    traces: dict[str, list[Trace]] = {name: [] for name in args.paths}
    try:
        for _ in range(2):
            for name in args.paths:
                await gatherResults([Deferred.fromCoroutine(makers[name]()) for _ in range(args.concurrency)])
        texts: set[str] = set()
        for _ in range(args.rounds):
            for name in args.paths:
                if args.gap:
                    await deferLater(reactor, args.gap / 1e3)
                batch = await gatherResults(
                    [Deferred.fromCoroutine(makers[name]()) for _ in range(args.concurrency)]
                )
                traces[name].extend(batch)
                texts.update(trace.text for trace in batch)
        if len(texts) > 1:
            print("warning: the paths produced different texts", file=sys.stderr)
    finally:
        await client.close()
        await inprocClient.close()
        await port.stopListening()
        await inprocBackend.stopBackend()
        await directClient.close()
        await backend.stopBackend()
        stop_process(bridge.process)
        llama.stop()
    results = {name: milestones(traces[name]) for name in args.paths}
    columns = ["first_ms", "q1_ms", "half_ms", "q3_ms", "last_ms", "end_ms", "after_last_ms", "gap_p50_us", "pieces", "srv_first_ms"]
    print(
        f"\n{args.rounds} rounds of {args.concurrency} concurrent requests, {args.max_tokens} tokens, "
        f"gap {args.gap} ms; medians"
    )
    print(f"  {'path':<9}" + "".join(f"{c:>14}" for c in columns))
    for name in args.paths:
        print(f"  {name:<9}" + "".join(f"{results[name].get(c, float('nan')):>14.3f}" for c in columns))
    if args.json:
        raw = {name: [t._asdict() for t in traces[name]] for name in args.paths}
        Path(args.json).write_text(json.dumps({"medians": results, "traces": raw}) + "\n")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "large"], help="generated model size")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=1, help="requests started together per path and round")
    parser.add_argument("--gap", type=float, default=0.0, help="milliseconds of idle time before each request")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--pid-file", help="write the twistd bridge's pid here (for a profiler)")
    parser.add_argument("--json", help="also write medians and raw traces here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, parse(sys.argv[1:]))))
