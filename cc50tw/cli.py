"""
The ``cc50`` command: ``infer`` streams one answer, ``bench`` measures,
``models`` asks a server what it serves.

Flags follow the C++ CC50 client (``--server=HOST:PORT --prompt=...
--max-tokens=N --iters=N --print=1``) and bench ends with its summary line,
so existing scripts keep working.  Beyond them, bench takes ``--processes N``
(load from several client processes, merged), ``--json [PATH]`` (every
figure, for machines), ``--plot PNG`` (matplotlib, optional) and shows a
progress bar (tqdm, optional) when standard error is a terminal.  Both take
the generation options (``--model``, ``--temperature``, ``--stop``...),
checked as ``cc50tw.generation`` checks them, before anything runs.

Failures are one line on standard error, never a traceback: exit status 2 for
a bad option value (checked by argparse before anything runs: ranges of the
numeric options, the endpoint and its port), 1 for what goes wrong while
running (refused connection, timeout, server error).  ``--timeout`` keeps
either command from waiting forever on a server that does not answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import react
from twisted.python.failure import Failure

from cc50tw import __version__
from cc50tw.bench import PlotUnavailable
from cc50tw.client import MIN_CREDIT_BYTES, ClientTimeout, generationOptions
from cc50tw.endpoints import client_description
from cc50tw.errors import ClientError
from cc50tw.generation import OPTION_NAMES, GenerationOptions, OptionsError
from cc50tw.stats import describe

DEFAULT_SERVER = "tcp:127.0.0.1:9199"

#: ``cc50 infer --timeout``: generous for one answer, yet a silent server is noticed.
DEFAULT_INFER_TIMEOUT = 60.0

U32_MAX = 0xFFFFFFFF


class _Parser(argparse.ArgumentParser):
    """
    Usage errors in one line (``cc50 infer: error: ...``) instead of the
    usage text and then the error: the line is what a person or a log needs,
    and ``--help`` is one command away.
    """

    #: Each subcommand's parser, by name: an error found after parsing (two
    #: options that do not fit together, a token file that cannot be read)
    #: is reported by the subcommand's parser, so it points at ``cc50 bench --help``.
    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class MetricsScrapeFailed(Exception):
    """
    ``cc50 bench --metrics-url`` could not be scraped.

    Its own type so that ``main`` blames the metrics URL, not the CC50
    server under test, which may be fine.
    """


def _parser() -> _Parser:
    parser = _Parser(prog="cc50", description="CC50 client: stream answers and benchmark servers.")
    parser.add_argument("--version", action="version", version=f"cc50tw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--server", type=_server, default=DEFAULT_SERVER, help="endpoint (tcp:HOST:PORT, unix:PATH, tls:HOST:PORT:trustRoots=DIR) or HOST:PORT"
        )
        sub.add_argument("--prompt", default="Hello", help="prompt text")
        sub.add_argument("--max-tokens", type=_u32, default=0, help="tokens to generate (0 = server default)")
        sub.add_argument(
            "--credit-bytes", type=_creditBytes, default=0, help="initial credit window (0 = 262144; else at least 4)"
        )
        sub.add_argument("--auth-token-file", help="file holding the server's shared token (sent in HELLO)")
        # main() reads the file into ``token`` once parsing is done (see _readToken).
        sub.set_defaults(token=None)
        generation(sub)

    def generation(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group(
            "generation options",
            "sent with each request; the server refuses (BAD_REQUEST) one its backend cannot honour: "
            "cc50 models --verbose lists those it can",
        )
        group.add_argument("--model", type=_option("model", str), metavar="NAME", help="the model to use (cc50 models lists them)")
        group.add_argument("--temperature", type=_option("temperature", float), metavar="F", help="0-100; 0 is greedy")
        group.add_argument("--top-p", type=_option("top_p", float), metavar="F", help="nucleus sampling, 0-1")
        group.add_argument("--top-k", type=_option("top_k", int), metavar="N", help="top-k sampling")
        group.add_argument("--min-p", type=_option("min_p", float), metavar="F", help="minimum-probability sampling, 0-1")
        group.add_argument("--seed", type=_option("seed", int), metavar="N", help="sampling seed")
        group.add_argument(
            "--stop",
            type=_option("stop", str),
            action="append",
            metavar="TEXT",
            help="a stop string; repeat for more (at most 16)",
        )
        group.add_argument("--system", type=_option("system", str), metavar="TEXT", help="system prompt (chat upstreams)")
        group.add_argument(
            "--repeat-penalty", type=_option("repeat_penalty", float), metavar="F", help="llama.cpp's, 0-100"
        )
        group.add_argument(
            "--presence-penalty", type=_option("presence_penalty", float), metavar="F", help="OpenAI's, -100-100"
        )
        group.add_argument(
            "--frequency-penalty", type=_option("frequency_penalty", float), metavar="F", help="OpenAI's, -100-100"
        )
        group.add_argument(
            "--extra",
            type=_option("extra", json.loads),
            metavar="JSON",
            help="a JSON object of fields for the upstream's request body, as they are",
        )
        # main() gathers them into ``options`` (see _generationOptions).
        sub.set_defaults(options=None)

    commands.add_parser(
        "make-test-model", help="write a tiny random-weight GGUF model for llama-server (cc50 make-test-model --help)"
    )
    infer = commands.add_parser("infer", help="stream one answer to stdout")
    common(infer)
    infer.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_INFER_TIMEOUT,
        metavar="SECONDS",
        help=f"give up (exit 1) when connecting plus the whole answer take longer; 0 = no limit "
        f"(default {DEFAULT_INFER_TIMEOUT:g})",
    )

    bench = commands.add_parser("bench", help="measure latency, TTFT and tokens/s")
    common(bench)
    bench.add_argument("--iters", type=_positive, default=100, help="requests to send")
    bench.add_argument("--concurrency", type=_positive, default=1, help="requests in flight at once")
    bench.add_argument("--connections", type=_positive, default=1, help="connections to spread them over")
    bench.add_argument(
        "--print", type=_nonNegative, default=0, dest="print_count", help="print the text of the first N answers"
    )
    bench.add_argument(
        "--timeout",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="per connection attempt and per request: the first request over it ends the run (exit 1); "
        "0 = no limit (the default)",
    )
    bench.add_argument(
        "--metrics-url",
        type=_metricsUrl,
        metavar="URL",
        help="the server's /metrics URL (http:// or https://): print its own TTFT for this run beside the client's",
    )
    bench.add_argument(
        "--retry",
        type=_nonNegative,
        default=0,
        metavar="N",
        help="retry each request up to N times, with backoff and jitter, when the server could not start it "
        "(SHUTTING_DOWN, OVERLOADED, UPSTREAM_UNAVAILABLE or a lost connection, before any text): "
        "reconnecting, through a load balancer, to a server that is up; 0 = never (the default)",
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

    models = commands.add_parser("models", help="list the models a server serves (and the options it honours)")
    models.add_argument(
        "--server", type=_server, default=DEFAULT_SERVER, help="endpoint (tcp:HOST:PORT, unix:PATH, tls:HOST:PORT:trustRoots=DIR) or HOST:PORT"
    )
    models.add_argument("--auth-token-file", help="file holding the server's shared token (sent in HELLO)")
    models.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_INFER_TIMEOUT,
        metavar="SECONDS",
        help=f"give up (exit 1) when the server has not answered by then; 0 = no limit (default {DEFAULT_INFER_TIMEOUT:g})",
    )
    shown = models.add_mutually_exclusive_group()
    shown.add_argument(
        "--verbose", "-v", action="store_true", help="also the generation options it honours, and its name"
    )
    shown.add_argument("--json", action="store_true", help="name, options and models as one JSON object")
    models.set_defaults(token=None, options=None)
    parser.commands = {"infer": infer, "bench": bench, "models": models}
    return parser


#: Each generation option's flag, by its name on the wire (for messages about them).
_OPTION_FLAGS = {name: "--" + name.replace("_", "-") for name in OPTION_NAMES}


def _option(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    A type for the flag of option ``name``: the text parsed by ``parse``,
    then checked by ``GenerationOptions`` itself, so the command refuses
    exactly what the server would, as a usage error before connecting.
    """

    def check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            what = {int: "an integer", float: "a number", json.loads: "JSON"}.get(parse, "valid")
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        try:
            field: dict[str, Any] = {name: (value,) if name == "stop" else value}
            GenerationOptions(**field)
        except OptionsError as e:
            raise argparse.ArgumentTypeError(_withoutOptionName(str(e), name)) from None
        return value

    return check


