"""
The ``cc50`` command: ``infer`` streams one answer, ``bench`` measures.

Flags follow the C++ CC50 client (``--server=HOST:PORT --prompt=...
--max-tokens=N --iters=N --print=1``) and bench ends with its summary line,
so existing scripts keep working.  Beyond them, bench takes ``--processes N``
(load from several client processes, merged), ``--json [PATH]`` (every
figure, for machines), ``--plot PNG`` (matplotlib, optional) and shows a
progress bar (tqdm, optional) when standard error is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import react

from cc50tw.bench import PlotUnavailable
from cc50tw.errors import ClientError
from cc50tw.stats import describe

DEFAULT_SERVER = "tcp:127.0.0.1:9199"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cc50", description="CC50 client: stream answers and benchmark servers.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--server", default=DEFAULT_SERVER, help="endpoint (tcp:HOST:PORT, unix:PATH) or HOST:PORT")
        sub.add_argument("--prompt", default="Hello", help="prompt text")
        sub.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0 = server default)")
        sub.add_argument("--credit-bytes", type=int, default=0, help="initial credit window (0 = 262144)")
        sub.add_argument("--auth-token-file", help="file holding the server's shared token (sent in HELLO)")

    commands.add_parser(
        "make-test-model", help="write a tiny random-weight GGUF model for llama-server (cc50 make-test-model --help)"
    )
    infer = commands.add_parser("infer", help="stream one answer to stdout")
    common(infer)

    bench = commands.add_parser("bench", help="measure latency, TTFT and tokens/s")
    common(bench)
    bench.add_argument("--iters", type=int, default=100, help="requests to send")
    bench.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    bench.add_argument("--connections", type=int, default=1, help="connections to spread them over")
    bench.add_argument("--print", type=int, default=0, dest="print_count", help="print the text of the first N answers")
    bench.add_argument(
        "--metrics-url", help="the server's /metrics URL: print its own TTFT for this run beside the client's"
    )
    bench.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="spread connections and workers over N client processes, for loads one process cannot generate",
    )
    bench.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="every figure as JSON: alone, on stdout instead of the text; with PATH, to that file as well",
    )
    bench.add_argument("--plot", metavar="PNG", help="draw latency and TTFT distributions here (needs matplotlib)")
    bench.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal anyway)"
    )
    return parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _token(args: argparse.Namespace) -> bytes | None:
    if not args.auth_token_file:
        return None
    with open(args.auth_token_file, "rb") as tokenFile:
        return tokenFile.read().strip()


async def _infer(reactor: Any, args: argparse.Namespace) -> int:
    from cc50tw.client import connect

    client = await connect(reactor, args.server, _token(args))
    response = client.infer(args.prompt, args.max_tokens, args.credit_bytes)
    try:
        async for text in response:
            sys.stdout.write(text)
            sys.stdout.flush()
        stats = await response.done
    except ClientError as e:
        sys.stdout.write("\n")
        sys.stderr.write(f"cc50: error {e.code.name} ({e.raw_code}): {e.message}\n")
        return 1
    finally:
        await client.close()
    sys.stdout.write("\n")
    sys.stderr.write(
        f"tokens={stats.tokens} prompt_tokens={stats.prompt_tokens} elapsed_us={stats.elapsed_us} "
        f"ttft_us={stats.ttft_us}\n"
    )
    return 0


async def _bench(reactor: Any, args: argparse.Namespace) -> int:
    from cc50tw.bench import (
        bench_report,
        check_plotting,
        make_progress,
        plot_latency,
        run_bench,
        run_bench_processes,
        shares,
    )
    from cc50tw.scrape import parse_histogram, scrape

    if args.plot:
        check_plotting()
    bench_shares = shares(
        args.server,
        args.prompt,
        args.max_tokens,
        args.iters,
        args.concurrency,
        args.connections,
        args.processes,
        args.print_count,
        args.credit_bytes,
        _token(args),
    )
    TTFT = "cc50_time_to_first_token_seconds"
    before = parse_histogram(await scrape(args.metrics_url), TTFT) if args.metrics_url else None
    progress = make_progress(args.iters, sys.stderr, enabled=not args.no_progress)
    try:
        if args.processes > 1:
            result = await run_bench_processes(reactor, bench_shares, progress.update_to if progress.shown else None)
        else:
            [share] = bench_shares
            result = await run_bench(reactor, *share, progress=progress.advance if progress.shown else None)
    finally:
        progress.close()
    settings = {
        "server": args.server,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "iters": args.iters,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "processes": args.processes,
        "credit_bytes": args.credit_bytes,
    }
    report = bench_report(result, settings)
    if before is not None:
        server = parse_histogram(await scrape(args.metrics_url), TTFT).since(before)
        report["server_ttft_ms"] = {
            "source": args.metrics_url,
            "requests": server.observations,
            "mean": server.mean * 1e3,
            "p50_estimate": server.quantile(0.5) * 1e3,
            "p99_estimate": server.quantile(0.99) * 1e3,
        }
    if args.plot:
        plot_latency(args.plot, report)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=2)
                out.write("\n")
        _print_report(report)
    for error in result.errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    return 1 if result.errors else 0


def _print_report(report: dict[str, Any]) -> None:
    """The text output; its last line is the C++ client's summary line, which scripts diff."""
    settings = report["settings"]
    for text in report["texts"]:
        print(text)
    processes = f" processes={report['processes']}" if report["processes"] > 1 else ""
    print(
        f"requests={report['requests']} errors={report['errors']} concurrency={settings['concurrency']} "
        f"connections={settings['connections']}{processes} wall_s={report['wall_s']:.3f}"
    )
    print(describe("latency", report["samples"]["latency_ms"]))
    print(describe("ttft", report["samples"]["ttft_ms"]))
    server = report.get("server_ttft_ms")
    if server is not None:
        print(
            f"server_ttft mean={server['mean']:.3f} p50~{server['p50_estimate']:.3f} "
            f"p99~{server['p99_estimate']:.3f} (ms, from {server['source']}, {server['requests']:.0f} requests)"
        )
    print(
        f"tokens={report['tokens']} tokens_per_s={report['tokens_per_s']:.1f} "
        f"per_request_tokens_per_s={report['per_request_tokens_per_s']:.1f}"
    )
    print(report["cpp_summary"])


