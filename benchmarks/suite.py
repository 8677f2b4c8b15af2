"""
The benchmark suite (issue 7): ``python -m benchmarks [SCENARIO ...]``.

Each scenario runs in a fresh process of its own (a Twisted reactor runs once
per process, and a fresh process keeps one scenario's memory out of the
next's figures), starts its own ``twistd cc50`` where it needs one, prints a
table and, with ``--json-dir``, writes ``SCENARIO.json``.  A last table
compares the figures with the issue's targets.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import bench_core
from cc50tw.bench import (
    bench_report,
    main_module_hidden,
    raise_open_file_limit,
    run_on_reactor,
    run_processes_blocking,
    shares,
)
from cc50tw.codec import MessageType, encode_infer
from cc50tw.scrape import HistogramSnapshot, parse_histogram
from cc50tw.stats import summarize
from cc50tw.testing import open_fds, rss_bytes
from tests.helpers import (
    REPO_ROOT,
    ServerProcess,
    cc50_server_command,
    free_port,
    start_server,
    twistd_command,
)

BENCHMARKS = Path(__file__).resolve().parent

#: Listen backlog for the suite's servers: thousands of connections arrive at
#: once, and Twisted's default of 50 would turn the overflow into SYN retries.
BACKLOG = 4096


# Infrastructure -------------------------------------------------------------------------


@contextmanager
def served(directory: Path, *server_args: str, name: str = "server") -> Iterator[ServerProcess]:
    """A ``twistd cc50 --toy-iters=0 --quiet-requests`` for the duration; checks its log afterwards."""
    args = ["--toy-iters=0", "--quiet-requests", *server_args]
    server = start_server(
        lambda listen: cc50_server_command(f"{listen}:backlog={BACKLOG}", *args), directory / f"{name}.log"
    )
    with stopped(server):
        yield server


@contextmanager
def stopped(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop ``server`` (SIGTERM, its drain) when done; then check its log for errors."""
    try:
        yield server
    finally:
        server.stop(30)
    problems = server.log_problems()
    if problems:
        raise AssertionError(f"server log shows problems: {problems[:5]}\n{server.log_tail()}")


def server_cpu(server: ServerProcess) -> float:
    try:
        return server.cpu_seconds()
    except OSError:
        return math.nan


def server_cpu_ns(server: ServerProcess) -> float:
    """
    ``server_cpu`` from the threads' schedstat, in ns: a round of a few
    hundred requests is a few clock ticks, too coarse to tell servers apart.
    Clock ticks where the kernel keeps no schedstat.
    """
    seconds = server.thread_cpu_seconds()
    return server_cpu(server) if math.isnan(seconds) else seconds


