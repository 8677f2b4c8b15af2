"""
One host, many cores: 1 versus 2 ``twistd cc50`` instances behind HAProxy
(issue 17), the toy backend at saturation.

HAProxy runs the shipped ``examples/haproxy/haproxy.cfg`` both times, with
its two ``server`` lines: for one instance both lines name the same
instance, so the balancer's path is identical and only the number of
instances (processes, reactors, cores) changes.  The load is ``cc50 bench``
with ``--processes`` client processes and many connections, so leastconn
spreads them; the figure is tokens per second at the client, and the
scaling ratio is two instances' over one's.  Each instance's CPU seconds
show whether it was the limit (a whole core each is saturation).

On a machine with few cores the client, HAProxy and the instances share
them, so the ratio is well under 2: say how many cores when quoting it.

    python benchmarks/bench_haproxy.py [--tokens 256] [--iters 2000] [--connections 32] [--processes 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.haproxy_support import find_haproxy, haproxy_for, new_instance, start_instance
from tests.helpers import cc50_command


def run(count: int, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    binary, missing = find_haproxy()
    if binary is None:
        raise SystemExit(f"bench_haproxy: {missing}")
    instances = [new_instance() for _ in range(count)]
    servers = [
        start_instance(
            instance, directory / f"cc50-{count}-{index}.log", f"--toy-iters={args.toy_iters}", "--quiet-requests"
        )
        for index, instance in enumerate(instances)
    ]
    haproxy = haproxy_for(binary, instances, directory)
    haproxy.log_path = directory / f"haproxy-{count}.log"
    haproxy.stats_socket = directory / f"haproxy-{count}.sock"
    haproxy.environment["CC50_HAPROXY_STATS"] = str(haproxy.stats_socket)
    try:
        haproxy.start()
        haproxy.wait_for({"cc50-a": "UP", "cc50-b": "UP"})
        cpu = [server.cpu_seconds() for server in servers]
        command = cc50_command(
            "bench",
            f"--server={haproxy.endpoint}",
            "--prompt=hi",
            f"--max-tokens={args.tokens}",
            f"--iters={args.iters}",
            f"--concurrency={args.connections * 4}",
            f"--connections={args.connections}",
            f"--processes={args.processes}",
            "--json",
        )
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"cc50 bench failed ({done.returncode}): {done.stderr.strip()}")
        report = json.loads(done.stdout)
        wall = time.monotonic() - started
        used = [server.cpu_seconds() - before for server, before in zip(servers, cpu)]
    finally:
        if haproxy.process is not None:
            haproxy.stop()
        for server in servers:
            server.stop()
    return {
        "instances": count,
        "tokens_per_s": report["tokens_per_s"],
        "requests_per_s": report["requests_per_s"],
        "errors": report["errors"],
        "latency_p50_ms": report["latency_ms"]["p50"],
        "latency_p99_ms": report["latency_ms"]["p99"],
        "wall_s": report["wall_s"],
        "instance_cpu_share": [round(seconds / report["wall_s"], 2) for seconds in used],
        "client_cpu_share": report["client_cpu_share"],
        "run_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--iters", type=int, default=2000, help="requests per run")
    parser.add_argument("--connections", type=int, default=32, help="client connections (4 requests in flight each)")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--toy-iters", type=int, default=200, help="the toy backend's LCG steps per token: its CPU work")
    parser.add_argument("--json", metavar="PATH", help="write the figures here too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-") as name:
        directory = Path(name)
        one = run(1, args, directory)
        two = run(2, args, directory)
    ratio = two["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else 0.0
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}")
    print(f"{'instances':>9} {'tokens/s':>10} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  instance CPU share")
    for row in (one, two):
        print(
            f"{row['instances']:>9} {row['tokens_per_s']:>10.0f} {row['requests_per_s']:>11.1f} "
            f"{row['latency_p50_ms']:>8.1f} {row['latency_p99_ms']:>8.1f} {row['errors']:>6}  {row['instance_cpu_share']}"
        )
    print(f"scaling ratio (2 instances / 1): {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine, "settings": vars(args), "runs": [one, two], "ratio": ratio}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
