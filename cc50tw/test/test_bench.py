"""
``cc50 bench``'s pieces: merging several processes' results, splitting a run
over processes, the JSON report, the progress bar (terminal only) and the
optional plot; and the command itself against a server on loopback.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import sys
from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cc50tw import cli
from cc50tw.backends.lcg import CPUEngine
from cc50tw.backends.toy import ToyBackend
from cc50tw.bench import (
    BenchResult,
    NoProgress,
    PlotUnavailable,
    RequestRecord,
    bench_report,
    check_plotting,
    make_progress,
    merge_results,
    plot_latency,
    run_bench,
    shares,
    split,
)
from cc50tw.client import ClientTimeout
from cc50tw.generation import GenerationOptions
from cc50tw.server import CC50ServerFactory, ServerConfig
from cc50tw.stats import cpp_summary_line, summarize

reactor: Any = globalReactor


def record(latency: float, ttft: float = 0.5, tokens: int = 3, text: str | None = None) -> RequestRecord:
    return RequestRecord(latency, ttft, tokens, text)


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class MergeTests(SynchronousTestCase):
    def test_mergeKeepsEveryRequestAndSpansTheWallTime(self) -> None:
        first = BenchResult([record(1.0), record(3.0)], ["e1"], 2.0, started_at=10.0, ended_at=12.0, cpu_s=1.5)
        second = BenchResult(
            [record(2.0), record(9.0), record(4.0)], [], 2.5, started_at=10.5, ended_at=13.0, cpu_s=2.0
        )
        merged = merge_results([first, second])
        self.assertEqual(merged.cpu_s, 3.5)
        self.assertEqual(sorted(r.latency_ms for r in merged.records), [1.0, 2.0, 3.0, 4.0, 9.0])
        self.assertEqual(merged.errors, ["e1"])
        self.assertEqual((merged.started_at, merged.ended_at, merged.wall_s), (10.0, 13.0, 3.0))
        self.assertEqual(merged.processes, 2)

    def test_mergedPercentilesAreThoseOfAllRequests(self) -> None:
        """Raw lists merge exactly: the merged p50/p99 are the whole run's, not an average of the parts'."""
        parts = [[float(v) for v in range(start, 1000, 3)] for start in range(3)]
        results = [BenchResult([record(v) for v in part], [], 1.0, 0.0, 1.0) for part in parts]
        merged = summarize([r.latency_ms for r in merge_results(results).records])
        whole = summarize([float(v) for v in range(1000)])
        self.assertEqual(merged, whole)
        self.assertEqual(
            cpp_summary_line([r.latency_ms for r in merge_results(results).records]), cpp_summary_line(range(1000))
        )

    def test_mergeNothing(self) -> None:
        self.assertEqual(merge_results([]), BenchResult([], [], 0.0))


class SplitTests(SynchronousTestCase):
    def test_split(self) -> None:
        self.assertEqual(split(10, 3), [4, 3, 3])
        self.assertEqual(split(2, 4), [1, 1, 0, 0])
        self.assertEqual(sum(split(1001, 7)), 1001)

    def test_sharesSplitRequestsWorkersAndConnections(self) -> None:
        parts = shares("tcp:h:1", "hi", 5, 1000, 100, 10, 3, keep_text=2)
        self.assertEqual([p.iters for p in parts], [334, 333, 333])
        self.assertEqual([p.concurrency for p in parts], [34, 33, 33])
        self.assertEqual([p.connections for p in parts], [4, 3, 3])
        self.assertEqual([p.keep_text for p in parts], [2, 0, 0])  # --print=N: the first process's answers

    def test_everyShareCarriesTheGenerationOptions(self) -> None:
        options = GenerationOptions(model="m", stop=("x",))
        parts = shares("tcp:h:1", "hi", 5, 10, 2, 2, 2, options=options)
        self.assertEqual([p.options for p in parts], [options, options])
        self.assertEqual(pickle.loads(pickle.dumps(parts[0])), parts[0])  # it crosses into a child process

    def test_moreProcessesThanConnectionsIsRefused(self) -> None:
        self.assertRaises(ValueError, shares, "tcp:h:1", "hi", 5, 100, 10, 2, 3)
        self.assertRaises(ValueError, shares, "tcp:h:1", "hi", 5, 100, 10, 2, 0)


class ReportTests(SynchronousTestCase):
    def test_reportIsJSONWithEveryFigure(self) -> None:
        result = BenchResult([record(2.0, 1.0, 4, "abc"), record(4.0, 1.5, 4)], ["oops"], 0.5, 1.0, 1.5)
        report = json.loads(json.dumps(bench_report(result, {"server": "tcp:h:1", "concurrency": 2})))
        self.assertEqual(report["settings"], {"server": "tcp:h:1", "concurrency": 2})
        self.assertEqual((report["requests"], report["errors"], report["error_messages"]), (2, 1, ["oops"]))
        self.assertEqual((report["tokens"], report["tokens_per_s"]), (8, 16.0))
        self.assertEqual(report["latency_ms"]["p50"], 2.0)
        self.assertEqual(report["latency_ms"]["max"], 4.0)
        self.assertEqual(report["ttft_ms"]["p99"], 1.5)
        self.assertEqual(report["per_request_tokens_per_s"], (2000.0 + 1000.0) / 2)
        self.assertEqual(report["cpp_summary"], cpp_summary_line([2.0, 4.0]))
        self.assertEqual(report["texts"], ["abc"])
        self.assertEqual(report["samples"]["latency_ms"], [2.0, 4.0])
        self.assertEqual(report["client_cpu_share"], 0.0)
        self.assertEqual(report["finish_reasons"], {})  # no generation options, no finish reasons

    def test_finishReasonsAreCounted(self) -> None:
        records = [record(1.0)._replace(finish_reason=reason) for reason in ("length", "stop", "length")]
        report = bench_report(BenchResult(records, [], 1.0), {})
        self.assertEqual(report["finish_reasons"], {"length": 2, "stop": 1})


class ProgressTests(SynchronousTestCase):
    def test_offWhenNotATerminal(self) -> None:
        stream = io.StringIO()
        progress = make_progress(10, stream)
        self.assertIsInstance(progress, NoProgress)
        progress.advance()
        progress.update_to(5)
        progress.close()
        self.assertEqual(stream.getvalue(), "")

    def test_offWhenDisabled(self) -> None:
        self.assertIsInstance(make_progress(10, TTY(), enabled=False), NoProgress)

    def test_offWithoutTqdm(self) -> None:
        self.patch(sys, "modules", {**sys.modules, "tqdm": None})  # type: ignore[dict-item]
        self.assertIsInstance(make_progress(10, TTY()), NoProgress)

    def test_onForATerminal(self) -> None:
        if importlib.util.find_spec("tqdm") is None:
            raise self.skipTest("tqdm is not installed")
        stream = TTY()
        progress = make_progress(10, stream)
        self.assertTrue(progress.shown)
        progress.advance()
        progress.update_to(10)
        progress.close()
        self.assertIn("0/10", stream.getvalue())  # drawn (later redraws wait for tqdm's mininterval)


class PlotTests(SynchronousTestCase):
    def report(self) -> dict[str, Any]:
        records = [record(1.0 + i / 10, 0.5 + i / 20) for i in range(50)]
        return bench_report(BenchResult(records, [], 1.0, 0.0, 1.0), {"server": "tcp:h:1", "max_tokens": 3})

    def test_clearErrorWithoutMatplotlib(self) -> None:
        self.patch(importlib.util, "find_spec", lambda name, package=None: None)
        error = self.assertRaises(PlotUnavailable, check_plotting)
        self.assertIn("pip install matplotlib", str(error))
        self.patch(sys, "modules", {**sys.modules, "matplotlib": None})  # type: ignore[dict-item]
        error = self.assertRaises(PlotUnavailable, plot_latency, self.mktemp(), self.report())
        self.assertIn("pip install matplotlib", str(error))

    def test_drawsAPNG(self) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            raise self.skipTest("matplotlib is not installed (an optional extra)")
        path = self.mktemp() + ".png"
        plot_latency(path, self.report())
        with open(path, "rb") as picture:
            self.assertEqual(picture.read(8), b"\x89PNG\r\n\x1a\n")


class CommandTests(TestCase):
    """``cc50 bench`` itself, on the test's reactor, against a toy server on loopback."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        backend = ToyBackend(reactor, CPUEngine(reactor, reactor.getThreadPool()), 0)
        factory = CC50ServerFactory(backend, ServerConfig(log_requests=False), reactor)

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(self.closeServer, factory)

        return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(listening)

    async def closeServer(self, factory: CC50ServerFactory) -> None:
        await self.port.stopListening()
        for connection in list(factory.connections):
            connection.transport.abortConnection()

    async def bench(self, *argv: str) -> tuple[int, str, str]:
        args = cli._parser().parse_args(
            ["bench", f"--server=127.0.0.1:{self.port.getHost().port}", "--max-tokens=3", *argv]
        )
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        args.options = cli._generationOptions(cli._parser(), args)
        code = await cli._bench(reactor, args)
        return code, out.getvalue(), err.getvalue()

    async def test_textEndsWithTheCppSummaryLine(self) -> None:
        code, out, err = await self.bench("--iters=20", "--concurrency=4", "--connections=2", "--print=1")
        lines = out.splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0], " token token token")
        self.assertTrue(lines[1].startswith("requests=20 errors=0 concurrency=4 connections=2 wall_s="), lines[1])
        self.assertRegex(
            lines[-1], r"^iters=20 mean_ms=\d+\.\d{3} p50_ms=\d+\.\d{3} p95_ms=\d+\.\d{3} p99_ms=\d+\.\d{3}$"
        )
        self.assertEqual(err, "")  # no progress bar: standard error is not a terminal

    async def test_generationOptionsGoWithEveryRequest(self) -> None:
        """The finish reasons come back, and the C++ summary line is still the last, unchanged."""
        code, out, err = await self.bench("--iters=6", "--concurrency=2", "--model=toy")
        lines = out.splitlines()
        self.assertEqual((code, err), (0, ""))
        self.assertIn("finish_reasons length=6", lines)
        self.assertRegex(lines[-1], r"^iters=6 mean_ms=\d+\.\d{3} p50_ms=\d+\.\d{3} p95_ms=\d+\.\d{3} p99_ms=\d+\.\d{3}$")
        code, out, _ = await self.bench("--iters=3", "--model=toy", "--json")
        report = json.loads(out)
        self.assertEqual((report["settings"]["options"], report["finish_reasons"]), ({"model": "toy"}, {"length": 3}))

    async def test_optionTheServerRefusesIsAnErrorPerRequest(self) -> None:
        code, out, err = await self.bench("--iters=3", "--temperature=0.5")
        self.assertEqual(code, 1)
        self.assertTrue(out.splitlines()[0].startswith("requests=0 errors=3 "), out)
        self.assertIn("'temperature'", err)

    async def test_jsonAloneIsOneDocumentOnStdout(self) -> None:
        code, out, _ = await self.bench("--iters=10", "--json")
        report = json.loads(out)
        self.assertEqual(code, 0)
        self.assertEqual((report["requests"], report["errors"], report["tokens"]), (10, 0, 30))
        self.assertEqual(len(report["samples"]["ttft_ms"]), 10)
        self.assertTrue(report["cpp_summary"].startswith("iters=10 mean_ms="))

    async def test_jsonToAFileKeepsTheText(self) -> None:
        path = self.mktemp()
        code, out, _ = await self.bench("--iters=10", f"--json={path}")
        with open(path) as written:
            report = json.load(written)
        self.assertEqual(report["requests"], 10)
        self.assertEqual(out.splitlines()[-1], report["cpp_summary"])