def _call(pipe: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = function(*args)
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    else:
        pipe.send(("ok", result))
    finally:
        sys.stdout.flush()
        pipe.close()


def call_in_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh (spawned) process: its own reactor, its own memory."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    with main_module_hidden():
        process = context.Process(target=_call, args=(send, function, args))
        process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        process.join()
        status, payload = "error", f"the scenario's process died (exit status {process.exitcode})"
    process.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def us(summary: dict[str, float], key: str) -> str:
    return f"{summary[key]:.1f}"


# 1. Round trip --------------------------------------------------------------------------


def round_trip(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """
    Sequential 1-token requests on one connection, through a raw-socket client
    (headers walked, payloads never decoded: the server's cost) and through
    ``cc50tw.client`` (what an application sees), alternating in rounds so
    that drift on a shared machine hits both alike.
    """
    from cc50tw.client import connect

    rounds, requests, warmup = options["rounds"], options["requests"], options["warmup"]
    with served(directory) as server:
        address = server.socket_address
        assert isinstance(address, tuple)

        async def main(reactor: Any) -> dict[str, Any]:
            client = await connect(reactor, server.endpoint)
            raw: list[float] = []
            library: list[float] = []
            per_round: list[dict[str, float]] = []
            cpu_seconds = 0.0
            for _ in range(rounds):
                # The raw client blocks this (otherwise idle) reactor thread while it runs.
                before = server_cpu(server)
                raw_round = bench_core.raw_round_trips(address, requests, warmup)
                cpu_seconds += server_cpu(server) - before
                library_round = await bench_core.library_round_trips(client, requests, warmup)
                raw += raw_round
                library += library_round
                per_round.append({"raw_p50": summarize(raw_round).p50, "library_p50": summarize(library_round).p50})
            await client.close()
            return {
                "rounds": rounds,
                "requests_per_round": requests,
                "warmup_per_round": warmup,
                "raw_us": bench_core.latency_summary(raw),
                "library_us": bench_core.latency_summary(library),
                "per_round_p50_us": per_round,
                "server_cpu_us_per_request": cpu_seconds / (rounds * (requests + warmup)) * 1e6,
            }

        return run_on_reactor(main)


def round_trip_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"round trip: 1-token requests, --toy-iters=0, one connection, sequential; "
        f"{result['rounds']} rounds x {result['requests_per_round']} requests per client (µs)",
        f"  {'client':<16}{'p50':>9}{'p99':>10}{'mean':>9}{'min':>9}",
    ]
    for name, key in (("raw socket", "raw_us"), ("cc50tw.client", "library_us")):
        r = result[key]
        lines.append(f"  {name:<16}{r['p50']:>9.1f}{r['p99']:>10.1f}{r['mean']:>9.1f}{r['min']:>9.1f}")
    rounds = ", ".join(f"{r['raw_p50']:.0f}/{r['library_p50']:.0f}" for r in result["per_round_p50_us"])
    lines.append(f"  p50 per round, raw/library: {rounds}")
    lines.append(
        f"  cc50tw.client adds {result['library_us']['p50'] - result['raw_us']['p50']:.1f} µs at p50 "
        f"(x{ratio(result['library_us']['p50'], result['raw_us']['p50']):.2f}); "
        f"server CPU {result['server_cpu_us_per_request']:.1f} µs per request"
    )
    return lines


# 1b. Round trip against the floor (issue 18) ---------------------------------------------


#: The servers ``round_trip_floor`` sets side by side: (name, what it is, twistd's
#: options before ``cc50``, ``cc50``'s options).  ``None``: the floor responder.
FLOOR_SERVERS: tuple[tuple[str, str, tuple[str, ...] | None, tuple[str, ...]], ...] = (
    ("floor", "benchmarks/floor_responder.py", None, ()),
    # No target: the floor sending in the read as cc50tw does, so that what cc50tw's
    # own work costs shows apart from what sending early saves.
    ("floor-sendnow", "benchmarks/floor_responder.py --send-now", None, ("--send-now",)),
    ("default", "twistd cc50, default options, stdout to a file", (), ()),
    ("logfile", "twistd --logfile=FILE cc50, default options", ("--logfile={log}",), ()),
    ("json", "twistd cc50 --log-format=json, stdout to a file", (), ("--log-format=json",)),
    ("quiet", "twistd cc50 --quiet-requests", (), ("--quiet-requests",)),
    # No target: the streaming path, which answers at once skip (a backend with generate() alone).
    ("streamed", "twistd cc50 --quiet-requests --toy-streamed", (), ("--quiet-requests", "--toy-streamed")),
)

#: Targets of issue 18: each server's round-trip p50 over the floor's.
FLOOR_TARGETS = {"default": 1.3, "logfile": 1.3, "quiet": 1.1}

#: The floor the issue's targets are set against, and the one that sends in the read as well.
FLOOR, FLOOR_SENDNOW = "floor", "floor-sendnow"


def floor_server(
    directory: Path,
    name: str,
    twistdArgs: tuple[str, ...] | None,
    cc50Args: tuple[str, ...],
    tree: str | None = None,
) -> ServerProcess:
    """
    Start one of ``FLOOR_SERVERS``: its stdout (and stderr) go to ``NAME.log``
    in ``directory``.  ``tree``: run cc50tw from that checkout instead (its
    path first on ``PYTHONPATH``), to set an older version beside this one.
    """
    output = directory / f"{name}.log"
    if twistdArgs is None:
        script = str(BENCHMARKS / "floor_responder.py")
        return start_server(lambda listen: [sys.executable, script, *cc50Args, f"{listen}:backlog={BACKLOG}"], output)
    before = [arg.format(log=directory / f"{name}-twistd.log") for arg in twistdArgs]
    prefix = [] if tree is None else ["env", f"PYTHONPATH={tree}"]  # env execs: the pid stays the server's
    return start_server(
        lambda listen: prefix
        + twistd_command(
            "-n", "--pidfile=", *before, "cc50", f"--listen={listen}:backlog={BACKLOG}", "--toy-iters=0", *cc50Args
        ),
        output,
    )


def request_log_lines(directory: Path, name: str) -> int:
    """Request lines the server wrote, wherever its log went (once it has stopped)."""
    count = 0
    # twistd's --logfile rotates at 1 MB: NAME-twistd.log.1, .2, ... hold the earlier lines.
    for path in [directory / f"{name}.log", *directory.glob(f"{name}-twistd.log*")]:
        if path.exists():
            with open(path, errors="replace") as log:
                count += sum(1 for line in log if '"req_id"' in line or "] request " in line)
    return count


def pin_apart(stack: ExitStack, serverPids: list[int]) -> bool:
    """
    Run the client (this process) on CPU 0 and every server, each of its
    threads, on CPU 1, until ``stack`` closes; False, pinning nothing, on a
    machine with fewer than two CPUs or without ``sched_setaffinity``.

    Sequential round trips on a 2-CPU VM otherwise depend on where the
    scheduler happens to put client and server: together on one CPU, or
    moving between them, a round moves by 10-20% whatever the server.  Each
    server is measured alone, so one CPU for all of them costs none of them.
    """
    setAffinity = getattr(os, "sched_setaffinity", None)
    if setAffinity is None or len(os.sched_getaffinity(0)) < 2:
        return False
    clientCpu, serverCpu = sorted(os.sched_getaffinity(0))[:2]
    before = os.sched_getaffinity(0)
    setAffinity(0, {clientCpu})
    stack.callback(setAffinity, 0, before)
    for pid in serverPids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                setAffinity(int(task), {serverCpu})
            except OSError:  # a thread that has just ended
                pass
    return True


def round_trip_floor(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """
    Sequential 1-token round trips from the raw-socket client to a minimal
    Twisted responder (the floor) and to ``twistd cc50 --toy-iters=0`` as a
    user runs it (request log on, to a file) and quiet, all running at once
    and measured in turn, the order rotating every round so that drift and
    position hit each alike.  Each server's p50 is set against the floor's.
    """
    rounds, requests, warmup = options["rounds"], options["requests"], options["warmup"]
    tree = options.get("baseline")
    chosen: list[tuple[str, str, tuple[str, ...] | None, tuple[str, ...], str | None]] = [
        (*server, None) for server in FLOOR_SERVERS
    ]
    if tree:
        chosen += [
            (f"{name}@base", f"{what}, from {tree}", twistdArgs, cc50Args, tree)
            for name, what, twistdArgs, cc50Args in FLOOR_SERVERS
            if name in ("default", "quiet")
        ]
    names = [name for name, *_ in chosen]
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpuSeconds = dict.fromkeys(names, 0.0)
    perRound: list[dict[str, float]] = []
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(stopped(floor_server(directory, name, twistdArgs, cc50Args, where)))
            for name, _, twistdArgs, cc50Args, where in chosen
        }
        pinned = options.get("pin", True) and pin_apart(stack, [server.process.pid for server in servers.values()])
        for number in range(rounds):
            shift = number % len(names)
            figures: dict[str, float] = {}
            for name in names[shift:] + names[:shift]:
                server = servers[name]
                address = server.socket_address
                assert isinstance(address, tuple)
                before = server_cpu_ns(server)
                latencies = bench_core.raw_round_trips(address, requests, warmup)
                cpuSeconds[name] += server_cpu_ns(server) - before
                samples[name] += latencies
                figures[name] = summarize(latencies).p50
            perRound.append(figures)
    # Stopped (SIGTERM, drained): every request's line must be in the log by now.
    logged = {
        name: request_log_lines(directory, name)
        for name in names
        if name.split("@")[0] not in (FLOOR, FLOOR_SENDNOW, "quiet", "streamed")
    }
    servers_: dict[str, dict[str, Any]] = {}
    for name, what, *_ in chosen:
        servers_[name] = {
            "what": what,
            "raw_us": bench_core.latency_summary(samples[name]),
            "server_cpu_us_per_request": cpuSeconds[name] / (rounds * (requests + warmup)) * 1e6,
            "p50_ratio_to_floor": ratio(summarize(samples[name]).p50, summarize(samples[FLOOR]).p50),
            "per_round_ratio_to_floor": [ratio(r[name], r[FLOOR]) for r in perRound],
            "per_round_ratio_to_sendnow_floor": [ratio(r[name], r[FLOOR_SENDNOW]) for r in perRound],
        }
        for key in ("floor", "sendnow_floor"):
            servers_[name][f"median_round_ratio_to_{key}"] = statistics.median(
                servers_[name][f"per_round_ratio_to_{key}"]
            )
        if name in logged:
            servers_[name]["request_lines_logged"] = logged[name]
    return {
        "rounds": rounds,
        "requests_per_round": requests,
        "warmup_per_round": warmup,
        "requests_per_server": rounds * (requests + warmup),
        "pinned": pinned,
        "per_round_p50_us": perRound,
        "servers": servers_,
    }


def round_trip_floor_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"round trip against the floor: raw-socket 1-token requests, one connection, sequential; "
        f"{result['rounds']} rounds x {result['requests_per_round']} measured + {result['warmup_per_round']} warm-up "
        f"requests per server, order rotating (µs); "
        + ("client on one CPU, servers on another" if result.get("pinned") else "not pinned to CPUs"),
        f"  {'server':<15}{'p50':>8}{'p99':>9}{'mean':>8}{'server CPU':>12}{'x floor':>9}{'median round':>14}"
        f"{'x sendnow':>11}{'log lines':>11}  what",
    ]
    for name, r in result["servers"].items():
        s = r["raw_us"]
        logged = r.get("request_lines_logged")
        lines.append(
            f"  {name:<15}{s['p50']:>8.1f}{s['p99']:>9.1f}{s['mean']:>8.1f}{r['server_cpu_us_per_request']:>12.1f}"
            f"{r['p50_ratio_to_floor']:>9.2f}{r['median_round_ratio_to_floor']:>14.2f}"
            f"{r['median_round_ratio_to_sendnow_floor']:>11.2f}"
            f"{'' if logged is None else logged:>11}  {r['what']}"
        )
    for number, figures in enumerate(result["per_round_p50_us"], 1):
        lines.append(f"  round {number} p50: " + ", ".join(f"{name} {p50:.0f}" for name, p50 in figures.items()))
    lines.append(
        f"  x floor: pooled p50 over the floor's; median round: median of the per-round ratios "
        f"(the targets' figure); x sendnow: the same over floor-sendnow's. "
        f"log lines: request lines in the log after SIGTERM, of {result['requests_per_server']} requests"
    )
    return lines


