"""
Benchmark of the toy backend's CUDA engine against its CPU fallback (issue 9).

Measures, on whatever machine it runs on (the GPU parts are skipped, with the
probe's reason, where CUDA is unavailable):

* raw kernel: ``spin_kernel`` launch + synchronous copy-back on the calling
  thread, the figure the C++ original and the issue quote;
* engine round trip ("kernel + completion observation"): from ``spin()`` on
  the reactor thread to its Deferred firing there, for the CUDA engine and
  the CPU fallback, at 0, 20,000 and 200,000 iterations;
* reactor tick jitter while one 10,000-token request runs in-process;
* end to end through a real ``twistd -n cc50`` subprocess, with the project's
  client library: request latency, and tokens/s for 1 and 16 concurrent
  clients (one connection each).

Writes ``results.json`` and ``results.md`` into ``--out``.  Run it through
``benchmarks/gpu/run_on_gpu.sh`` on the GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall, deferLater, react
from zope.interface import implementer

from cc50tw.backends.batching import FRESH
from cc50tw.backends.cuda import CUDAEngine, CUDAProbe, _StepDevice, probe_cuda
from cc50tw.backends.lcg import CPUEngine, spin_lane
from cc50tw.backends.toy import BatchingEngine, ToyBackend, ToyEngine
from cc50tw.interfaces import InferenceRequest, ITokenSink

ITERS = (0, 20000, 200000)

#: Samples per (engine, iters).  The CPU fallback is pure Python (about
#: 0.2 µs per iteration), so its slow settings get fewer samples.
GPU_SAMPLES = {0: 3000, 20000: 3000, 200000: 2000}
CPU_SAMPLES = {0: 3000, 20000: 300, 200000: 40}

TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: The same, with TCP_NODELAY set on every server connection.  Without it the
#: server's per-token frames meet Nagle's algorithm and the client's delayed
#: ACK, and a request takes about 40 ms whatever its work: the bench runs
#: both so the figures show what the server does and what it could do.
TWISTD_NODELAY = (
    "from cc50tw.server import CC50ServerProtocol as P\n"
    "made = P.connectionMade\n"
    "def connectionMade(self):\n"
    "    self.transport.setTcpNoDelay(True)\n"
    "    made(self)\n"
    "P.connectionMade = connectionMade\n" + TWISTD
)


def summary(seconds: Sequence[float], scale: float = 1e6) -> dict[str, float]:
    """Nearest-rank percentiles (values that were observed), in µs by default."""
    ordered = sorted(value * scale for value in seconds)
    if not ordered:
        return {"samples": 0}

    def rank(percent: float) -> float:
        return ordered[min(len(ordered), max(1, math.ceil(percent / 100 * len(ordered)))) - 1]

    return {
        "samples": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": rank(50),
        "p99": rank(99),
        "min": ordered[0],
        "max": ordered[-1],
    }


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@implementer(ITokenSink)
class NullSink:
    """Swallows tokens; the in-process jitter run measures the reactor, not a socket."""

    def __init__(self) -> None:
        self.tokens = 0

    def write(self, text: str) -> None:
        self.tokens += 1

    def writeSequence(self, texts: Any) -> None:
        self.tokens += len(texts)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


# In-process measurements -------------------------------------------------------


def raw_kernel(grid: int, block: int, quick: bool) -> dict[str, Any]:
    """One decode step of one request, launch + wait on this thread, without the reactor."""
    device = _StepDevice(0, grid, block, 2, 1)
    try:
        results: dict[str, Any] = {}
        for iters in ITERS:
            samples = 200 if quick else GPU_SAMPLES[iters]
            for _ in range(50):
                device.launchStep(0, iters, [FRESH])
                device.waitStep(0)
            times = []
            value = -1
            for _ in range(samples):
                started = time.perf_counter()
                device.launchStep(0, iters, [FRESH])
                device.waitStep(0)
                value = device.stepResults(0, 1)[0]
                times.append(time.perf_counter() - started)
            results[str(iters)] = summary(times) | {"value": value, "matches_cpu": value == spin_lane(iters)}
        return results
    finally:
        device.close()


class OneValue(Protocol):
    """Either engine, asked for one token's value at a time."""

    def spin(self, iters: int) -> Deferred[int]: ...