class FailureTests(TestCase):
    """
    Issue 16: ``cc50 bench`` against a server that is not there, or does not
    answer, fails with one clear exception (the command prints it as one line).
    """

    async def listen(self, factory: Factory) -> int:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    async def test_refusedConnectionIsItself(self) -> None:
        """Not a ``FirstError`` wrapping it, as ``gatherResults`` gave before."""
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        number = port.getHost().port
        await port.stopListening()  # nothing listens there now: connections are refused
        try:
            await run_bench(reactor, f"127.0.0.1:{number}", "hi", 1, 1, connections=3)
        except ConnectionRefusedError:
            pass
        else:
            self.fail("no ConnectionRefusedError")

    async def test_silentServerEndsTheRunAtTheFirstTimeout(self) -> None:
        closed: list[Deferred[None]] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                self.closed: Deferred[None] = Deferred()
                closed.append(self.closed)

            def connectionLost(self, reason: object = None) -> None:
                self.closed.callback(None)

        number = await self.listen(Factory.forProtocol(Silent))
        started = reactor.seconds()
        try:
            await run_bench(reactor, f"127.0.0.1:{number}", "hi", 1, 1000, concurrency=4, connections=2, timeout=0.2)
        except ClientTimeout as e:
            self.assertRegex(str(e), r"^request \d+: no answer within 0.2 s$")
        else:
            self.fail("no ClientTimeout")
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(len(closed), 2)
        for lost in closed:  # the run closed its connections
            await lost