# 2. Streaming rate ----------------------------------------------------------------------


def streaming(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """
    One request of ``tokens`` tokens: RESP_CHUNK frames/s and MB/s received,
    by the raw client (window 0xFFFFFFFF, so the server never waits for
    credit) and by ``cc50tw.client`` (default window, credit granted back),
    alternating.
    """
    from cc50tw.client import connect

    tokens, repeats = options["tokens"], options["repeats"]
    with served(directory) as server:
        address = server.socket_address
        assert isinstance(address, tuple)

        async def main(reactor: Any) -> dict[str, Any]:
            client = await connect(reactor, server.endpoint)
            raw, library = [], []
            for _ in range(repeats):
                before, mine = server_cpu(server), time.process_time()
                run = bench_core.raw_stream(address, tokens)
                run["server_cpu_share"] = (server_cpu(server) - before) / run["seconds"]
                run["client_cpu_share"] = (time.process_time() - mine) / run["seconds"]
                raw.append(run)
                before, mine = server_cpu(server), time.process_time()
                run = await bench_core.library_stream(client, tokens)
                run["server_cpu_share"] = (server_cpu(server) - before) / run["seconds"]
                run["client_cpu_share"] = (time.process_time() - mine) / run["seconds"]
                library.append(run)
            await client.close()
            return {
                "tokens": tokens,
                "repeats": repeats,
                "raw": bench_core.median_run(raw),
                "library": bench_core.median_run(library),
                "raw_runs": raw,
                "library_runs": library,
            }

        return run_on_reactor(main)


def streaming_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"streaming rate: one request of {result['tokens']:,} tokens, --toy-iters=0 (median of {result['repeats']})",
        f"  {'client':<16}{'seconds':>9}{'frames/s':>12}{'payload MB/s':>14}{'wire MB/s':>11}{'server CPU':>12}"
        f"{'client CPU':>12}",
    ]
    for name, key in (("raw socket", "raw"), ("cc50tw.client", "library")):
        r = result[key]
        lines.append(
            f"  {name:<16}{r['seconds']:>9.3f}{r['frames_per_s']:>12,.0f}{r['payload_MB_per_s']:>14.2f}"
            f"{r['wire_MB_per_s']:>11.2f}{r['server_cpu_share'] * 100:>11.0f}%{r['client_cpu_share'] * 100:>11.0f}%"
        )
    return lines