def _withoutOptionName(message: str, name: str) -> str:
    """``option 'top_p' must be ...`` as ``must be ...``: argparse's line already names the flag."""
    prefix = f"option {name!r} "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _generationOptions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> GenerationOptions:
    """
    The generation options of the command line, together: each flag was
    checked alone, which leaves what only the whole can break (too many
    ``--stop``, a block past its size limit), a usage error too.
    """
    given = {name: getattr(args, name) for name in OPTION_NAMES if name != "stop" and getattr(args, name) is not None}
    try:
        return generationOptions(stop=args.stop, **given)
    except OptionsError as e:
        text = str(e)
        for name, flag in _OPTION_FLAGS.items():
            if text.startswith(f"option {name!r} "):
                parser.error(f"argument {flag}: {_withoutOptionName(text, name)}")
        parser.error(f"generation options: {text}")


def _integer(value: str, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]``, checked here so a bad value is a usage error, not a traceback later."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
    if high is not None and number > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {number}")
    return number


def _positive(value: str) -> int:
    return _integer(value, 1)


def _nonNegative(value: str) -> int:
    return _integer(value, 0)


def _u32(value: str) -> int:
    """The wire's u32 fields (``max_tokens``, ``credit_bytes``): anything else cannot be encoded."""
    return _integer(value, 0, U32_MAX)