async def engine_round_trip(engine: OneValue, samples: dict[int, int], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for iters in ITERS:
        count = min(samples[iters], 100) if quick else samples[iters]
        for _ in range(min(50, count)):
            await engine.spin(iters)
        times = []
        value = -1
        for _ in range(count):
            started = time.perf_counter()
            value = await engine.spin(iters)
            times.append(time.perf_counter() - started)
        results[str(iters)] = summary(times) | {"value": value, "matches_cpu": value == spin_lane(iters)}
    return results


async def reactor_jitter(reactor: Any, engine: ToyEngine | BatchingEngine, tokens: int, iters: int) -> dict[str, Any]:
    """LoopingCall ticks every 10 ms while one request runs; how late do they come?"""
    ticks: list[float] = []
    loop = LoopingCall(lambda: ticks.append(time.perf_counter()))
    loop.start(0.01)
    backend = ToyBackend(reactor, engine, iters)
    sink = NullSink()
    started = time.perf_counter()
    try:
        result = await backend.generate(InferenceRequest(1, "jitter", tokens), sink)
    finally:
        loop.stop()
    wall = time.perf_counter() - started
    gaps = [later - earlier for earlier, later in pairwise(ticks)]
    late = summary([max(0.0, gap - 0.01) for gap in gaps], scale=1e3)
    return {
        "tokens": result.generated_tokens,
        "iters": iters,
        "wall_s": wall,
        "tokens_per_s": result.generated_tokens / wall,
        "ticks": len(ticks),
        "max_gap_ms": max(gaps) * 1e3 if gaps else None,
        "lateness_ms": late,
    }


async def concurrent_streams(reactor: Any, engine: ToyEngine | BatchingEngine, streams: int, tokens: int, iters: int) -> dict[str, Any]:
    """Tokens/s of many toy streams at once in this process: the engine's ceiling, no sockets."""
    backend = ToyBackend(reactor, engine, iters)
    started = time.perf_counter()
    results = await gatherResults(
        [backend.generate(InferenceRequest(n, "streams", tokens), NullSink()) for n in range(streams)]
    )
    wall = time.perf_counter() - started
    total = sum(result.generated_tokens for result in results)
    return {"streams": streams, "tokens": total, "iters": iters, "wall_s": wall, "tokens_per_s": total / wall}


# End to end through twistd -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``twistd -n cc50`` subprocess with the toy backend."""

    def __init__(self, device: str, iters: int, log_path: str, nodelay: bool = False, quiet: bool = True) -> None:
        from cc50tw.tap import Options

        self.port = free_port()
        self.log_path = log_path
        command = [
            sys.executable,
            "-c",
            TWISTD_NODELAY if nodelay else TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={log_path}",
            "cc50",
            "--backend=toy",
            f"--toy-device={device}",
            f"--toy-iters={iters}",
            f"--listen=tcp:{self.port}:interface=127.0.0.1",
        ]
        if quiet and "quiet-requests" in Options():
            command.append("--quiet-requests")
        self.command = command
        for stale in (log_path, log_path + ".out"):
            if os.path.exists(stale):
                os.remove(stale)
        # What twistd prints before its log starts (an import error, say) goes here.
        with open(log_path + ".out", "wb") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def log(self) -> str:
        text = ""
        for path in (self.log_path + ".out", self.log_path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text += f.read()
            except OSError:
                pass
        return text

    async def ready(self, reactor: Any, timeout: float = 120.0) -> None:
        from cc50tw.client import connect

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                client = await connect(reactor, self.address)
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"twistd did not listen within {timeout}s:\n{self.log()[-3000:]}") from None
                await sleep(reactor, 0.1)
            else:
                await client.close()
                return

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def backend_line(self) -> str:
        lines = [line for line in self.log().splitlines() if "cc50 backend:" in line or "toy backend:" in line]
        return " | ".join(line.split("] ", 1)[-1] for line in lines)


async def load(reactor: Any, server: Server, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    from cc50tw.bench import run_bench

    result = await run_bench(
        reactor,
        server.address,
        "hello from the GPU benchmark",
        max_tokens,
        requests,
        concurrency=clients,
        connections=clients,
    )
    tokens = sum(record.tokens for record in result.records)
    latency = summary([record.latency_ms for record in result.records], scale=1.0)
    ttft = summary([record.ttft_ms for record in result.records], scale=1.0)
    return {
        "clients": clients,
        "requests": requests,
        "max_tokens": max_tokens,
        "completed": len(result.records),
        "errors": result.errors[:5],
        "error_count": len(result.errors),
        "tokens": tokens,
        "wall_s": result.wall_s,
        "tokens_per_s": tokens / result.wall_s if result.wall_s else None,
        "latency_ms": latency,
        "ttft_ms": ttft,
    }


async def end_to_end(
    reactor: Any, device: str, iters: int, nodelay: bool, plan: dict[str, Any], log_dir: str
) -> dict[str, Any]:
    label = f"{device}-{iters}{'-nodelay' if nodelay else ''}"
    server = Server(device, iters, os.path.join(log_dir, f"twistd-{label}.log"), nodelay)
    outcome: dict[str, Any] = {
        "device": device,
        "iters": iters,
        "nodelay_patch": nodelay,
        "command": " ".join(server.command[3:]),
    }
    try:
        await server.ready(reactor)
        outcome["backend"] = server.backend_line()
        await load(reactor, server, 1, 3, 8)  # warm-up: connections, the worker, the kernel
        runs = []
        for clients, requests, max_tokens in plan["runs"]:
            run = await load(reactor, server, clients, requests, max_tokens)
            print(
                f"  {label} clients={clients} max_tokens={max_tokens}: "
                f"{run['tokens_per_s']:.0f} tokens/s, request p50 {run['latency_ms'].get('p50', float('nan')):.3f} ms, "
                f"errors {run['error_count']}",
                flush=True,
            )
            runs.append(run)
        outcome["runs"] = runs
    except Exception as e:
        outcome["failed"] = f"{type(e).__name__}: {e}"
        print(f"  {label}: FAILED {outcome['failed']}", flush=True)
    finally:
        outcome["exit_status"] = server.stop()
        outcome["log_tail"] = server.log()[-1500:]
    return outcome


def plan_for(device: str, iters: int, quick: bool) -> dict[str, Any]:
    """(clients, requests in all, max_tokens) per run, sized to a few seconds each."""
    if quick:
        return {"runs": [(1, 4, 16), (1, 4, 64), (16, 32, 16)]}
    if device == "cpu" and iters > 0:
        return {"runs": [(1, 20, 1), (1, 5, 64), (1, 4, 256), (16, 32, 64)]}
    return {"runs": [(1, 200, 1), (1, 100, 64), (1, 30, 256), (16, 320, 256)]}


# Report ------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Card: {results.get('card')}; driver {results.get('driver')}; {results.get('python')}; "
        f"pycuda {results.get('pycuda')}; date {results['date']}",
        "",
    ]
    if "raw_kernel" in results:
        lines += [
            "One decode step of one request (step_kernel <<<8, 256>>>), launch + wait on one thread (µs):",
            "",
            "| iters | p50 | p99 | mean | matches CPU |",
            "| ---: | ---: | ---: | ---: | :---: |",
        ]
        for iters, s in results["raw_kernel"].items():
            lines.append(f"| {iters} | {s['p50']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} | {s['matches_cpu']} |")
        lines.append("")
    lines += [
        "Per token through the engine: spin() on the reactor thread until its Deferred fires there (µs):",
        "",
        "| engine | iters | p50 | p99 | mean | samples |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("cuda_engine", "cpu_engine"):
        for iters, s in results.get(name, {}).items():
            lines.append(
                f"| {name.split('_')[0]} | {iters} | {s['p50']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} | {s['samples']} |"
            )
    lines.append("")
    for name in ("cuda_jitter", "cpu_jitter"):
        j = results.get(name)
        if j:
            lines.append(
                f"Reactor during one {j['tokens']}-token request ({name.split('_')[0]}, {j['iters']} iters): "
                f"{j['tokens_per_s']:.0f} tokens/s in-process; 10 ms LoopingCall max gap {j['max_gap_ms']:.2f} ms, "
                f"lateness p99 {j['lateness_ms'].get('p99', float('nan')):.2f} ms over {j['ticks']} ticks."
            )
    for run in results.get("cuda_streams", []):
        lines.append(
            f"In-process, no sockets: {run['streams']} CUDA toy stream(s) at {run['iters']} iters: "
            f"{run['tokens_per_s']:.0f} tokens/s ({run['tokens']} tokens)."
        )
    lines += [
        "",
        "End to end through `twistd -n cc50 --backend=toy` and cc50tw.client (one connection per client):",
        "",
        "| device | iters | TCP_NODELAY | clients | max_tokens | requests | tokens/s | request p50 ms | p99 ms "
        "| TTFT p50 ms | errors |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for outcome in results.get("end_to_end", []):
        if "failed" in outcome:
            lines.append(f"| {outcome['device']} | {outcome['iters']} | failed: {outcome['failed'][:120]} |")
            continue
        for run in outcome["runs"]:
            lat = run["latency_ms"]
            nodelay = "patched on" if outcome["nodelay_patch"] else "as is"
            lines.append(
                f"| {outcome['device']} | {outcome['iters']} | {nodelay} | {run['clients']} | {run['max_tokens']} | "
                f"{run['completed']} | {run['tokens_per_s']:.0f} | {lat.get('p50', float('nan')):.3f} | "
                f"{lat.get('p99', float('nan')):.3f} | {run['ttft_ms'].get('p50', float('nan')):.3f} | "
                f"{run['error_count']} |"
            )
    lines.append("")
    for outcome in results.get("end_to_end", []):
        lines.append(
            f"- {outcome['device']}/{outcome['iters']}/nodelay={outcome['nodelay_patch']}: {outcome.get('backend', '')}"
        )
    return "\n".join(lines) + "\n"


async def main(reactor: Any, args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": f"Python {platform.python_version()}",
        "host": platform.node(),
    }
    probe: CUDAProbe = probe_cuda(args.grid, args.block)
    results["probe"] = {"reason": probe.reason, "device": probe.device_name}
    print(f"probe: {results['probe']}", flush=True)
    if args.require_cuda and not probe.available:
        raise SystemExit(f"CUDA required but unavailable: {probe.reason}")

    if probe.available:
        import pycuda
        import pycuda.driver as cuda

        results["card"] = probe.device_name
        results["pycuda"] = pycuda.VERSION_TEXT
        cuda.init()
        version = cuda.get_driver_version()
        results["driver"] = f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
        print("raw kernel ...", flush=True)
        results["raw_kernel"] = raw_kernel(args.grid, args.block, args.quick)
        print(json.dumps(results["raw_kernel"], indent=1), flush=True)

        engine = CUDAEngine(reactor, args.grid, args.block, probe.device_name)
        await engine.start()
        try:
            print("CUDA engine round trip ...", flush=True)
            results["cuda_engine"] = await engine_round_trip(engine, GPU_SAMPLES, args.quick)
            print(json.dumps(results["cuda_engine"], indent=1), flush=True)
            results["cuda_jitter"] = await reactor_jitter(reactor, engine, 2000 if args.quick else 10000, 20000)
            print(json.dumps(results["cuda_jitter"], indent=1), flush=True)
            results["cuda_streams"] = [
                await concurrent_streams(reactor, engine, streams, 500 if args.quick else 2000, iters)
                for iters in (20000, 0)
                for streams in (1, 16)
            ]
            print(json.dumps(results["cuda_streams"], indent=1), flush=True)
        finally:
            await engine.stop()
    else:
        results["card"] = f"none ({probe.reason})"

    cpu = CPUEngine(reactor, reactor.getThreadPool())
    print("CPU engine round trip ...", flush=True)
    results["cpu_engine"] = await engine_round_trip(cpu, CPU_SAMPLES, args.quick)
    print(json.dumps(results["cpu_engine"], indent=1), flush=True)
    results["cpu_jitter"] = await reactor_jitter(reactor, cpu, 200 if args.quick else 1000, 20000)
    print(json.dumps(results["cpu_jitter"], indent=1), flush=True)

    devices = ["cuda", "cpu"] if probe.available else ["cpu"]
    # The server sets TCP_NODELAY itself now; the patched variant is kept for older trees.
    configs = [(device, iters, False) for device in devices for iters in (20000, 0)]
    results["end_to_end"] = []
    for device, iters, nodelay in configs:
        print(f"end to end: {device} iters={iters} nodelay patch={nodelay} ...", flush=True)
        results["end_to_end"].append(
            await end_to_end(reactor, device, iters, nodelay, plan_for(device, iters, args.quick), args.log_dir)
        )
        # Write as we go: a run cut off by its time limit still leaves figures.
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)

    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    failed = [o for o in results["end_to_end"] if "failed" in o]
    report = markdown(results)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(report)
    print(report, flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} end-to-end configurations failed")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    parser.add_argument("--log-dir", default="/tmp", help="where the twistd logs go")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="few samples: to check the script, not to measure")
    parser.add_argument("--require-cuda", action="store_true", help="fail at once where CUDA is unavailable")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