# 3. Concurrency -------------------------------------------------------------------------


def concurrency(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """
    ``requests`` streaming requests all in flight at once, over each number of
    connections, from 1..N client processes (``cc50tw.bench``, merged): every
    request must complete; aggregate tokens/s and TTFT.  The server's CPU
    share during the run says whether the server or the client was the limit.
    """
    requests, tokens = options["requests"], options["tokens"]
    raise_open_file_limit(max(options["connections"]) + 256)
    runs: list[dict[str, Any]] = []
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with served(
        directory, f"--max-concurrency={max(1024, requests)}", f"--metrics=tcp:{metrics_port}:interface=127.0.0.1"
    ) as server:
        for connections in options["connections"]:
            for processes in options["processes"]:
                bench_shares = shares(server.endpoint, "hi", tokens, requests, requests, connections, processes)
                ttft_before = server_ttft(metrics_url)
                before = server_cpu(server)
                # Always in processes of their own (spawned, started together once
                # connected): the same load generator for one process as for many.
                result = run_processes_blocking(bench_shares)
                cpu = server_cpu(server) - before
                ttft = server_ttft(metrics_url).since(ttft_before)
                report = bench_report(result, {"connections": connections, "processes": processes})
                report.pop("samples")
                report["server_ttft_ms"] = {
                    "requests": ttft.observations,
                    "mean": ttft.mean * 1e3,
                    "p50_estimate": ttft.quantile(0.5) * 1e3,
                    "p99_estimate": ttft.quantile(0.99) * 1e3,
                }
                report["server_cpu_share"] = cpu / result.wall_s if result.wall_s else math.nan
                report["all_completed"] = report["requests"] == requests and report["errors"] == 0
                runs.append(report)
    return {"requests": requests, "tokens_per_request": tokens, "runs": runs}


def server_ttft(url: str) -> HistogramSnapshot:
    """The server's own TTFT histogram (request read to first chunk written), from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_histogram(response.read().decode(), "cc50_time_to_first_token_seconds")


def concurrency_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"concurrency: {result['requests']:,} streaming requests of {result['tokens_per_request']:,} tokens, "
        f"all in flight at once",
        f"  {'connections':>11}{'procs':>6}{'done':>7}{'errors':>7}{'wall s':>8}{'tokens/s':>12}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'lat p99':>10}{'server CPU':>12}{'client CPU':>12}"
        f"{'server TTFT p50/p99':>21}",
    ]
    for run in result["runs"]:
        settings = run["settings"]
        lines.append(
            f"  {settings['connections']:>11}{settings['processes']:>6}{run['requests']:>7}{run['errors']:>7}"
            f"{run['wall_s']:>8.2f}{run['tokens_per_s']:>12,.0f}{run['ttft_ms']['p50']:>8.1f}ms"
            f"{run['ttft_ms']['p99']:>8.1f}ms{run['latency_ms']['p99']:>8.1f}ms{run['server_cpu_share'] * 100:>11.0f}%"
            f"{run['client_cpu_share'] * 100:>11.0f}%"
            f"{run['server_ttft_ms']['p50_estimate']:>9.1f}/{run['server_ttft_ms']['p99_estimate']:.1f}ms"
        )
    lines.append(
        "  TTFT and latency as the clients saw them, from sending the request; the server's TTFT (request read to"
    )
    lines.append("  first chunk written) is estimated from its /metrics histogram, before minus after each run")
    return lines


# 4. Connections held --------------------------------------------------------------------


def _wait_for_fds(pid: int, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = open_fds(pid)
        if count >= target or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def _settled_rss(pid: int) -> int:
    """RSS once the server has had a moment to finish what the last burst started."""
    time.sleep(1.0)
    return rss_bytes(pid)


def connections_held(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """
    ``count`` idle connections to one server: the server's RSS per
    connection, just connected and again after one 1-token request on each
    (buffers and decoders that a used connection keeps).  The client holds
    plain sockets, after raising its own open-file limit.
    """
    count = options["count"]
    soft, hard = raise_open_file_limit(count + 256)
    with served(directory, f"--max-connections={count + 100}", "--idle-timeout=3600") as server:
        limit_line = next((line for line in server.log().splitlines() if "open-file limit" in line), "")
        address = server.socket_address
        assert isinstance(address, tuple)
        bench_core.raw_round_trips(address, 200, 0)  # warm the server: imports, first allocations
        rss_before = _settled_rss(server.pid)  # also lets the warm-up connection's close land
        fds_before = open_fds(server.pid)
        sockets: list[socket.socket] = []
        started = time.perf_counter()
        try:
            for _ in range(count):
                sockets.append(socket.create_connection(address))
            connect_s = time.perf_counter() - started
            accepted = _wait_for_fds(server.pid, fds_before + count, 60) - fds_before
            rss_idle = _settled_rss(server.pid)
            # One request on each, all sent first, then all read: the server
            # answers them as they come, and each connection is idle again after.
            request = encode_infer(1, "hi", 1)
            for sock in sockets:
                sock.sendall(request)
            answered = 0
            for sock in sockets:
                frames, _, kind = bench_core.HeaderWalker(sock).until_terminal()
                answered += frames == 1 and kind == MessageType.RESP_DONE
            rss_used = _settled_rss(server.pid)
            peak_rss = server_peak_rss(server.pid)
        finally:
            for sock in sockets:
                sock.close()
        rss_after_close = _settled_rss(server.pid)
    return {
        "connections": count,
        "accepted": accepted,
        "answered": answered,
        "connect_seconds": connect_s,
        "client_open_file_limit": [soft, hard],
        "server_limit_log_line": limit_line.split("] ", 1)[-1],
        "server_rss_before_mib": rss_before / 2**20,
        "server_rss_idle_mib": rss_idle / 2**20,
        "server_rss_after_one_request_each_mib": rss_used / 2**20,
        "server_rss_after_close_mib": rss_after_close / 2**20,
        "server_peak_rss_mib": peak_rss / 2**20,
        "kib_per_connection_idle": (rss_idle - rss_before) / max(1, accepted) / 1024,
        "kib_per_connection_after_one_request": (rss_used - rss_before) / max(1, accepted) / 1024,
    }


def server_peak_rss(pid: int) -> int:
    from cc50tw.testing import peak_rss_bytes

    return peak_rss_bytes(pid)


def connections_table(result: dict[str, Any]) -> list[str]:
    return [
        f"connections held: {result['connections']:,} idle connections to one server "
        f"({result['accepted']:,} accepted, connected in {result['connect_seconds']:.1f} s)",
        f"  server: {result['server_limit_log_line']}; client limit raised to {result['client_open_file_limit'][0]}",
        f"  {'state':<34}{'server RSS':>12}{'per connection':>16}",
        f"  {'before':<34}{result['server_rss_before_mib']:>9.1f}MiB{'':>16}",
        f"  {'connected, idle':<34}{result['server_rss_idle_mib']:>9.1f}MiB"
        f"{result['kib_per_connection_idle']:>12.2f} KiB",
        f"  {'after one 1-token request each':<34}{result['server_rss_after_one_request_each_mib']:>9.1f}MiB"
        f"{result['kib_per_connection_after_one_request']:>12.2f} KiB",
        f"  {'all closed':<34}{result['server_rss_after_close_mib']:>9.1f}MiB{'':>16}",
        f"  answered {result['answered']:,} of {result['connections']:,} requests",
    ]


# 5. Bridge overhead ---------------------------------------------------------------------


def bridge(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``benchmarks/bench_llama_bridge.py`` when it and llama-server are there; otherwise skipped, saying why."""
    script = BENCHMARKS / "bench_llama_bridge.py"
    if not script.exists():
        return {"skipped": "benchmarks/bench_llama_bridge.py is not there"}
    from tests.llama_support import find_llama_server

    binary, how = find_llama_server()
    if binary is None:
        return {"skipped": "llama-server not installed", "detail": how}
    output = directory / "bridge.json"
    argv = [sys.executable, str(script), "--json", str(output), *options["args"]]
    completed = subprocess.run(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if completed.returncode != 0 or not output.exists():
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}:\n{completed.stdout[-4000:]}")
    result: dict[str, Any] = json.loads(output.read_text())
    result["command"] = argv[1:]
    result["output"] = completed.stdout
    return result


def bridge_table(result: dict[str, Any]) -> list[str]:
    if "skipped" in result:
        return [f"bridge overhead: skipped: {result['skipped']}"]
    lines = [
        f"bridge overhead: llama-server ({result.get('llama_server', '?')}, model {result.get('model', '?')}), "
        f"{result.get('max_tokens')} tokens per request, direct over HTTP vs through twistd cc50",
        f"  {'concurrency':>11}{'path':>8}{'tokens/s':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'lat p50':>10}",
    ]
    for level, figures in result.get("levels", {}).items():
        for path in ("direct", "bridge"):
            f = figures[path]
            lines.append(
                f"  {level:>11}{path:>8}{f['tokens_per_s']:>10.1f}{f['ttft_p50_ms']:>9.2f}ms"
                f"{f['ttft_p99_ms']:>9.2f}ms{f['latency_p50_ms']:>8.1f}ms"
            )
        r = figures["ratio"]
        lines.append(
            f"  {'':>11}{'ratio':>8}  tokens/s {(r['tokens_per_s'] - 1) * 100:+.2f}%, TTFT p50 "
            f"{r['ttft_p50_delta_ms']:+.2f} ms"
        )
    return lines


# 5b. The bridge against the floor (issue 18) ----------------------------------------------


#: Targets of issue 18: cc50tw's bridge over the floor bridge, medians of per-round ratios.
BRIDGE_FLOOR_TARGETS = {"cpu_ratio": 1.1, "p50_ratio": 1.05}


def bridge_floor(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """
    ``benchmarks/floor_bridge.py`` (a minimal Twisted SSE-to-CC50 bridge)
    against ``twistd cc50 --backend=llama_server`` with its default options,
    one real llama-server behind both (``bench_llama_bridge.floor_comparison``).
    """
    from benchmarks import bench_llama_bridge

    result: dict[str, Any] = bench_llama_bridge.floor_comparison(
        directory,
        rounds=options["rounds"],
        requests=options["requests"],
        max_tokens=options["max_tokens"],
        baseline=options.get("baseline"),
    )
    return result


def bridge_floor_table(result: dict[str, Any]) -> list[str]:
    from benchmarks import bench_llama_bridge

    return bench_llama_bridge.floor_table(result)


# 6. Slow reader -------------------------------------------------------------------------


def slow_reader(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``benchmarks/bench_slow_reader.py``'s measurement (its server runs in this process)."""
    from benchmarks import bench_slow_reader

    args = argparse.Namespace(**options)
    result: dict[str, Any] = run_on_reactor(lambda reactor: bench_slow_reader.run(reactor, args))
    return result


def slow_reader_table(result: dict[str, Any]) -> list[str]:
    return [
        f"slow reader: {result['requests']} requests of {result['tokens_per_request']:,} tokens, "
        f"not read for {result['stall_s']:g} s",
        f"  server's peak queued bytes for that connection: {result['peak_queued_bytes']:,}",
        f"  server RSS: {result['rss_before_mib']:.1f} MiB before, {result['peak_rss_mib']:.1f} MiB peak",
        f"  another client meanwhile (100-token requests): p50 {result['other_client_p50_ms_baseline']:.2f} -> "
        f"{result['other_client_p50_ms_during']:.2f} ms, p99 {result['other_client_p99_ms_baseline']:.2f} -> "
        f"{result['other_client_p99_ms_during']:.2f} ms",
        f"  drained in {result['drain_s']:.2f} s once read; problems: {result['problems'] or 'none'}",
    ]


# 7. The client library's own cost --------------------------------------------------------


def client_cost(options: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``benchmarks/bench_client.py``: the client's Python time per chunk frame and per request, no server."""
    from benchmarks import bench_client

    result: dict[str, Any] = bench_client.measure(options["tokens"], options["requests"], options["repeats"])
    return result


def client_cost_table(result: dict[str, Any]) -> list[str]:
    return [
        f"client library alone (recorded server bytes on a StringTransport; median of {result['repeats']})",
        f"  receiving {result['tokens']:,} chunk frames: {result['receive_ns_per_chunk']:.0f} ns per frame "
        f"({result['client_chunks_per_s']:,.0f} frames/s on one core)",
        f"  1-token requests, infer() to collect() firing: {result['request_us']:.2f} µs per request",
    ]


# Registry and targets -------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[dict[str, Any], Path], dict[str, Any]]
    table: Callable[[dict[str, Any]], list[str]]


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "round_trip", "1-token round trips, raw socket and cc50tw.client: p50/p99 µs", round_trip, round_trip_table
        ),
        Scenario(
            "round_trip_floor",
            "1-token round trips: twistd cc50 (request log on, json, quiet) against a minimal Twisted responder",
            round_trip_floor,
            round_trip_floor_table,
        ),
        Scenario("streaming", "one 1,000,000-token request: frames/s and MB/s", streaming, streaming_table),
        Scenario(
            "concurrency", "1,000 concurrent streams over 100 and 1,000 connections", concurrency, concurrency_table
        ),
        Scenario(
            "connections", "10,000 idle connections: server RSS per connection", connections_held, connections_table
        ),
        Scenario("bridge", "llama-server direct vs through cc50tw (bench_llama_bridge.py)", bridge, bridge_table),
        Scenario(
            "bridge_floor",
            "llama-server through twistd cc50 (defaults) against a minimal Twisted bridge: CPU/token, p50",
            bridge_floor,
            bridge_floor_table,
        ),
        Scenario("slow_reader", "a client that stops reading (bench_slow_reader.py)", slow_reader, slow_reader_table),
        Scenario(
            "client",
            "the client library's own CPU per chunk and per request (bench_client.py)",
            client_cost,
            client_cost_table,
        ),
    )
}


def targets(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, met) for each target of the issue that was measured."""
    rows: list[tuple[str, str, str, bool | None]] = []
    if "round_trip" in results:
        p50 = results["round_trip"]["raw_us"]["p50"]
        rows.append(("round trip p50 (raw client)", f"{p50:.1f} µs", "<= 100 µs", p50 <= 100))
        p50 = results["round_trip"]["library_us"]["p50"]
        rows.append(("round trip p50 (cc50tw.client)", f"{p50:.1f} µs", "(no target)", None))
    if "round_trip_floor" in results:
        figures = results["round_trip_floor"]["servers"]
        for name, limit in FLOOR_TARGETS.items():
            r = figures[name]["median_round_ratio_to_floor"]
            rows.append((f"round trip p50 / floor ({name})", f"x{r:.2f}", f"<= x{limit}", r <= limit))
        for name in ("json", "streamed"):
            r = figures[name]["median_round_ratio_to_floor"]
            rows.append((f"round trip p50 / floor ({name})", f"x{r:.2f}", "(no target)", None))
        for name in ("default", "quiet"):
            r = figures[name]["median_round_ratio_to_sendnow_floor"]
            rows.append((f"round trip p50 / floor-sendnow ({name})", f"x{r:.2f}", "(no target)", None))
        for name in ("default", "logfile", "json"):
            logged, sent = figures[name]["request_lines_logged"], results["round_trip_floor"]["requests_per_server"]
            rows.append((f"request lines logged ({name})", f"{logged} of {sent}", "all", logged == sent))
    if "streaming" in results:
        for key, label in (("raw", "raw client"), ("library", "cc50tw.client")):
            rate = results["streaming"][key]["frames_per_s"]
            rows.append((f"streaming ({label})", f"{rate:,.0f} frames/s", ">= 200,000 frames/s", rate >= 200_000))
    if "concurrency" in results:
        for run in results["concurrency"]["runs"]:
            s = run["settings"]
            rows.append(
                (
                    f"concurrency, {s['connections']} connections, {s['processes']} proc",
                    f"{run['requests']} done, {run['errors']} errors",
                    "all complete",
                    bool(run["all_completed"]),
                )
            )
    if "connections" in results:
        r = results["connections"]
        for key, label in (("kib_per_connection_idle", "idle"), ("kib_per_connection_after_one_request", "used")):
            rows.append((f"RSS per connection ({label})", f"{r[key]:.2f} KiB", "<= 16 KB", r[key] * 1024 <= 16_000))
    if "bridge" in results and "skipped" not in results["bridge"]:
        for level, figures in results["bridge"]["levels"].items():
            r = figures["ratio"]
            loss = (1 - r["tokens_per_s"]) * 100
            rows.append((f"bridge tokens/s loss, concurrency {level}", f"{loss:+.2f}%", "<= 1%", loss <= 1))
            delta = r["ttft_p50_delta_ms"]
            rows.append((f"bridge TTFT p50 added, concurrency {level}", f"{delta:+.2f} ms", "<= 1 ms", delta <= 1))
    if "bridge_floor" in results and "skipped" not in results["bridge_floor"]:
        r = results["bridge_floor"]
        for key, label in (("cpu_ratio", "CPU per token"), ("p50_ratio", "p50")):
            limit = BRIDGE_FLOOR_TARGETS[key]
            rows.append((f"bridge {label} / floor bridge", f"x{r[key]:.3f}", f"<= x{limit}", r[key] <= limit))
    return rows


# Command line ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="cc50tw's benchmark suite: each scenario prints a table; --json-dir keeps the figures.",
        epilog="scenarios: " + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()),
    )
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="which to run (default: all), by name")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--json-dir", type=Path, help="write SCENARIO.json (and summary.json) here")
    p.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="client processes for the concurrency scenario, each count run in turn (default: 1 2)",
    )
    g = p.add_argument_group("round_trip")
    g.add_argument("--rt-rounds", type=int, default=4, help="alternations of the two clients (default 4)")
    g.add_argument(
        "--rt-requests", type=int, default=1000, help="measured requests per client per round (default 1000)"
    )
    g.add_argument("--rt-warmup", type=int, default=100, help="unmeasured requests per client per round (default 100)")
    g = p.add_argument_group("round_trip_floor (requests and warm-up: --rt-requests, --rt-warmup)")
    g.add_argument(
        "--floor-rounds", type=int, default=5, help="rounds, each measuring every server once (default 5)"
    )
    g.add_argument(
        "--floor-baseline",
        metavar="TREE",
        help="also run the default and quiet servers from this checkout (e.g. `git archive HEAD` unpacked), "
        "as default@base and quiet@base",
    )
    g.add_argument(
        "--floor-no-pin",
        action="store_true",
        help="leave client and servers where the scheduler puts them (by default, with two CPUs or more, the "
        "client runs on one and the servers on another)",
    )
    g = p.add_argument_group("streaming")
    g.add_argument("--stream-tokens", type=int, default=1_000_000, help="tokens in the request (default 1000000)")
    g.add_argument("--stream-repeats", type=int, default=3, help="runs per client; the median is shown (default 3)")
    g = p.add_argument_group("concurrency")
    g.add_argument("--conc-requests", type=int, default=1000, help="requests, all in flight at once (default 1000)")
    g.add_argument("--conc-tokens", type=int, default=1000, help="tokens per request (default 1000)")
    g.add_argument(
        "--conc-connections", type=int, nargs="+", default=[100, 1000], help="connection counts (default: 100 1000)"
    )
    g = p.add_argument_group("connections")
    g.add_argument("--idle-connections", type=int, default=10_000, help="idle connections to hold (default 10000)")
    g = p.add_argument_group("bridge")
    g.add_argument(
        "--bridge-arg",
        action="append",
        default=[],
        help="passed to bench_llama_bridge.py (repeatable), e.g. --bridge-arg=--iterations=20",
    )
    g = p.add_argument_group("bridge_floor")
    g.add_argument(
        "--bridge-floor-rounds", type=int, default=20, help="rounds, each bridge measured once (default 20)"
    )
    g.add_argument(
        "--bridge-floor-requests", type=int, default=30, help="requests per bridge per round (default 30)"
    )
    g.add_argument("--bridge-floor-tokens", type=int, default=64, help="tokens per request (default 64)")
    g.add_argument(
        "--bridge-floor-baseline",
        metavar="TREE",
        help="also twistd cc50 from this checkout (e.g. `git archive HEAD` unpacked), as cc50tw@base",
    )
    g = p.add_argument_group("slow_reader")
    g.add_argument("--slow-requests", type=int, default=100, help="requests the slow client sends (default 100)")
    g.add_argument("--slow-tokens", type=int, default=100_000, help="tokens per request (default 100000)")
    g.add_argument("--slow-stall", type=float, default=5.0, help="seconds it reads nothing (default 5)")
    g = p.add_argument_group("client")
    g.add_argument("--client-tokens", type=int, default=1_000_000, help="chunk frames fed (default 1000000)")
    g.add_argument("--client-requests", type=int, default=100_000, help="requests (default 100000)")
    return p


def scenario_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "round_trip": {"rounds": args.rt_rounds, "requests": args.rt_requests, "warmup": args.rt_warmup},
        "round_trip_floor": {
            "rounds": args.floor_rounds,
            "requests": args.rt_requests,
            "warmup": args.rt_warmup,
            "baseline": args.floor_baseline,
            "pin": not args.floor_no_pin,
        },
        "streaming": {"tokens": args.stream_tokens, "repeats": args.stream_repeats},
        "concurrency": {
            "requests": args.conc_requests,
            "tokens": args.conc_tokens,
            "connections": args.conc_connections,
            "processes": args.processes,
        },
        "connections": {"count": args.idle_connections},
        "bridge": {"args": args.bridge_arg},
        "bridge_floor": {
            "rounds": args.bridge_floor_rounds,
            "requests": args.bridge_floor_requests,
            "max_tokens": args.bridge_floor_tokens,
            "baseline": args.bridge_floor_baseline,
        },
        "slow_reader": {"requests": args.slow_requests, "tokens": args.slow_tokens, "stall": args.slow_stall},
        "client": {"tokens": args.client_tokens, "requests": args.client_requests, "repeats": 5},
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:<12} {s.summary}")
        return 0
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser().error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    chosen = args.scenarios or list(SCENARIOS)
    options = scenario_options(args)
    machine = bench_core.machine()
    print(
        f"cc50tw benchmark suite: {machine['cpu']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"Twisted {machine['twisted']}; load average {os.getloadavg()[0]:.2f}"
    )
    if args.json_dir:
        args.json_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cc50-suite-") as temporary:
        for name in chosen:
            scenario = SCENARIOS[name]
            print(f"\n== {name}: {scenario.summary}", flush=True)
            directory = Path(temporary) / name
            directory.mkdir()
            began = time.perf_counter()
            try:
                result = call_in_process(scenario.run, options[name], directory)
            except Exception as e:  # one scenario failing must not lose the others' figures
                failed[name] = str(e)
                print(f"  FAILED: {e}", flush=True)
                continue
            result["scenario_seconds"] = time.perf_counter() - began
            results[name] = result
            for line in scenario.table(result):
                print(line)
            if args.json_dir:
                record = {"scenario": name, "date": datetime.date.today().isoformat(), "machine": machine}
                record["options"] = options[name]
                record["result"] = result
                (args.json_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
            sys.stdout.flush()
    rows = targets(results)
    if rows:
        print("\n== targets")
        width = max(len(row[0]) for row in rows)
        for figure, measured, target, met in rows:
            verdict = "" if met is None else ("met" if met else "MISSED")
            print(f"  {figure:<{width}}  {measured:>22}  {target:<22} {verdict}")
    if args.json_dir:
        summary = {
            "date": datetime.date.today().isoformat(),
            "machine": machine,
            "scenarios": chosen,
            "failed": failed,
            "targets": [{"figure": f, "measured": m, "target": t, "met": ok} for f, m, t, ok in rows],
        }
        (args.json_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {args.json_dir}/{{{','.join(results)},summary}}.json")
    return 1 if failed else 0