def _creditBytes(value: str) -> int:
    """A window: 0 (the default) or one that holds any UTF-8 character."""
    credit = _u32(value)
    if 0 < credit < MIN_CREDIT_BYTES:
        raise argparse.ArgumentTypeError(
            f"{credit} bytes cannot hold every UTF-8 character: use 0 (262144) or at least {MIN_CREDIT_BYTES}"
        )
    return credit


def _seconds(value: str) -> float:
    """A timeout: finite, not negative; 0 means none."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more (0 = no limit), got {value}")
    return seconds


def _server(value: str) -> str:
    """
    Build the endpoint now (nothing connects yet), so an unknown endpoint
    type, a bad keyword or a port outside 1-65535 is a usage error rather
    than a traceback from deep in the reactor once it runs.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    try:
        endpoint: Any = clientFromString(reactor, client_description(value))
    except Exception as e:  # ValueError, TypeError, a TLS trust directory that is not there...
        raise argparse.ArgumentTypeError(
            f"not an endpoint (tcp:HOST:PORT, unix:PATH, tls:HOST:PORT:trustRoots=DIR or HOST:PORT): {value!r}: "
            f"{str(e) or type(e).__name__}"
        ) from None
    # TLS endpoints wrap the TCP one; Twisted keeps the port in a private attribute.
    while getattr(endpoint, "_wrappedEndpoint", None) is not None:
        endpoint = endpoint._wrappedEndpoint
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} of {value!r} is outside 1-65535")
    return value


