"""
llama-server bridge overhead: the same requests straight to llama-server over
HTTP, and through ``twistd cc50 --backend=llama_server``, in one run.

Both paths are driven from this one Twisted process, so the clients cost the
same: the direct client streams the HTTP body with treq over the bridge's own
agent and connection policy, and parses it with ``cc50tw.sse`` (what the
bridge itself does); the bridged client is ``cc50tw.client``.  llama-server runs greedy (``--temp 0``) with a generated
model, so both paths produce the same tokens; the twistd bridge is a separate
process, as in production.  Per concurrency level the two paths alternate in
rounds (by default, every batch of CONCURRENCY requests), so drift (thermal,
other load) hits both alike; the median of the per-round ratios is the
figure to trust on a noisy machine.

Prints, per concurrency: tokens/s (all generated tokens over wall time), TTFT
p50/p99 and total latency p50/p99 for each path, and bridge/direct ratios.
The goal (issue 3) is a bridge overhead under 1% of tokens/s and under 1 ms
of TTFT.

    python benchmarks/bench_llama_bridge.py [--preset small] [--iterations 20]
        [--max-tokens 128] [--concurrency 1 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived

from cc50tw.backends.http import (
    CACHED_CONNECTION_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    MAX_PERSISTENT_PER_HOST,
    upstreamAgent,
)
from cc50tw.client import CC50ClientProtocol, connect
from cc50tw.codec import MessageType, encode_infer
from cc50tw.sse import SSEParser, TextAssembler
from cc50tw.stats import summarize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_core  # noqa: E402
from tests.helpers import ServerProcess, cc50_server_command, start_server, stop_process  # noqa: E402
from tests.llama_support import LlamaServer, find_llama_server, generated_model  # noqa: E402

ITERATIONS, MAX_TOKENS = 80, 128
#: --floor's defaults: rounds, requests per bridge per round, tokens per request.
FLOOR_ROUNDS, FLOOR_REQUESTS, FLOOR_MAX_TOKENS = 20, 30, 64

PROMPTS = [
    "The history of the printing press",
    "Explain how a steam engine works",
    "A short story about a lighthouse keeper",
    "Why the sky is blue, for a child",
]


class Sample(NamedTuple):
    ttft: float
    total: float
    tokens: int
    text: str


class DirectClient:
    """
    Straight to llama-server over HTTP, as a treq user would: the bridge's own
    agent and connection policy, and, like the bridge, one retry on a new
    connection when a kept-alive one turns out closed.
    """

    def __init__(self, reactor: Any) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        self.pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
        self.http = HTTPClient(upstreamAgent(reactor, DEFAULT_CONNECT_TIMEOUT, self.pool))
        fresh = HTTPConnectionPool(reactor, persistent=False)
        self.fresh = HTTPClient(upstreamAgent(reactor, DEFAULT_CONNECT_TIMEOUT, fresh))

    async def stream(self, url: str, prompt: str, max_tokens: int, onText: Callable[[str], object]) -> int:
        """One streamed ``/completion``: ``onText`` for each non-empty piece; the tokens llama-server counted."""
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "stream": True, "cache_prompt": True}).encode()
        try:
            response = await self.http.post(url + "/completion", data=body, unbuffered=True)
        except ResponseNeverReceived:
            response = await self.fresh.post(url + "/completion", data=body, unbuffered=True)
        parser = SSEParser()
        assembler = TextAssembler()
        tokens = 0

        def collect(data: bytes) -> None:
            nonlocal tokens
            for event in parser.feed(data):
                value = json.loads(event.data)
                text = assembler.text(value.get("content", ""))
                if text:
                    onText(text)
                tokens = value.get("tokens_predicted", tokens)

        await treq.collect(response, collect)
        return tokens

    def close(self) -> Deferred[None]:
        closing: Deferred[None] = self.pool.closeCachedConnections()
        return closing


async def direct_request(direct: DirectClient, url: str, prompt: str, max_tokens: int) -> Sample:
    started = time.perf_counter()
    pieces: list[str] = []
    first: list[float] = []

    def collect(text: str) -> None:
        if not first:
            first.append(time.perf_counter())
        pieces.append(text)

    tokens = await direct.stream(url, prompt, max_tokens, collect)
    done = time.perf_counter()
    return Sample((first[0] if first else done) - started, done - started, tokens, "".join(pieces))


async def bridged_request(client: CC50ClientProtocol, prompt: str, max_tokens: int) -> Sample:
    started = time.perf_counter()
    response = client.infer(prompt, max_tokens=max_tokens)
    completion = await response.collect()
    done = time.perf_counter()
    first = response.firstChunkAt if response.firstChunkAt is not None else done
    return Sample(first - started, done - started, completion.stats.generated_tokens or 0, completion.text)


async def run_level(make: Any, iterations: int, concurrency: int, max_tokens: int) -> tuple[list[Sample], float]:
    """``iterations`` requests with ``concurrency`` in flight; returns samples and wall seconds."""
    samples: list[Sample] = []
    queue = list(range(iterations))

    async def worker() -> None:
        while queue:
            index = queue.pop(0)
            samples.append(await make(PROMPTS[index % len(PROMPTS)], max_tokens))

    started = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    return samples, time.perf_counter() - started


def figures(samples: list[Sample], wall: float) -> dict[str, float]:
    ttft = summarize([s.ttft * 1e3 for s in samples])
    total = summarize([s.total * 1e3 for s in samples])
    return {
        "requests": len(samples),
        "tokens": sum(s.tokens for s in samples),
        "tokens_per_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50_ms": ttft.p50,
        "ttft_p99_ms": ttft.p99,
        "latency_p50_ms": total.p50,
        "latency_p99_ms": total.p99,
    }


async def main(reactor: Any, args: argparse.Namespace) -> None:
    binary, how = find_llama_server()
    if binary is None:
        raise SystemExit(f"bench_llama_bridge: {how}")
    workdir = Path(tempfile.mkdtemp(prefix="cc50-bench-llama-"))
    model = generated_model(args.preset)
    llama = LlamaServer(
        binary, model, workdir / "llama-server.log", parallel=max(args.concurrency), threads=args.threads
    )
    llama.start()
    bridge = start_server(
        lambda listen: cc50_server_command(
            listen, "--backend=llama_server", f"--llama-url={llama.url}", *args.twistd_arg
        ),
        workdir / "cc50.log",
    )
    directClient = DirectClient(reactor)
    client = await connect(reactor, bridge.endpoint)
    results: dict[str, Any] = {
        "preset": args.preset,
        "model": model.name,
        "max_tokens": args.max_tokens,
        "iterations": args.iterations,
        "llama_server": how,
        "twistd_args": args.twistd_arg,
        "levels": {},
    }
    try:

        async def direct(prompt: str, max_tokens: int) -> Sample:
            return await direct_request(directClient, llama.url, prompt, max_tokens)

        async def bridged(prompt: str, max_tokens: int) -> Sample:
            return await bridged_request(client, prompt, max_tokens)

        # Warm up both paths (connections, llama-server's prompt cache), and
        # check they produce the same text: otherwise the comparison is moot.
        for prompt in PROMPTS:
            straight = await direct(prompt, args.max_tokens)
            through = await bridged(prompt, args.max_tokens)
            if straight.text != through.text or straight.tokens != through.tokens:
                print(f"warning: direct and bridged answers differ for {prompt!r}", file=sys.stderr)

        for concurrency in args.concurrency:
            collected: dict[str, tuple[list[Sample], float]] = {"direct": ([], 0.0), "bridge": ([], 0.0)}
            # Rounds of whole multiples of the concurrency, so no round ends
            # with fewer requests in flight than it should have.
            rounds = args.rounds or args.iterations // concurrency
            per_round = max(concurrency, args.iterations // max(1, rounds) // concurrency * concurrency)
            roundRatios: list[float] = []
            for _ in range(max(1, args.iterations // per_round)):
                rates: dict[str, float] = {}
                for name, make in (("direct", direct), ("bridge", bridged)):
                    samples, wall = await run_level(make, per_round, concurrency, args.max_tokens)
                    previous, previous_wall = collected[name]
                    collected[name] = (previous + samples, previous_wall + wall)
                    rates[name] = sum(s.tokens for s in samples) / wall
                roundRatios.append(rates["bridge"] / rates["direct"])
            level: dict[str, dict[str, float]] = {name: figures(*collected[name]) for name in collected}
            d, b = level["direct"], level["bridge"]
            level["ratio"] = {
                "tokens_per_s": b["tokens_per_s"] / d["tokens_per_s"],
                # Each round's bridge rate over the direct rate just before
                # it: drift between rounds cancels out of the median.
                "tokens_per_s_round_median": statistics.median(roundRatios),
                "ttft_p50_delta_ms": b["ttft_p50_ms"] - d["ttft_p50_ms"],
                "latency_p50_ratio": b["latency_p50_ms"] / d["latency_p50_ms"],
            }
            results["levels"][str(concurrency)] = level
            print_level(concurrency, level)
    finally:
        await client.close()
        await directClient.close()
        stop_process(bridge.process)
        llama.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


# Against the floor (issue 18) ------------------------------------------------------------


def floor_requests(address: tuple[str, int], count: int, max_tokens: int) -> tuple[list[float], int]:
    """
    ``count`` sequential requests on one raw-socket connection (headers
    walked by ``bench_core.HeaderWalker``, chunk payloads never decoded: the
    bridges' cost, not this client's); latencies in ms and the tokens the
    RESP_DONE frames counted.
    """
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        walker = bench_core.HeaderWalker(sock)
        tokens = 0
        latencies: list[float] = []
        for number in range(count):
            started = time.perf_counter()
            sock.sendall(encode_infer(number + 1, PROMPTS[number % len(PROMPTS)], max_tokens, 0xFFFFFFFF))
            _frames, _payload, kind = walker.until_terminal()
            if kind != MessageType.RESP_DONE:
                raise AssertionError(f"request {number + 1} ended with frame type {kind}")
            tokens += int.from_bytes(walker.terminal_payload()[:4], "little")
            latencies.append((time.perf_counter() - started) * 1e3)
    return latencies, tokens


def floor_comparison(
    directory: Path,
    rounds: int = 20,
    requests: int = 30,
    warmup: int = 10,
    max_tokens: int = 64,
    preset: str = "small",
    threads: int = 1,
    twistd_args: tuple[str, ...] = (),
    baseline: str | None = None,
) -> dict[str, Any]:
    """
    ``benchmarks/floor_bridge.py`` and ``twistd cc50 --backend=llama_server``
    (default options: the request log on, to a file) against one llama-server,
    measured in turn, the order rotating each round: each bridge's CPU per
    token (its CPU time over the tokens its RESP_DONE frames counted) and its
    request latency p50, and cc50tw's over the floor's, per round and as the
    median of the rounds.  ``baseline``: also ``cc50tw@base``, twistd run
    from that checkout (its path first on ``PYTHONPATH``), in the same run.
    """
    binary, how = find_llama_server()
    if binary is None:
        return {"skipped": "llama-server not installed", "detail": how}
    model = generated_model(preset)
    llama = LlamaServer(binary, model, directory / "llama-server.log", parallel=1, threads=threads)
    llama.start()
    floor = str(Path(__file__).resolve().parent / "floor_bridge.py")
    commands: dict[str, Callable[[str], list[str]]] = {
        "floor": lambda listen: [sys.executable, floor, listen, llama.url],
        "cc50tw": lambda listen: cc50_server_command(
            listen, "--backend=llama_server", f"--llama-url={llama.url}", *twistd_args
        ),
    }
    if baseline:
        # env execs twistd: the pid stays the bridge's own.
        commands["cc50tw@base"] = lambda listen: ["env", f"PYTHONPATH={baseline}"] + commands["cc50tw"](listen)
    names = list(commands)
    servers: dict[str, ServerProcess] = {}
    perRound: list[dict[str, dict[str, float]]] = []
    try:
        for name, command in commands.items():
            servers[name] = start_server(command, directory / f"{name}.log")
        addresses: dict[str, tuple[str, int]] = {}
        for name, server in servers.items():
            address = server.socket_address
            assert isinstance(address, tuple)
            addresses[name] = address
            floor_requests(address, warmup, max_tokens)
        for number in range(rounds):
            figures: dict[str, dict[str, float]] = {}
            shift = number % len(names)
            for name in names[shift:] + names[:shift]:
                server = servers[name]
                ticks, ns = server.cpu_seconds(), server.thread_cpu_seconds()
                latencies, tokens = floor_requests(addresses[name], requests, max_tokens)
                ticksAfter, nsAfter = server.cpu_seconds(), server.thread_cpu_seconds()
                figures[name] = {
                    # The precise clock where there is one: rounds are short, so
                    # that drift on a shared machine hits every bridge alike.
                    "cpu_us_per_token": (nsAfter - ns if not math.isnan(ns) else ticksAfter - ticks)
                    / max(1, tokens)
                    * 1e6,
                    "stat_cpu_us_per_token": (ticksAfter - ticks) / max(1, tokens) * 1e6,
                    "p50_ms": statistics.median(latencies),
                    "tokens": tokens,
                }
            perRound.append(figures)
    finally:
        for server in servers.values():
            stop_process(server.process)
        llama.stop()
    bridges: dict[str, dict[str, Any]] = {}
    for name in names:
        total = sum(r[name]["tokens"] for r in perRound)
        bridges[name] = {
            "cpu_us_per_token": statistics.median([r[name]["cpu_us_per_token"] for r in perRound]),
            # Over all rounds: ticks of 10 ms add up to a figure worth reading.
            "stat_cpu_us_per_token": sum(r[name]["stat_cpu_us_per_token"] * r[name]["tokens"] for r in perRound)
            / max(1, total),
            "p50_ms": statistics.median([r[name]["p50_ms"] for r in perRound]),
            "tokens": total,
        }
        if name != "floor":
            cpu = [r[name]["cpu_us_per_token"] / r["floor"]["cpu_us_per_token"] for r in perRound]
            p50 = [r[name]["p50_ms"] / r["floor"]["p50_ms"] for r in perRound]
            bridges[name].update(
                cpu_ratio_per_round=cpu,
                p50_ratio_per_round=p50,
                cpu_ratio=statistics.median(cpu),
                p50_ratio=statistics.median(p50),
                log_problems=servers[name].log_problems(),
            )
    return {
        "llama_server": how,
        "model": model.name,
        "threads": threads,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "requests_per_round": requests,
        "twistd_args": list(twistd_args),
        "baseline": baseline,
        "per_round": perRound,
        "bridges": bridges,
        "cpu_ratio": bridges["cc50tw"]["cpu_ratio"],
        "p50_ratio": bridges["cc50tw"]["p50_ratio"],
    }


def floor_table(result: dict[str, Any]) -> list[str]:
    """``floor_comparison``'s figures as lines (``--floor`` and the suite's ``bridge_floor``)."""
    if "skipped" in result:
        return [f"bridge against the floor: skipped: {result['skipped']} ({result.get('detail', '')})"]
    lines = [
        f"bridge against the floor: llama-server ({result['llama_server']}, model {result['model']}, "
        f"{result['threads']} thread(s)), {result['max_tokens']}-token requests, sequential, raw-socket client; "
        f"{result['rounds']} rounds x {result['requests_per_round']} requests per bridge, order rotating",
        f"  {'bridge':<13}{'CPU/token':>11}{'(stat)':>10}{'p50':>10}{'tokens':>9}{'CPU x floor':>13}{'p50 x floor':>13}",
    ]
    for name, f in result["bridges"].items():
        ratios = f"{f['cpu_ratio']:>13.3f}{f['p50_ratio']:>13.3f}" if "cpu_ratio" in f else ""
        lines.append(
            f"  {name:<13}{f['cpu_us_per_token']:>9.1f}µs{f['stat_cpu_us_per_token']:>8.1f}µs"
            f"{f['p50_ms']:>8.2f}ms{f['tokens']:>9}{ratios}"
        )
    for name, f in result["bridges"].items():
        if "cpu_ratio" in f:
            lines.append(f"  {name} / floor per round, CPU: " + ", ".join(f"{r:.2f}" for r in f["cpu_ratio_per_round"]))
            lines.append(f"  {name} / floor per round, p50: " + ", ".join(f"{r:.2f}" for r in f["p50_ratio_per_round"]))
    lines.append(
        "  CPU/token: median of the rounds (the threads' run time, /proc/PID/task/*/schedstat); "
        "(stat): /proc/PID/stat utime+stime over all rounds; x floor: median of the per-round ratios"
    )
    return lines


def print_level(concurrency: int, level: dict[str, dict[str, float]]) -> None:
    print(f"\nconcurrency {concurrency}, {level['direct']['requests']} requests per path")
    print(f"  {'path':<8}{'tokens/s':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'lat p50':>11}{'lat p99':>11}")
    for name in ("direct", "bridge"):
        f = level[name]
        print(
            f"  {name:<8}{f['tokens_per_s']:>10.1f}{f['ttft_p50_ms']:>9.2f}ms{f['ttft_p99_ms']:>9.2f}ms"
            f"{f['latency_p50_ms']:>9.1f}ms{f['latency_p99_ms']:>9.1f}ms"
        )
    r = level["ratio"]
    print(
        f"  bridge/direct: tokens/s x{r['tokens_per_s']:.4f} ({(r['tokens_per_s'] - 1) * 100:+.2f}%; "
        f"median of rounds {(r['tokens_per_s_round_median'] - 1) * 100:+.2f}%), "
        f"TTFT p50 {r['ttft_p50_delta_ms']:+.2f} ms, latency p50 x{r['latency_p50_ratio']:.4f}"
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "large"], help="generated model size")
    parser.add_argument(
        "--iterations",
        type=int,
        help=f"requests per path and concurrency level (default {ITERATIONS}); "
        f"with --floor, requests per bridge per round (default {FLOOR_REQUESTS})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="alternations between the paths per level (default: every CONCURRENCY requests); "
        f"with --floor, rounds, each bridge measured once (default {FLOOR_ROUNDS})",
    )
    parser.add_argument(
        "--max-tokens", type=int, help=f"tokens per request (default {MAX_TOKENS}; with --floor, {FLOOR_MAX_TOKENS})"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama-server threads (more than the idle cores makes llama.cpp's spinning threads collapse)",
    )
    parser.add_argument(
        "--twistd-arg",
        action="append",
        default=[],
        help="extra twistd cc50 option for the bridge, e.g. --twistd-arg=--llama-idle-timeout=30 (repeatable)",
    )
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="instead: twistd cc50 against benchmarks/floor_bridge.py, CPU per token and p50 "
        f"(--rounds, default {FLOOR_ROUNDS}; --iterations per bridge per round, default {FLOOR_REQUESTS}; "
        f"--max-tokens, default {FLOOR_MAX_TOKENS})",
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="with --floor: also twistd cc50 from this checkout (e.g. `git archive HEAD` unpacked), as cc50tw@base",
    )
    args = parser.parse_args(argv)
    # Each mode's defaults, filled in once the mode is known, so that an
    # explicit value is always kept.
    if args.floor:
        defaults = {"rounds": FLOOR_ROUNDS, "iterations": FLOOR_REQUESTS, "max_tokens": FLOOR_MAX_TOKENS}
    else:
        defaults = {"rounds": 0, "iterations": ITERATIONS, "max_tokens": MAX_TOKENS}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.floor and (args.rounds < 1 or args.iterations < 1):
        parser.error("with --floor, --rounds and --iterations must be at least 1")
    return args


def floor_main(args: argparse.Namespace) -> None:
    result = floor_comparison(
        Path(tempfile.mkdtemp(prefix="cc50-bench-floor-")),
        rounds=args.rounds,
        requests=args.iterations,
        max_tokens=args.max_tokens,
        preset=args.preset,
        threads=args.threads,
        twistd_args=tuple(args.twistd_arg),
        baseline=args.baseline,
    )
    if "skipped" in result:
        raise SystemExit(f"bench_llama_bridge: {result['detail']}")
    print("\n".join(floor_table(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.floor:
        floor_main(arguments)
    else:
        react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
