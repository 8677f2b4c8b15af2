"""
Issue 18(c) on the GPU machine: the CUDA toy backend's continuous batching
against the card's floor, in one run.

1. The floor (``floor_probe.py``, PyCUDA alone): the pipelined chain of one
   64-token request, and batched decode steps for 1 to 32 requests.
2. In-process, no sockets: the CUDA engine's decode steps driven through
   ``ToyBackend`` on this reactor, 1 and 16 concurrent requests.
3. End to end: ``twistd -n cc50 --backend=toy --toy-device=cuda
   --toy-iters=20000`` as a user runs it (default options, the request log
   on, to a file) with ``cc50tw.client`` as load: 1-token round trip p50;
   64-token request p50 (one client, sequential); tokens/s of one client and
   of 16 clients (16 connections from 4 client processes, so the load
   generator is not the limit; ``--client-processes``) with 256-token
   requests, with the share of the run each busy twistd thread ran and the
   clients' CPU per process.
4. The targets: the 64-token request p50 <= 1.5 x (the floor's pipelined
   chain + the 1-token round trip); 16 clients >= 8 x one client's tokens/s.

Writes ``batching.json`` and ``batching.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react

from benchmarks.gpu.bench_gpu import NullSink, Server, summary
from cc50tw.backends.cuda import CUDAEngine, probe_cuda
from cc50tw.backends.toy import ToyBackend
from cc50tw.interfaces import InferenceRequest

ITERS = 20000
#: Rounds of one client against sixteen (256-token requests) for the scaling ratio.
ROUNDS = 5
PROMPT = "hello from the batching benchmark"


def floor_in_child(iters: int, tokens: int) -> dict[str, Any]:
    """The floor in a child process: its CUDA context must not share this process's engine's."""
    import subprocess

    here = Path(__file__).resolve().parent
    child = subprocess.run(
        [sys.executable, str(here / "floor_probe.py"), "--iters", str(iters), "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if child.returncode != 0:
        raise RuntimeError(f"floor probe failed: {child.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(child.stdout)
    return result


async def in_process(reactor: Any, streams: int, tokens: int, requests: int) -> dict[str, Any]:
    """``requests`` rounds of ``streams`` concurrent toy requests through the engine, no sockets."""
    probe = probe_cuda()
    engine = CUDAEngine(reactor, device_name=probe.device_name)
    await engine.start()
    backend = ToyBackend(reactor, engine, ITERS)
    try:
        latencies = []
        started = time.perf_counter()
        for n in range(requests):
            began = time.perf_counter()
            await gatherResults(
                [backend.generate(InferenceRequest(n, PROMPT, tokens), NullSink()) for n in range(streams)]
            )
            latencies.append(time.perf_counter() - began)
        wall = time.perf_counter() - started
        return {
            "streams": streams,
            "tokens": tokens,
            "rounds": requests,
            "tokens_per_s": streams * tokens * requests / wall,
            "round_ms": summary(latencies, scale=1e3),
            "launches": engine.launches,
        }
    finally:
        await engine.stop()


def thread_run_times(pid: int) -> dict[str, float]:
    """
    Each thread's run time so far (s), by thread id and name, from
    /proc/PID/task/*/schedstat: which of twistd's threads (the reactor, the
    CUDA worker) is busy under a load; empty where the kernel has none.
    """
    times = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            name = (task / "comm").read_text().strip()
            times[f"{task.name} {name}"] = int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError):
        return {}
    return times


async def client_load(
    reactor: Any, server: Server, clients: int, requests: int, max_tokens: int, processes: int = 1
) -> dict[str, Any]:
    from cc50tw.bench import run_bench, run_bench_processes, shares

    threadsBefore = thread_run_times(server.process.pid)
    if processes == 1:
        result = await run_bench(
            reactor, server.address, PROMPT, max_tokens, requests, concurrency=clients, connections=clients
        )
    else:
        result = await run_bench_processes(
            reactor, shares(server.address, PROMPT, max_tokens, requests, clients, clients, processes)
        )
    tokens = sum(record.tokens for record in result.records)
    threadsAfter = thread_run_times(server.process.pid)
    busy = {
        thread: round((threadsAfter[thread] - before) / result.wall_s, 3)
        for thread, before in threadsBefore.items()
        if thread in threadsAfter and result.wall_s and threadsAfter[thread] > before
    }
    return {
        "clients": clients,
        "processes": processes,
        "requests": requests,
        "max_tokens": max_tokens,
        "completed": len(result.records),
        "errors": result.errors[:5],
        "error_count": len(result.errors),
        "tokens_per_s": tokens / result.wall_s if result.wall_s else None,
        "latency_ms": summary([record.latency_ms for record in result.records], scale=1.0),
        "ttft_ms": summary([record.ttft_ms for record in result.records], scale=1.0),
        # Share of the run's wall time each busy twistd thread ran, and the
        # clients' CPU per client process: which side is the limit.
        "server_thread_busy": busy,
        "client_cpu_per_process": round(result.cpu_s / result.wall_s / processes, 3) if result.wall_s else None,
    }


async def profiled(reactor: Any, server: Server, out: str, gil: bool = False) -> dict[str, Any]:
    """
    A longer 16-client run with py-spy sampling twistd meanwhile (raw folded
    stacks into ``out``, by thread): where the reactor's time goes under that
    load; with ``gil``, only samples of the thread holding the GIL, which
    is what the reactor and the CUDA worker contend for.
    """
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or "/tmp/cc50-site/bin/py-spy"
    command = [spy, "record", "--pid", str(server.process.pid), "--rate", "1000", "--nonblocking"]
    command += ["--format", "raw", "--duration", "3", "--threads", "-o", os.path.join(out, "twistd-pyspy.txt")]
    if gil:
        command.append("--gil")
    try:
        recorder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        return {"failed": f"py-spy: {e}"}
    run = await client_load(reactor, server, 16, 4000, 256, 4)
    try:
        output, _ = recorder.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        output, _ = recorder.communicate()
    run["py_spy"] = output.decode(errors="replace")[-500:]
    return run


async def end_to_end(
    reactor: Any,
    log_dir: str,
    quick: bool,
    profile_to: str | None = None,
    clientProcesses: int = 4,
    profileGil: bool = False,
) -> dict[str, Any]:
    # As a user runs it: default options, the request log on (to the log file).
    server = Server("cuda", ITERS, os.path.join(log_dir, "twistd-batching.log"), quiet=False)
    outcome: dict[str, Any] = {"command": " ".join(server.command[3:])}
    scale = 10 if quick else 1
    try:
        await server.ready(reactor)
        outcome["backend"] = server.backend_line()
        await client_load(reactor, server, 1, 20, 8)  # warm-up
        plan = [
            ("one_token", 1, 400 // scale, 1, 1),
            ("request_64", 1, 200 // scale, 64, 1),
            ("one_client_256", 1, 40 // scale, 256, 1),
            ("sixteen_clients_256", 16, 640 // scale, 256, clientProcesses),
            ("one_client_64", 1, 200 // scale, 64, 1),
            ("sixteen_clients_64", 16, 1600 // scale, 64, clientProcesses),
        ]
        for name, clients, requests, tokens, processes in plan:
            run = await client_load(reactor, server, clients, requests, tokens, processes)
            outcome[name] = run
            print(
                f"  {name}: {run['tokens_per_s']:.0f} tokens/s, request p50 {run['latency_ms'].get('p50', 0):.3f} ms, "
                f"TTFT p50 {run['ttft_ms'].get('p50', 0):.3f} ms, errors {run['error_count']}, "
                f"twistd threads busy {sorted(run['server_thread_busy'].values(), reverse=True)[:3]}, "
                f"client CPU/process {run['client_cpu_per_process']}",
                flush=True,
            )
        # The scaling ratio moves from run to run on a shared host: more
        # rounds, alternating, and the median of the per-round ratios.
        ratios = [outcome["sixteen_clients_256"]["tokens_per_s"] / outcome["one_client_256"]["tokens_per_s"]]
        for _ in range(ROUNDS - 1):
            one = await client_load(reactor, server, 1, 40 // scale, 256, 1)
            many = await client_load(reactor, server, 16, 640 // scale, 256, clientProcesses)
            ratios.append(many["tokens_per_s"] / one["tokens_per_s"])
            print(
                f"  round: {many['tokens_per_s']:.0f} / {one['tokens_per_s']:.0f} = x{ratios[-1]:.2f}; "
                f"twistd threads busy {sorted(many['server_thread_busy'].values(), reverse=True)[:3]}, "
                f"client CPU/process {many['client_cpu_per_process']}",
                flush=True,
            )
        outcome["scaling_rounds_256"] = ratios
        if profile_to is not None:
            outcome["profiled"] = await profiled(reactor, server, profile_to, profileGil)
            print(f"  profiled: {outcome['profiled'].get('tokens_per_s')} tokens/s", flush=True)
    except Exception as e:
        outcome["failed"] = f"{type(e).__name__}: {e}"
        print(f"  end to end FAILED: {outcome['failed']}", flush=True)
    finally:
        outcome["exit_status"] = server.stop()
        outcome["log_tail"] = server.log()[-1500:]
    return outcome


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    rows = []
    e2e, floor = results.get("end_to_end", {}), results.get("floor", {})
    if "request_64" in e2e and "chain_pipelined_ms" in floor:
        p50 = e2e["request_64"]["latency_ms"]["p50"]
        bound = floor["chain_pipelined_ms"] + e2e["one_token"]["latency_ms"]["p50"]
        rows.append(
            (
                "64-token request p50 / (pipelined chain + 1-token round trip)",
                f"{p50:.2f} ms / ({floor['chain_pipelined_ms']:.2f} + {e2e['one_token']['latency_ms']['p50']:.2f}) ms"
                f" = x{p50 / bound:.2f}",
                "<= x1.5",
                p50 <= 1.5 * bound,
            )
        )
    rounds = e2e.get("scaling_rounds_256")
    if rounds:
        r = statistics.median(rounds)
        rows.append(
            (
                f"16 clients / 1 client tokens/s, 256-token requests, median of {len(rounds)} rounds",
                f"x{r:.2f} (rounds: {', '.join(f'x{x:.2f}' for x in rounds)})",
                ">= x8",
                r >= 8,
            )
        )
    for tokens in (256, 64):
        one, many = e2e.get(f"one_client_{tokens}"), e2e.get(f"sixteen_clients_{tokens}")
        if one and many and one["tokens_per_s"] and many["tokens_per_s"]:
            r = many["tokens_per_s"] / one["tokens_per_s"]
            rows.append(
                (
                    f"16 clients / 1 client tokens/s ({tokens}-token requests)",
                    f"{many['tokens_per_s']:.0f} / {one['tokens_per_s']:.0f} = x{r:.1f}",
                    ">= x8",
                    r >= 8,
                )
            )
    return rows


def markdown(results: dict[str, Any]) -> str:
    floor = results.get("floor", {})
    lines = [
        f"Card: {results.get('card')}; {results['python']}; {results.get('cpus')} CPUs; date {results['date']}",
        "",
        "| target | figure | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, figure, goal, met in targets(results):
        lines.append(f"| {name} | {figure} | {goal} | {'met' if met else 'MISSED'} |")
    lines += ["", f"Floor (PyCUDA alone, step_kernel, {floor.get('iters')} iterations):", ""]
    if floor:
        lines.append(
            f"- one {floor['tokens']}-token chain: launch + wait per token {floor['chain_sync_ms']:.2f} ms; "
            f"pipelined {floor['lookahead']} ahead {floor['chain_pipelined_ms']:.2f} ms "
            f"(matches the CPU reference: {floor['chain_matches_cpu']})"
        )
        lines.append(
            "- a stream per request, a launch per token: "
            + ", ".join(f"{n} requests {v:,.0f} tokens/s" for n, v in floor["streams_tokens_per_s"].items())
        )
        lines.append(
            "- one launch per decode step: "
            + ", ".join(f"{n} requests {v:,.0f} tokens/s" for n, v in floor["batched_tokens_per_s"].items())
        )
    lines += ["", "In-process through ToyBackend and the CUDA engine, no sockets:", ""]
    for run in results.get("in_process", []):
        lines.append(
            f"- {run['streams']} request(s) of {run['tokens']} tokens at once: {run['tokens_per_s']:,.0f} tokens/s, "
            f"round p50 {run['round_ms'].get('p50', 0):.2f} ms"
        )
    e2e = results.get("end_to_end", {})
    lines += [
        "",
        f"End to end: `{e2e.get('command', '')}`, cc50tw.client as load:",
        "",
        "| run | clients | client processes | max_tokens | requests | tokens/s | request p50 ms | p99 ms | TTFT p50 ms "
        "| errors | twistd threads busy | client CPU / process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, run in e2e.items():
        if isinstance(run, dict) and "latency_ms" in run and name != "profiled":  # (rounds: see the targets)
            lat = run["latency_ms"]
            lines.append(
                f"| {name} | {run['clients']} | {run['processes']} | {run['max_tokens']} | {run['completed']} | "
                f"{run['tokens_per_s']:,.0f} | {lat.get('p50', 0):.3f} | {lat.get('p99', 0):.3f} | "
                f"{run['ttft_ms'].get('p50', 0):.3f} | {run['error_count']} | "
                f"{', '.join(f'{busy:.2f}' for busy in sorted(run.get('server_thread_busy', {}).values(), reverse=True)[:2])} | "
                f"{run.get('client_cpu_per_process') or ''} |"
            )
    if "failed" in e2e:
        lines.append(f"\nEnd to end failed: {e2e['failed']}")
    lines.append(f"\nBackend: {e2e.get('backend', '')}")
    return "\n".join(lines) + "\n"


async def main(reactor: Any, args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": f"Python {platform.python_version()}",
        "cpus": os.cpu_count(),
    }
    probe = probe_cuda()
    if not probe.available:
        raise SystemExit(f"CUDA required but unavailable: {probe.reason}")
    results["card"] = probe.device_name

    def save() -> None:
        with open(os.path.join(args.out, "batching.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)

    print("floor ...", flush=True)
    results["floor"] = floor_in_child(ITERS, 64)
    print(json.dumps(results["floor"], indent=1), flush=True)
    save()
    print("in process ...", flush=True)
    rounds = 5 if args.quick else 50
    results["in_process"] = [
        await in_process(reactor, 1, 64, rounds),
        await in_process(reactor, 16, 256, max(2, rounds // 5)),
    ]
    print(json.dumps(results["in_process"], indent=1), flush=True)
    save()
    print("end to end ...", flush=True)
    results["end_to_end"] = await end_to_end(
        reactor,
        args.log_dir,
        args.quick,
        args.out if args.profile or args.profile_gil else None,
        args.client_processes,
        args.profile_gil,
    )
    results["targets"] = targets(results)
    save()
    report = markdown(results)
    with open(os.path.join(args.out, "batching.md"), "w", encoding="utf-8") as f:
        f.write(report)
    print(report, flush=True)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    parser.add_argument("--log-dir", default="/tmp", help="where the twistd log goes")
    parser.add_argument("--quick", action="store_true", help="few samples: to check the script, not to measure")
    parser.add_argument("--profile", action="store_true", help="also a 16-client run under py-spy (twistd-pyspy.txt)")
    parser.add_argument("--profile-gil", action="store_true", help="--profile, sampling only the GIL's holder")
    parser.add_argument(
        "--client-processes", type=int, default=4, help="processes the 16 clients' connections are spread over"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