def _metricsUrl(value: str) -> str:
    """
    An ``http://`` or ``https://`` URL with a host, checked before the bench
    runs: ``notaurl`` used to run the whole bench and then fail the scrape.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL: {value!r}")
    return value


def _readToken(parser: argparse.ArgumentParser, path: str | None) -> bytes | None:
    """
    The shared token in ``--auth-token-file``, read before anything runs.

    A file that cannot be read (or is empty) is a usage error naming the
    option, as ``twistd cc50 --auth-token-file`` makes it; read later, it was
    reported as the server's failure ("infer against HOST:PORT failed").
    """
    if not path:
        return None
    try:
        with open(path, "rb") as tokenFile:
            token = tokenFile.read().strip()
    except OSError as e:
        parser.error(f"argument --auth-token-file: cannot read {path}: {e.strerror or e}")
    if not token:
        parser.error(f"argument --auth-token-file: {path} is empty")
    return token


def _describeScrapeError(error: BaseException) -> str:
    """
    The reason a scrape failed, on one line.

    treq's ``ResponseFailed`` and ``ResponseNeverReceived`` hold a list of
    ``Failure`` objects and print as their reprs; the reasons inside are
    what a person needs ("connection was closed cleanly", say).
    """
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        texts = [
            " ".join(reason.getErrorMessage().split()) if isinstance(reason, Failure) else _oneLine(reason)
            for reason in reasons
        ]
        return f"{type(error).__name__}: {'; '.join(texts)}"
    return _oneLine(error)


async def _scrapeMetrics(url: str) -> str:
    """``scrape(url)``, any failure of which is a ``MetricsScrapeFailed`` naming ``--metrics-url``."""
    from cc50tw.scrape import scrape

    try:
        return await scrape(url)
    except Exception as e:
        raise MetricsScrapeFailed(f"--metrics-url {url} failed: {_describeScrapeError(e)}") from None


async def _infer(reactor: Any, args: argparse.Namespace) -> int:
    from cc50tw.client import connect

    timeout: float | None = args.timeout or None
    deadline = reactor.seconds() + timeout if timeout is not None else None
    client = await connect(reactor, args.server, args.token, timeout)
    # One budget for connecting and the answer: what is left of it after connecting.
    left = None if deadline is None else max(deadline - reactor.seconds(), 1e-3)
    response = client.infer(args.prompt, args.max_tokens, args.credit_bytes, left, options=args.options)
    wrote = False
    try:
        async for text in response:
            sys.stdout.write(text)
            sys.stdout.flush()
            wrote = True
        stats = await response.done
    except ClientTimeout as e:
        if wrote:
            sys.stdout.write("\n")
        raise ClientTimeout(e.req_id, e.seconds, f"no answer within {timeout:g} s (--timeout)") from None
    except ClientError as e:
        if wrote:
            sys.stdout.write("\n")
        sys.stderr.write(f"cc50: error {e.code.name} ({e.raw_code}): {e.message}\n")
        return 1
    finally:
        await client.close()
    sys.stdout.write("\n")
    finish = f" finish_reason={stats.finish_reason}" if stats.finish_reason is not None else ""
    sys.stderr.write(
        f"tokens={stats.tokens} prompt_tokens={stats.prompt_tokens} elapsed_us={stats.elapsed_us} "
        f"ttft_us={stats.ttft_us}{finish}\n"
    )
    return 0


async def _models(reactor: Any, args: argparse.Namespace) -> int:
    """
    ``cc50 models``: what the server's HELLO reply says it serves.  The
    models go to standard output one per line, for scripts; a server that
    names none (an older one, or a backend that does not say) is told on
    standard error, with nothing on standard output and exit status 0.
    """
    from cc50tw.client import connect

    timeout: float | None = args.timeout or None
    deadline = reactor.seconds() + timeout if timeout is not None else None
    client = await connect(reactor, args.server, args.token, timeout)
    try:
        left = None if deadline is None else max(deadline - reactor.seconds(), 1e-3)
        try:
            capabilities = await client.capabilities(left)
        except ClientTimeout as e:
            raise ClientTimeout(e.req_id, e.seconds, f"no answer within {timeout:g} s (--timeout)") from None
    finally:
        await client.close()
    models = list(capabilities.models or ())
    if args.json:
        json.dump(
            {"name": capabilities.name, "options": list(capabilities.options), "models": capabilities.models},
            sys.stdout,
        )
        sys.stdout.write("\n")
        return 0
    for model in models:
        print(model)
    if not models:
        sys.stderr.write(f"cc50: {args.server} ({capabilities.name or 'no name'}) does not say which models it serves\n")
    if args.verbose:
        print(f"# server: {capabilities.name}")
        print(f"# options: {' '.join(capabilities.options) if capabilities.options else '(none advertised)'}")
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
    from cc50tw.scrape import parse_histogram

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
        args.token,
        args.timeout or None,
        args.options,
        args.retry,
    )
    TTFT = "cc50_time_to_first_token_seconds"
    before = parse_histogram(await _scrapeMetrics(args.metrics_url), TTFT) if args.metrics_url else None
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
        "options": args.options.given() if args.options is not None else {},
        "retry": args.retry,
    }
    report = bench_report(result, settings)
    if before is not None:
        server = parse_histogram(await _scrapeMetrics(args.metrics_url), TTFT).since(before)
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
    if settings.get("retry"):
        print(f"retries={report['retries']} retried_requests={report['retried_requests']} retry={settings['retry']}")
    reasons = report.get("finish_reasons")
    if reasons:
        print("finish_reasons " + " ".join(f"{reason}={count}" for reason, count in sorted(reasons.items())))
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


def _oneLine(error: BaseException) -> str:
    """An error's text on one line: some (TLS, a child process's failure) span several."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-test-model"]:
        # Its own parser (cc50tw.testmodel); no reactor needed.
        from cc50tw.testmodel import main as makeTestModel

        raise SystemExit(makeTestModel(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    commandParser = parser.commands[args.command]
    if args.command == "bench" and args.processes > min(args.connections, args.concurrency):
        commandParser.error(
            f"--processes={args.processes} needs at least as many --connections and --concurrency "
            f"(got {args.connections} and {args.concurrency})"
        )
    args.token = _readToken(commandParser, args.auth_token_file)
    if args.command in ("infer", "bench"):
        args.options = _generationOptions(commandParser, args)
    command = {"infer": _infer, "bench": _bench, "models": _models}[args.command]

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            try:
                code = await command(reactor, args)
            except PlotUnavailable as e:
                sys.stderr.write(f"cc50: {e}\n")
                code = 2
            except MetricsScrapeFailed as e:
                # Before the generic handlers: the CC50 server is not to blame.
                sys.stderr.write(f"cc50: {args.command}: {e}\n")
                code = 1
            except (ConnectError, ClientError, OSError, RuntimeError) as e:
                sys.stderr.write(f"cc50: {args.command} against {args.server} failed: {_oneLine(e)}\n")
                code = 1
            except _tls_errors() as e:
                sys.stderr.write(f"cc50: {args.command} against {args.server} failed: TLS: {_oneLine(e)}\n")
                code = 1
            except Exception as e:
                # Nothing else is expected; still one line, not a traceback, for the person at the terminal.
                sys.stderr.write(
                    f"cc50: {args.command} against {args.server} failed: {type(e).__name__}: {_oneLine(e)}\n"
                )
                code = 1
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(go())

    react(run)


if __name__ == "__main__":
    main()
