"""
Soak: mixed traffic over many connections, with random cancels and
disconnects, for as long as you like; then check that nothing was lost and
that the server's open file descriptors and RSS came back to their baseline.

By default it starts its own ``twistd -n cc50 --toy-iters=0`` (loopback, a free
port) and drives it from this process with ``cc50tw.testing.soak_server``:
every request is checked by a ``TerminalFrameChecker`` (exactly one DONE or
ERR, nothing after it, chunk bytes = tokens x 6).  ``--server`` and ``--pid``
point it at a server that is already running instead (any CC50 server whose
backend answers with the toy's ``" token"``; see ``--bytes-per-token``).

    python benchmarks/soak.py --minutes 30
    python benchmarks/soak.py --minutes 5 --connections 1000 --json soak.json
    python benchmarks/soak.py --server tcp:127.0.0.1:9199 --pid 12345 --minutes 60

Exits 1 when anything failed (a lost request, an error nobody caused, a
connection the server closed, a protocol breach, or fds or RSS above their
baseline plus the tolerance).  ``tests/test_soak_real.py`` runs the same thing
for a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.helpers when run as a script

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from cc50tw.testing import SoakConfig, SoakReport, soak_failures, soak_server  # noqa: E402
from tests.helpers import cc50_server_command, start_server  # noqa: E402


def as_json(report: SoakReport, config: SoakConfig, failures: list[str]) -> dict[str, Any]:
    main = report.main
    return {
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "config": config.__dict__,
        "seconds": main.seconds,
        "requests": main.requests,
        "connections_opened": main.connections_opened,
        "actions": dict(main.actions),
        "outcomes": dict(main.outcomes),
        "cancels_sent": main.cancels_sent,
        "disconnects": main.disconnects,
        "lost": main.lost,
        "unexpected_errors": main.unexpected_errors,
        "unexpected_closes": main.unexpected_closes,
        "problems": main.problems[:50],
        "rss": {
            "cold": report.cold_rss,
            "baseline": report.baseline_rss,
            "peak": report.peak_rss,
            "final": report.final_rss,
        },
        "fds": {
            "cold": report.cold_fds,
            "baseline": report.baseline_fds,
            "peak": report.peak_fds,
            "final": report.final_fds,
        },
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="length of the soak, after the warm-up")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--think", type=float, default=2.0, help="mean seconds between one connection's actions")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up before the baseline")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--server", help="endpoint of a running server (default: start twistd cc50 here)")
    parser.add_argument("--pid", type=int, help="its process id, to read RSS and fds from /proc (with --server)")
    parser.add_argument("--bytes-per-token", type=int, default=6, help="wire size of one token (0: unknown)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.server and not args.pid:
        parser.error("--server needs --pid (the soak reads the server's RSS and fds from /proc)")
    config = SoakConfig(
        connections=args.connections,
        seconds=args.minutes * 60,
        seed=args.seed,
        think_seconds=args.think,
        bytes_per_token=args.bytes_per_token or None,
    )

    def go(reactor: Any) -> Deferred[None]:
        async def body() -> None:
            server = None
            endpoint, pid = args.server, args.pid
            if endpoint is None:
                log = Path(tempfile.mkdtemp(prefix="cc50-soak-")) / "server.log"
                server = start_server(lambda listen: cc50_server_command(listen, "--toy-iters=0"), log)
                endpoint, pid = server.endpoint, server.pid
                print(f"server: {' '.join(server.argv)} (pid {pid}, log {log})")
            try:
                report = await soak_server(reactor, endpoint, pid, config, warmup_seconds=args.warmup)
            finally:
                if server is not None:
                    server.stop(timeout=60)
            failures = soak_failures(report)
            if server is not None and server.log_problems():
                failures.append(f"errors in the server log: {server.log_problems()[:5]}")
            print("\n".join(report.lines()))
            print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures[:50]))
            if args.json:
                Path(args.json).write_text(json.dumps(as_json(report, config, failures), indent=2) + "\n")
            if failures:
                raise SystemExit(1)

        return Deferred.fromCoroutine(body())

    react(go)


if __name__ == "__main__":
    main()
