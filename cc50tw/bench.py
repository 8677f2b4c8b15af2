"""
The load generator behind ``cc50 bench``.

Requests are issued by ``concurrency`` workers spread over ``connections``
connections, so the same tool measures sequential round trips (1, 1) and
multiplexed load (many per connection).  Every request is checked for its
terminal frame; failures are counted, never silently dropped.

One Python process parses a few hundred thousand frames a second; when that
is less than the server sends, ``run_bench_processes`` spreads the
connections over several processes (each with its own reactor), starts them
together and merges what they measured (``merge_results``): the raw
per-request figures are concatenated, so percentiles stay exact.

``bench_report`` turns a result into every figure the command prints (and
``--json`` writes); ``make_progress`` and ``plot_latency`` are the optional
terminal progress bar (tqdm) and the latency picture (matplotlib).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NamedTuple, TypeVar

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, gatherResults
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure

from cc50tw.client import CC50ClientProtocol, ClientPool, ClientTimeout, RetryPolicy, connect, generationOptions
from cc50tw.errors import ClientError
from cc50tw.generation import GenerationOptions
from cc50tw.stats import cpp_summary_line, summarize

T = TypeVar("T")

#: Connections opened at once: a burst of thousands overflows a listener's
#: accept backlog (Twisted's default is 50) and costs SYN retransmits.
CONNECT_BURST = 64


class RequestRecord(NamedTuple):
    latency_ms: float
    ttft_ms: float
    tokens: int
    text: str | None
    #: Why generation stopped; sent only for requests that carried generation options.
    finish_reason: str | None = None


class BenchResult(NamedTuple):
    records: list[RequestRecord]
    errors: list[str]
    wall_s: float
    #: ``time.perf_counter()`` when the first request was sent and when the
    #: last ended.  On Linux that clock is CLOCK_MONOTONIC, shared by every
    #: process, so results of several processes merge on one time line.
    started_at: float = 0.0
    ended_at: float = 0.0
    processes: int = 1
    #: CPU seconds the client process(es) used over the run: with the server's,
    #: it tells which side was the limit.
    cpu_s: float = 0.0
    #: With ``--retry``: requests sent again (every retry counted), and the
    #: requests that needed at least one.
    retries: int = 0
    retried_requests: int = 0


def raise_open_file_limit(needed: int = 0) -> tuple[int, int]:
    """
    Raise this process's RLIMIT_NOFILE soft limit to its hard limit (as the
    server does at start): each connection is a file descriptor.  Returns the
    (soft, hard) limits now in force; raises ``OSError`` when ``needed``
    descriptors cannot be had.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if needed and soft != resource.RLIM_INFINITY and needed > soft:
        raise OSError(f"{needed} file descriptors needed but the open-file limit is {soft} (hard {hard})")
    return soft, hard