def _tls_errors() -> tuple[type[Exception], ...]:
    """
    How a TLS handshake fails (unknown CA, wrong host name, no client
    certificate): OpenSSL's error, or service_identity's for the host name.
    Empty when the TLS extras are not installed.
    """
    try:
        from OpenSSL.SSL import Error
        from service_identity.exceptions import VerificationError
    except ImportError:
        return ()
    return (Error, VerificationError)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-test-model"]:
        # Its own parser (cc50tw.testmodel); no reactor needed.
        from cc50tw.testmodel import main as makeTestModel

        raise SystemExit(makeTestModel(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.processes > min(args.connections, args.concurrency):
        parser.error(
            f"--processes={args.processes} needs at least as many --connections and --concurrency "
            f"(got {args.connections} and {args.concurrency})"
        )
    command = {"infer": _infer, "bench": _bench}[args.command]

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            try:
                code = await command(reactor, args)
            except PlotUnavailable as e:
                sys.stderr.write(f"cc50: {e}\n")
                code = 2
            except (ConnectError, ClientError, OSError, RuntimeError) as e:
                sys.stderr.write(f"cc50: {args.command} against {args.server} failed: {e}\n")
                code = 2
            except _tls_errors() as e:
                sys.stderr.write(f"cc50: {args.command} against {args.server} failed: TLS: {e}\n")
                code = 2
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(go())

    react(run)


if __name__ == "__main__":
    main()