class ParserTests(SynchronousTestCase):
    """Bad option values are usage errors: exit 2 and one line, before anything runs."""

    def parse(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        error = self.assertRaises(SystemExit, cli._parser().parse_args, list(argv))
        return error.code, err.getvalue()  # type: ignore[return-value]

    def test_numericOptionsAreChecked(self) -> None:
        for argv, message in [
            (("infer", "--max-tokens=-1"), "--max-tokens: must be at least 0, got -1"),
            (("infer", "--credit-bytes=4294967296"), "--credit-bytes: must be at most 4294967295"),
            (("infer", "--timeout=-1"), "--timeout: must be a number of seconds"),
            (("infer", "--timeout=inf"), "--timeout: must be a number of seconds"),
            (("bench", "--iters=0"), "--iters: must be at least 1, got 0"),
            (("bench", "--concurrency=-3"), "--concurrency: must be at least 1"),
            (("bench", "--connections=x"), "--connections: not an integer: 'x'"),
            (("bench", "--print=-1"), "--print: must be at least 0"),
            (("bench", "--processes=0"), "--processes: must be at least 1"),
            (("bench", "--max-tokens=-5"), "--max-tokens: must be at least 0"),
        ]:
            code, err = self.parse(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err)
            self.assertEqual(len(err.splitlines()), 1, err)

    def test_generationOptionsAreChecked(self) -> None:
        """As ``GenerationOptions`` checks them, so nothing the server would refuse for its form is sent."""
        for argv, message in [
            (("infer", "--top-p=2"), "argument --top-p: must be between 0 and 1, got 2.0"),
            (("infer", "--temperature=hot"), "argument --temperature: not a number: 'hot'"),
            (("infer", "--temperature=nan"), "argument --temperature: must be a number, got nan"),
            (("infer", "--temperature=101"), "argument --temperature: must be between 0 and 100"),
            (("infer", "--top-k=1.5"), "argument --top-k: not an integer: '1.5'"),
            (("infer", "--top-k=-1"), "argument --top-k: must be between 0 and"),
            (("infer", "--min-p=-0.1"), "argument --min-p: must be between 0 and 1"),
            (("infer", "--seed=x"), "argument --seed: not an integer: 'x'"),
            (("infer", "--stop="), "argument --stop: must be a list of non-empty strings"),
            (("infer", "--extra=[1]"), "argument --extra: must be a JSON object, got [1]"),
            (("infer", "--extra={"), "argument --extra: not JSON: '{'"),
            (("bench", "--top-p=2"), "argument --top-p: must be between 0 and 1"),
            (("bench", "--presence-penalty=-101"), "argument --presence-penalty: must be between -100 and 100"),
        ]:
            code, err = self.parse(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err)
            self.assertEqual(len(err.splitlines()), 1, err)

    def test_generationOptionsTogether(self) -> None:
        parser = cli._parser()
        args = parser.parse_args(
            ["infer", "--model=m", "--temperature=0", "--seed=1", "--stop=a", "--stop=b", '--extra={"n": 1}']
        )
        self.assertEqual(
            cli._generationOptions(parser.commands["infer"], args),
            GenerationOptions(model="m", temperature=0.0, seed=1, stop=("a", "b"), extra={"n": 1}),
        )
        self.assertEqual(cli._generationOptions(parser, parser.parse_args(["bench"])), GenerationOptions())
        # Only the whole can have too many stop strings: still a usage error naming the flag.
        args = parser.parse_args(["infer", *[f"--stop=s{i}" for i in range(17)]])
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        error = self.assertRaises(SystemExit, cli._generationOptions, parser.commands["infer"], args)
        self.assertEqual(error.code, 2)
        self.assertIn("cc50 infer: error: argument --stop: takes at most 16 strings, got 17", err.getvalue())

    def test_serverIsChecked(self) -> None:
        for server, message in [
            ("garbage", "Unknown endpoint type: 'garbage'"),
            ("127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is outside 1-65535"),
            ("tcp:host=h:port=0", "port 0"),
            ("tcp:h:1:nonsense=1", "nonsense"),
        ]:
            code, err = self.parse("infer", f"--server={server}")
            self.assertEqual(code, 2, server)
            self.assertIn(message, err)
            self.assertEqual(len(err.splitlines()), 1, err)

    def test_defaults(self) -> None:
        infer = cli._parser().parse_args(["infer"])
        bench = cli._parser().parse_args(["bench", "--server=unix:/nowhere", "--timeout=2.5"])
        self.assertEqual((infer.timeout, infer.server), (cli.DEFAULT_INFER_TIMEOUT, cli.DEFAULT_SERVER))
        self.assertEqual((bench.timeout, bench.server), (2.5, "unix:/nowhere"))
        self.assertEqual(cli._parser().parse_args(["bench"]).timeout, 0.0)  # off unless asked for