async def run_bench(
    reactor: Any,
    server: str,
    prompt: str,
    max_tokens: int,
    iters: int,
    concurrency: int = 1,
    connections: int = 1,
    keep_text: int = 0,
    credit_bytes: int = 0,
    token: bytes | None = None,
    timeout: float | None = None,
    options: GenerationOptions | None = None,
    retry: int = 0,
    progress: Callable[[], object] | None = None,
    on_connected: Callable[[], object] | None = None,
) -> BenchResult:
    """
    ``iters`` requests by ``concurrency`` workers over ``connections``
    connections.  ``progress`` is called as each request ends (well or not);
    ``on_connected`` once every connection is up, just before the first
    request (the multi-process runner waits there for the other processes).

    ``timeout`` (seconds) bounds each connection attempt and each request.
    A request that runs out of it ends the whole run with ``ClientTimeout``:
    the server is stuck or far slower than the load asks, and the figures of
    a run whose slowest requests were cut off would mislead, while waiting
    out ``iters`` timeouts one by one could take hours.  A connection that
    cannot be made raises its own error (``ConnectionRefusedError``, ...),
    after the connections that were made are closed.

    ``options`` (generation options) go with every request; they are checked
    here, before connecting, so a bad one is an ``OptionsError`` rather than
    ``iters`` errors.

    ``retry`` above 0 sends the requests through a ``ClientPool`` whose
    policy allows that many retries per request (``RetryPolicy``: only
    what the server could not have answered, never after a chunk); a
    request's latency and TTFT then run from its first attempt, backoff
    included, and the result counts the retries.
    """
    if options is not None:
        generationOptions(options)
    raise_open_file_limit(connections + 64)
    if retry > 0:
        share = BenchShare(
            server,
            prompt,
            max_tokens,
            iters,
            concurrency,
            connections,
            keep_text,
            credit_bytes,
            token,
            timeout,
            options,
            retry,
        )
        return await _runPooled(reactor, share, progress, on_connected)
    clients = await _connectAll(reactor, server, token, max(1, connections), timeout)
    if on_connected is not None:
        try:
            on_connected()
        except BaseException:
            await gatherResults([client.close() for client in clients])
            raise
    records: list[RequestRecord] = []
    errors: list[str] = []
    issued = 0
    abandoned: list[ClientTimeout] = []

    async def worker(index: int) -> None:
        nonlocal issued
        client = clients[index % len(clients)]
        while issued < iters and not abandoned:
            number = issued
            issued += 1
            response = client.infer(prompt, max_tokens, credit_bytes, timeout, options=options)
            try:
                completion = await response.collect()
            except ClientTimeout as e:
                if not abandoned:
                    abandoned.append(ClientTimeout(e.req_id, e.seconds, f"request {number}: {e.message}"))
                    for other in clients:  # every request still in flight ends now, as an error
                        other.transport.abortConnection()  # type: ignore[union-attr]
                continue
            except ClientError as e:
                errors.append(str(e))
                continue
            except Exception as e:  # connection lost and the like
                errors.append(f"request {number}: {e!r}")
                continue
            finally:
                if progress is not None:
                    progress()
            end = response.finishedAt or time.perf_counter()
            first = response.firstChunkAt or end
            records.append(
                RequestRecord(
                    latency_ms=(end - response.startedAt) * 1e3,
                    ttft_ms=(first - response.startedAt) * 1e3,
                    tokens=completion.stats.tokens,
                    text=completion.text if number < keep_text else None,
                    finish_reason=completion.stats.finish_reason,
                )
            )

    started, cpu = time.perf_counter(), time.process_time()
    workers = [Deferred.fromCoroutine(worker(i)) for i in range(max(1, concurrency))]
    await DeferredList(workers, consumeErrors=True)
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    await gatherResults([client.close() for client in clients])
    if abandoned:
        raise abandoned[0]
    return BenchResult(records, errors, ended - started, started, ended, cpu_s=cpu)


async def _runPooled(
    reactor: Any,
    share: BenchShare,
    progress: Callable[[], object] | None,
    on_connected: Callable[[], object] | None,
) -> BenchResult:
    """``run_bench`` through a retrying ``ClientPool`` (``share.retry`` retries per request at most)."""
    pool = ClientPool(
        reactor,
        share.server,
        connections=max(1, share.connections),
        token=share.token,
        connectTimeout=share.timeout,
        policy=RetryPolicy(attempts=share.retry + 1),
    )
    try:
        await pool.connectAll()
        if on_connected is not None:
            on_connected()
    except BaseException:
        await pool.close()
        raise
    records: list[RequestRecord] = []
    errors: list[str] = []
    issued = 0
    abandoned: list[ClientTimeout] = []

    async def worker() -> None:
        nonlocal issued
        while issued < share.iters and not abandoned:
            number = issued
            issued += 1
            started = time.perf_counter()
            try:
                completion = await pool.infer(
                    share.prompt, share.max_tokens, share.credit_bytes, share.timeout, options=share.options
                )
            except ClientTimeout as e:
                if not abandoned:
                    abandoned.append(ClientTimeout(e.req_id, e.seconds, f"request {number}: {e.message}"))
                    for client in pool.connected():
                        client.transport.abortConnection()  # type: ignore[union-attr]
                continue
            except ClientError as e:
                errors.append(str(e))
                continue
            except Exception as e:  # connection lost after text arrived, or retries spent on connecting
                errors.append(f"request {number}: {e!r}")
                continue
            finally:
                if progress is not None:
                    progress()
            response = completion.response
            end = response.finishedAt or time.perf_counter()
            first = response.firstChunkAt or end
            records.append(
                RequestRecord(
                    latency_ms=(end - started) * 1e3,
                    ttft_ms=(first - started) * 1e3,
                    tokens=completion.stats.tokens,
                    text=completion.text if number < share.keep_text else None,
                    finish_reason=completion.stats.finish_reason,
                )
            )

    started, cpu = time.perf_counter(), time.process_time()
    workers = [Deferred.fromCoroutine(worker()) for _ in range(max(1, share.concurrency))]
    await DeferredList(workers, consumeErrors=True)
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    await pool.close()
    if abandoned:
        raise abandoned[0]
    return BenchResult(
        records,
        errors,
        ended - started,
        started,
        ended,
        cpu_s=cpu,
        retries=pool.retries,
        retried_requests=pool.retriedRequests,
    )


async def _connectAll(
    reactor: Any, server: str, token: bytes | None, count: int, timeout: float | None
) -> list[CC50ClientProtocol]:
    """
    ``count`` connections, ``CONNECT_BURST`` at a time.  If any fails, the
    others are closed and the first failure is raised as itself (not wrapped
    in a ``FirstError``), so the command can say what went wrong in one line.
    """
    burst = DeferredSemaphore(CONNECT_BURST)
    outcomes = await DeferredList(
        [burst.run(connect, reactor, server, token, timeout) for _ in range(count)], consumeErrors=True
    )
    clients: list[CC50ClientProtocol] = [result for ok, result in outcomes if ok]
    failures = [result for _, result in outcomes if isinstance(result, Failure)]
    if failures:
        await gatherResults([client.close() for client in clients])
        failures[0].raiseException()
    return clients


def merge_results(results: Sequence[BenchResult]) -> BenchResult:
    """
    One result from several processes' results: every request's figures,
    and the wall time from the first start to the last end.
    """
    if not results:
        return BenchResult([], [], 0.0)
    records = [record for result in results for record in result.records]
    errors = [error for result in results for error in result.errors]
    started = min(result.started_at for result in results)
    ended = max(result.ended_at for result in results)
    return BenchResult(
        records,
        errors,
        ended - started,
        started,
        ended,
        sum(r.processes for r in results),
        sum(r.cpu_s for r in results),
        sum(r.retries for r in results),
        sum(r.retried_requests for r in results),
    )


# Several processes -------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares as even as can be (the first ones larger)."""
    share, extra = divmod(total, parts)
    return [share + (1 if index < extra else 0) for index in range(parts)]


class BenchShare(NamedTuple):
    """
    One process's part of a run (picklable: it crosses into the child).
    Its fields are ``run_bench``'s arguments in order: ``run_bench(reactor, *share)``.
    """

    server: str
    prompt: str
    max_tokens: int
    iters: int
    concurrency: int
    connections: int
    keep_text: int
    credit_bytes: int
    token: bytes | None
    timeout: float | None = None
    options: GenerationOptions | None = None
    retry: int = 0


def shares(
    server: str,
    prompt: str,
    max_tokens: int,
    iters: int,
    concurrency: int,
    connections: int,
    processes: int,
    keep_text: int = 0,
    credit_bytes: int = 0,
    token: bytes | None = None,
    timeout: float | None = None,
    options: GenerationOptions | None = None,
    retry: int = 0,
) -> list[BenchShare]:
    """Split a run over ``processes``: requests, workers and connections alike."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    if processes > min(connections, concurrency):
        raise ValueError(
            f"--processes={processes} needs at least as many connections ({connections}) "
            f"and workers (--concurrency={concurrency})"
        )
    return [
        BenchShare(
            server,
            prompt,
            max_tokens,
            n,
            c,
            k,
            keep_text if index == 0 else 0,
            credit_bytes,
            token,
            timeout,
            options,
            retry,
        )
        for index, (n, c, k) in enumerate(
            zip(split(iters, processes), split(concurrency, processes), split(connections, processes))
        )
    ]


def run_on_reactor(main: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """
    Run ``main(reactor)`` on this process's global reactor and return what it
    returns (or raise what it raises).  A reactor runs once per process, so
    this is for a process of its own: a child of ``run_bench_processes``, a
    benchmark scenario.
    """
    from twisted.internet import reactor as globalReactor
    from twisted.python.failure import Failure

    reactor: Any = globalReactor
    outcome: list[Any] = []

    def start() -> None:
        finished = Deferred.fromCoroutine(main(reactor))
        finished.addBoth(outcome.append)
        finished.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    if not outcome:
        raise RuntimeError("the reactor stopped before the benchmark finished")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    result: T = outcome[0]
    return result


def _child(share: BenchShare, index: int, barrier: Any, counters: Any, pipe: Any) -> None:
    """A child process: its share of the run on its own reactor; the result goes back through ``pipe``."""

    def tick() -> None:
        counters[index] += 1

    def connected() -> None:
        barrier.wait(120)  # every process connected: start together

    try:
        result = run_on_reactor(lambda reactor: run_bench(reactor, *share, progress=tick, on_connected=connected))
    except threading.BrokenBarrierError:
        # Another process failed first and said why; this one only stopped waiting.
        pipe.send(("aborted", "another load-generating process failed", None))
    except BaseException as e:
        barrier.abort()  # the others stop waiting for this one
        if isinstance(e, (ClientError, ConnectError, OSError)):
            pipe.send(("error", str(e), None))  # an expected failure: its message says it all
        else:
            pipe.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    else:
        pipe.send(("ok", result))
    finally:
        pipe.close()


@contextmanager
def main_module_hidden() -> Iterator[None]:
    """
    While children start, hide ``__main__``'s file and spec from
    ``multiprocessing``: a ``spawn`` child otherwise re-runs the main script,
    and console scripts such as ``cc50`` call ``main()`` without an
    ``if __name__ == "__main__"`` guard.  The children need nothing from
    ``__main__``: what they run lives in this module.
    """
    main = sys.modules["__main__"]
    saved = {name: main.__dict__.pop(name) for name in ("__file__",) if name in main.__dict__}
    spec = getattr(main, "__spec__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        main.__spec__ = spec


def run_processes_blocking(bench_shares: Sequence[BenchShare], counters: Any = None) -> BenchResult:
    """
    Run each share in a process of its own (``spawn``: a fresh interpreter and
    reactor), started together, and merge their results.  Blocks: call it from
    a thread (``run_bench_processes``) or outside any reactor.  ``counters``,
    a ``multiprocessing`` array of one integer per share, counts finished
    requests as they end.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    if counters is None:
        counters = context.Array("q", len(bench_shares), lock=False)
    barrier = context.Barrier(len(bench_shares))
    children = []
    with main_module_hidden():
        for index, share in enumerate(bench_shares):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(share, index, barrier, counters, send), daemon=True)
            process.start()
            send.close()
            children.append((process, receive))
    results: list[BenchResult] = []
    failures: list[tuple[str, str | None]] = []
    aborted = False
    for process, receive in children:
        try:
            status, *payload = receive.recv()
        except EOFError:
            status, payload = "error", ["the process ended without a result", None]
        process.join()
        if status == "ok":
            results.append(payload[0])
        elif status == "aborted":
            aborted = True
        else:
            failures.append((payload[0], payload[1]))
    if failures:
        raise BenchProcessFailed(*failures[0])
    if aborted:
        raise BenchProcessFailed("a load-generating process stopped early")
    return merge_results(results)


class BenchProcessFailed(RuntimeError):
    """
    A process of ``run_processes_blocking`` failed.  Its message is one line
    (what a command prints); ``details`` holds the child's traceback when the
    failure was unexpected, for a bug report.
    """

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(f"a load-generating process failed: {message}")
        self.details = details


def run_bench_processes(
    reactor: Any,
    bench_shares: Sequence[BenchShare],
    progress: Callable[[int], object] | None = None,
    interval: float = 0.1,
) -> Deferred[BenchResult]:
    """
    ``run_processes_blocking`` in a thread of ``reactor``; ``progress`` gets
    the number of requests finished so far, every ``interval`` seconds.
    """
    import multiprocessing

    from twisted.internet.task import LoopingCall
    from twisted.internet.threads import deferToThreadPool

    counters = multiprocessing.get_context("spawn").Array("q", len(bench_shares), lock=False)
    poll: LoopingCall | None = None
    if progress is not None:
        report = progress
        poll = LoopingCall(lambda: report(sum(counters)))
        poll.clock = reactor
        poll.start(interval)
    finished: Deferred[BenchResult] = deferToThreadPool(
        reactor, reactor.getThreadPool(), run_processes_blocking, bench_shares, counters
    )

    def stop(result: Any) -> Any:
        if poll is not None and poll.running:
            poll.stop()
        if progress is not None:
            progress(sum(counters))
        return result

    return finished.addBoth(stop)


# Reporting ---------------------------------------------------------------------------


def summary_dict(values: Sequence[float]) -> dict[str, float]:
    s = summarize(values)
    return {
        "samples": s.samples,
        "mean": s.mean,
        "p50": s.p50,
        "p95": s.p95,
        "p99": s.p99,
        "min": s.minimum,
        "max": s.maximum,
    }


def bench_report(result: BenchResult, settings: dict[str, Any]) -> dict[str, Any]:
    """
    Every figure of a run, as plain data: what ``cc50 bench --json`` writes
    and what its text output is printed from.  ``settings`` (server, prompt,
    concurrency, ...) is copied in as given.
    """
    latencies = [r.latency_ms for r in result.records]
    ttfts = [r.ttft_ms for r in result.records]
    tokens = sum(r.tokens for r in result.records)
    rates = [r.tokens / (r.latency_ms / 1e3) for r in result.records if r.latency_ms > 0]
    finishReasons: dict[str, int] = {}
    for r in result.records:
        if r.finish_reason is not None:
            finishReasons[r.finish_reason] = finishReasons.get(r.finish_reason, 0) + 1
    return {
        "settings": dict(settings),
        "requests": len(result.records),
        "errors": len(result.errors),
        #: Retries made (``--retry``), and the requests that needed one: 0 without ``--retry``.
        "retries": result.retries,
        "retried_requests": result.retried_requests,
        "error_messages": result.errors[:100],
        "processes": result.processes,
        "wall_s": result.wall_s,
        "tokens": tokens,
        "tokens_per_s": tokens / result.wall_s if result.wall_s else 0.0,
        "per_request_tokens_per_s": sum(rates) / len(rates) if rates else 0.0,
        "requests_per_s": len(result.records) / result.wall_s if result.wall_s else 0.0,
        "client_cpu_s": result.cpu_s,
        "client_cpu_share": result.cpu_s / result.wall_s if result.wall_s else 0.0,
        "latency_ms": summary_dict(latencies),
        "ttft_ms": summary_dict(ttfts),
        "cpp_summary": cpp_summary_line(latencies),
        #: Requests by why they stopped ("length", "stop"): empty unless generation options were sent.
        "finish_reasons": finishReasons,
        "texts": [r.text for r in result.records if r.text is not None],
        "samples": {"latency_ms": latencies, "ttft_ms": ttfts, "tokens": [r.tokens for r in result.records]},
    }


# Progress bar ------------------------------------------------------------------------


class NoProgress:
    """What ``make_progress`` gives when there is no terminal (or no tqdm): nothing shown."""

    shown = False

    def advance(self, count: int = 1) -> None:
        pass

    def update_to(self, done: int) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """A tqdm bar on a terminal."""

    shown = True

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def advance(self, count: int = 1) -> None:
        self.bar.update(count)

    def update_to(self, done: int) -> None:
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int, stream: IO[str] | None = None, enabled: bool = True) -> NoProgress | TqdmProgress:
    """
    A progress bar of ``total`` requests on ``stream`` (standard error), only
    when it is a terminal: pipes and files get nothing, so the output that
    scripts read stays exactly as it was.  Needs ``tqdm``; without it, no bar.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not enabled or isatty is None or not isatty():
        return NoProgress()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,import-not-found]
    except ImportError:
        return NoProgress()
    return TqdmProgress(tqdm(total=total, file=stream, unit="req", leave=False, dynamic_ncols=True, mininterval=0.1))


# Plot --------------------------------------------------------------------------------


class PlotUnavailable(RuntimeError):
    """``--plot`` was asked for but matplotlib is not installed."""


def check_plotting() -> None:
    """Raise ``PlotUnavailable`` now rather than after a long run."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable("--plot needs matplotlib, an optional extra: pip install matplotlib")


def plot_latency(path: str, report: dict[str, Any]) -> None:
    """
    Draw the distribution of request latency and of TTFT (histograms with
    p50 and p99 marked, and their cumulative distributions) to ``path``.
    """
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # type: ignore[import-not-found]
    except ImportError as e:
        raise PlotUnavailable(f"--plot needs matplotlib, an optional extra: pip install matplotlib ({e})") from None

    samples = report["samples"]
    settings = report["settings"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, key, label in ((axes[0], "latency_ms", "request latency"), (axes[1], "ttft_ms", "time to first token")):
        values = samples[key]
        axis.hist(
            values, bins=min(100, max(10, len(values) // 10)), color="tab:blue" if key == "latency_ms" else "tab:orange"
        )
        summary = report[key]
        for name, style in (("p50", "--"), ("p99", ":")):
            if summary["samples"]:
                axis.axvline(summary[name], color="black", linestyle=style, label=f"{name} {summary[name]:.3f} ms")
        axis.set_title(label)
        axis.set_xlabel("ms")
        axis.set_ylabel("requests")
        if summary["samples"]:
            axis.legend()
    for key, label in (("latency_ms", "latency"), ("ttft_ms", "TTFT")):
        ordered = sorted(samples[key])
        if ordered:
            axes[2].plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    axes[2].set_xscale("log")
    axes[2].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, ... ms
    axes[2].xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes[2].xaxis.set_minor_formatter(NullFormatter())
    axes[2].set_title("cumulative distribution")
    axes[2].set_xlabel("ms (log)")
    axes[2].set_ylabel("fraction of requests")
    axes[2].legend()
    figure.suptitle(
        f"cc50 bench {settings.get('server', '')}: {report['requests']} requests, "
        f"max_tokens={settings.get('max_tokens')}, concurrency={settings.get('concurrency')}, "
        f"connections={settings.get('connections')}, {report['tokens_per_s']:.0f} tokens/s"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
