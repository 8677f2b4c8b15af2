"""
Prometheus metrics for one server, in its own registry.

Per-request figures (outcomes, latencies, tokens) are recorded once, when a
request ends; per-chunk and per-byte figures are plain integers that the
protocol already keeps, read only when Prometheus scrapes.  That keeps the
hot path free of locks and label look-ups, which matters at 200,000 frames/s.

The per-request series are plain numbers too, not ``prometheus_client``
metric objects: one ``Counter.inc`` or ``Histogram.observe`` checks the
metric's state, takes a lock per value and, for a labelled series, another
for the label look-up; seven of them cost a 1-token request more than its
parsing and framing together (issue 18).  A request adds to lists and dicts
instead, and ``_RequestCollector`` turns them into the same samples at scrape
time, ``_created`` included.

Not even that happens between one request and the next: a finished request
leaves one tuple of the scalars read off it at its end (times, counts, the
model label; never the request, whose prompt may be a megabyte), and
``fold`` counts the tuples into the series every ``FOLD_EVERY`` requests and
at each scrape, so a scrape always sees every request that has ended.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable
from typing import Any, NamedTuple, Protocol

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger

from cc50tw.codec import new_tuple
from cc50tw.interfaces import IBackendMetrics


class _Connection(Protocol):
    bytesSent: int
    bytesReceived: int


class _Counters(Protocol):
    framesDropped: int
    answeredAtOnce: int


class _Admission(Protocol):
    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...


class ServerState(Protocol):
    """What the metrics read off a server at scrape time."""

    bytesSent: int
    bytesReceived: int
    backendHealthy: bool
    #: The models ``cc50_model_requests_total`` may label.
    servedModels: frozenset[str]
    #: The backend's routing of a request without a model (``IModelRouting``), if it routes.
    modelFor: Callable[[Any], str | None] | None
    #: Monotonic seconds, as the requests' times are.
    clock: Callable[[], float]

    @property
    def backend(self) -> object: ...

    @property
    def connections(self) -> Collection[_Connection]: ...

    @property
    def admission(self) -> _Admission: ...

    @property
    def creditPauses(self) -> int: ...

    @property
    def transportPauses(self) -> int: ...

    @property
    def counters(self) -> _Counters: ...

log = Logger()

#: Latency buckets from 100 µs (a toy round trip) to a minute (a long answer).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: Time-to-first-token buckets: as ``LATENCY_BUCKETS`` outside 10 ms - 1 s,
#: and inside it about 20% apart (the E12 series), where real TTFTs fall.
#: With 25/50/100 ms bounds alone, a steady 51 ms TTFT read as p50 ~75 ms;
#: ``histogram_quantile`` now lands within a few per cent.
TTFT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.012, 0.015, 0.018, 0.022, 0.027, 0.033, 0.039, 0.047, 0.056, 0.068, 0.082,
    0.1, 0.12, 0.15, 0.18, 0.22, 0.27, 0.33, 0.39, 0.47, 0.56, 0.68, 0.82,
    1, 1.5, 2.5, 5, 10, 30, 60,
)  # fmt: skip

#: Finished requests held before they are counted into the series; a scrape
#: counts them whatever the number.  Small enough that the list stays a few
#: kilobytes, large enough that the counting runs once per many requests.
FOLD_EVERY = 256

#: ``ServerMetrics.requestEnded``'s "work the model out yourself".
_ROUTE: Any = object()


#: One finished request as the metrics keep it until ``fold``: what was read
#: off it at its end, scalars only (the request itself is not kept: its
#: prompt may be a megabyte, and a stream holds its connection):
#: outcome, backendError, startedAt, endedAt, firstChunkAt, lastChunkAt,
#: chunksSent, generated and prompt tokens as whole numbers, and the
#: model label (a model the backend serves, or None).
EndedRecord = tuple[str, bool, float, float, "float | None", "float | None", int, int, int, "str | None"]


class RequestFigures(NamedTuple):
    """What is measured of one finished request: the series', and the log line's."""

    latency: float
    ttft: float | None
    interToken: float | None
    generatedTokens: int
    promptTokens: int


def requestFigures(
    startedAt: float,
    endedAt: float,
    firstChunkAt: float | None,
    lastChunkAt: float | None,
    chunksSent: int,
    generated: int,
    prompt: int,
) -> RequestFigures:
    """
    A finished request's figures from its times and its counts (whole
    numbers already: ``requestEnded`` made them so); a clock that stepped
    back gives 0, not less.
    """
    latency = endedAt - startedAt
    if latency < 0:  # a clock that stepped back (a test's; a monotonic one does not)
        latency = 0.0
    ttft = None if firstChunkAt is None else firstChunkAt - startedAt if firstChunkAt >= startedAt else 0.0
    interToken = None
    if firstChunkAt is not None and chunksSent > 1 and lastChunkAt is not None and lastChunkAt >= firstChunkAt:
        interToken = (lastChunkAt - firstChunkAt) / (chunksSent - 1)
    return new_tuple(RequestFigures, (latency, ttft, interToken, generated, prompt))  # type: ignore[no-any-return]


#: Most tokens one request is counted for, as RESP_DONE's fields hold: a
#: backend's absurd count (10**400) must not grow a counter past what a float,
#: and so a scrape, can hold.
MAX_COUNT = (1 << 32) - 1


def countOrZero(value: object) -> int:
    """A token count from a backend as a number the metrics can add up: 0 for what is not one, at most ``MAX_COUNT``."""
    try:
        count = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return 0 if count < 0 else MAX_COUNT if count > MAX_COUNT else count


def routedModel(options: Any, modelFor: Callable[[Any], str | None]) -> str | None:
    """
    The model a backend routes a request without one to: a str, or None
    (what else it returns is no model's name; when it raises, logged).
    """
    try:
        model = modelFor(options)
    except Exception:
        log.failure("the backend's modelFor raised; the request is counted without a model label")
        return None
    return model if isinstance(model, str) else None


class _FactoryCollector(Collector):
    """Reads the counters the server keeps as plain integers, at scrape time."""

    def __init__(self, factory: ServerState) -> None:
        self._factory = factory

    def collect(self) -> Iterable[Metric]:
        factory = self._factory
        yield GaugeMetricFamily("cc50_connections_open", "Client connections open.", value=len(factory.connections))
        yield GaugeMetricFamily(
            "cc50_requests_in_flight", "Requests whose backend call is running.", value=factory.admission.running
        )
        yield GaugeMetricFamily(
            "cc50_requests_queued", "Requests waiting for a backend slot.", value=factory.admission.queued
        )
        sent = CounterMetricFamily("cc50_bytes_sent", "Bytes written to clients, headers included.")
        sent.add_metric([], factory.bytesSent + sum(c.bytesSent for c in factory.connections))
        yield sent
        received = CounterMetricFamily("cc50_bytes_received", "Bytes read from clients.")
        received.add_metric([], factory.bytesReceived + sum(c.bytesReceived for c in factory.connections))
        yield received
        pauses = CounterMetricFamily(
            "cc50_flow_control_pauses", "Times a backend stream was paused, by reason.", labels=["reason"]
        )
        pauses.add_metric(["credit"], factory.creditPauses)
        pauses.add_metric(["tcp"], factory.transportPauses)
        yield pauses
        dropped = CounterMetricFamily(
            "cc50_frames_dropped",
            "Client frames dropped unanswered: not a request, on a req_id with nothing in flight (docs/protocol.md).",
        )
        dropped.add_metric([], factory.counters.framesDropped)
        yield dropped
        atOnce = CounterMetricFamily(
            "cc50_answered_at_once",
            "Requests whose backend had the whole answer ready, sent in one write (IImmediateBackend).",
        )
        atOnce.add_metric([], factory.counters.answeredAtOnce)
        yield atOnce
        yield GaugeMetricFamily(
            "cc50_backend_up", "1 when the backend's last health check passed.", value=1.0 if factory.backendHealthy else 0.0
        )


def _exportCreated() -> bool:
    """Whether ``_created`` samples are exported (``PROMETHEUS_DISABLE_CREATED_SERIES``, as prometheus_client decides)."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class PlainHistogram:
    """
    One unlabelled histogram as plain numbers, exported as
    ``prometheus_client.Histogram`` would export it.
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        bounds = [float(bound) for bound in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        #: Observations per bucket, not cumulative; ``le`` is inclusive, as Prometheus's.
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, created: bool) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=())
        cumulative = 0.0
        buckets = []
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric((), buckets, self.sum)
        if created:
            family.samples.append(Sample(self.name + "_created", {}, self.created, None, None))
        return family


class PlainCounter:
    """One counter, labelled or not, as plain numbers; a labelled child appears with its first count."""

    def __init__(self, name: str, documentation: str, labelNames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelNames = labelNames
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}
        if not labelNames:
            self.values[()] = 0
            self.created[()] = time.time()

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        values = self.values
        if labels in values:
            values[labels] += amount
        else:
            values[labels] = amount
            self.created[labels] = time.time()

    def family(self, created: bool) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelNames)
        for labels, value in self.values.items():
            family.add_metric(labels, float(value), self.created[labels] if created else None)
        return family


class _RequestCollector(Collector):
    """Exports a ``ServerMetrics``'s per-request series, in the order they were declared."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        created = _exportCreated()
        self._metrics.fold()
        for series in self._metrics.series:
            yield series.family(created)

    def describe(self) -> Iterable[Metric]:
        """The names, so that a backend's collector that reuses one is refused (``registerBackendCollectors``)."""
        for series in self._metrics.series:
            kind = HistogramMetricFamily if isinstance(series, PlainHistogram) else CounterMetricFamily
            yield kind(series.name, series.documentation)


class ServerMetrics:
    """The per-request series, recorded by ``requestEnded`` once per request."""

    def __init__(self, factory: ServerState, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._factory = factory
        self.requests = PlainCounter("cc50_requests", "Requests ended, by outcome: done, or the error code's name.", ("outcome",))
        self.backend_errors = PlainCounter(
            "cc50_backend_errors", "Requests the backend failed, by error code's name.", ("kind",)
        )
        self.ttft = PlainHistogram(
            "cc50_time_to_first_token_seconds", "From REQ_INFER to the first chunk sent.", TTFT_BUCKETS
        )
        self.inter_token = PlainHistogram(
            "cc50_inter_token_latency_seconds",
            "Mean gap between a request's chunks, one observation per request.",
            LATENCY_BUCKETS,
        )
        self.duration = PlainHistogram(
            "cc50_request_duration_seconds", "From REQ_INFER to its terminal frame.", LATENCY_BUCKETS
        )
        self.model_requests = PlainCounter(
            "cc50_model_requests",
            "Requests ended, by the model they were routed by (one the backend serves) and outcome.",
            ("model", "outcome"),
        )
        self.generated_tokens = PlainCounter("cc50_generated_tokens", "Tokens generated.")
        self.prompt_tokens = PlainCounter("cc50_prompt_tokens", "Prompt tokens processed.")
        #: Requests ended and not yet counted into the series (``fold``).
        self._ended: list[EndedRecord] = []
        self.series: tuple[PlainCounter | PlainHistogram, ...] = (
            self.requests,
            self.backend_errors,
            self.ttft,
            self.inter_token,
            self.duration,
            self.model_requests,
            self.generated_tokens,
            self.prompt_tokens,
        )
        self.registry.register(_RequestCollector(self))
        self.registry.register(_FactoryCollector(factory))
        registerRuntimeCollectors(self.registry)
        registerBackendCollectors(self.registry, factory.backend)

    def requestEnded(
        self,
        request: Any,
        outcome: str,
        result: Any = None,
        backendError: bool = False,
        message: str = "",
        model: Any = _ROUTE,
        endedAt: float | None = None,
    ) -> EndedRecord:
        """
        One finished request (a ``stream.EndedRequest``), to be counted into
        every series it touches; ``message`` is the log line's, unused here.
        With its signature this is the streams' ``requestEnded`` itself when
        no log line is written.  ``model`` (the model it was routed by) and
        ``endedAt``: as the caller worked them out for its log line; the
        record returned is what that line reads too.

        What the series need is read off the request now, and counted into
        them in batches (``fold``): at every scrape, and every
        ``FOLD_EVERY`` requests to bound the list.  On a busy server that
        takes the series' bookkeeping off the path from request to reply, as
        the request log does with its lines.
        """
        factory = self._factory
        if model is _ROUTE:
            options = request.request.options
            model = options.model
            if model is None and factory.modelFor is not None:
                model = routedModel(options, factory.modelFor)
        if endedAt is None:
            endedAt = request.endedAt
            if endedAt is None:
                endedAt = factory.clock()
        generated = prompt = 0
        if result is not None:
            generated, prompt = result.generated_tokens, result.prompt_tokens
            # Whole numbers now: what a backend handed over must not be kept (it may hold anything).
            if type(generated) is not int or type(prompt) is not int or not 0 <= generated <= MAX_COUNT >= prompt >= 0:
                generated, prompt = countOrZero(generated), countOrZero(prompt)
        if model is not None:
            try:
                # Only a model the backend serves: a label per name a client made up would grow without bound.
                if model not in factory.servedModels:
                    model = None
            except TypeError:  # unhashable: no model anyone serves
                model = None
        record: EndedRecord = (
            outcome,
            backendError,
            request.startedAt,
            endedAt,
            request.firstChunkAt,
            request.lastChunkAt,
            request.chunksSent,
            generated,
            prompt,
            model,
        )
        ended = self._ended
        ended.append(record)
        if len(ended) >= FOLD_EVERY:
            self.fold()
        return record

    def fold(self) -> None:
        """Count the requests ended since the last fold into the series (scrapes call it first)."""
        ended, self._ended = self._ended, []
        for record in ended:
            try:
                self._count(record)
            except Exception:  # one bad record must cost the series that record alone
                log.failure("counting a finished request into the metrics failed: {record!r}", record=record)

    def _count(self, record: EndedRecord) -> None:
        """One record of ``requestEnded`` into the series."""
        outcome, backendError, startedAt, endedAt, firstChunkAt, lastChunkAt, chunksSent, generated, prompt, model = (
            record
        )
        latency, ttft, interToken, generatedTokens, promptTokens = requestFigures(
            startedAt, endedAt, firstChunkAt, lastChunkAt, chunksSent, generated, prompt
        )
        self.requests.inc((outcome,))
        self.duration.observe(latency)
        if backendError:
            self.backend_errors.inc((outcome,))
        if ttft is not None:
            self.ttft.observe(ttft)
            if interToken is not None:
                self.inter_token.observe(interToken)
        if generatedTokens > 0:
            self.generated_tokens.inc((), generatedTokens)
        if promptTokens > 0:
            self.prompt_tokens.inc((), promptTokens)
        if model is not None:
            self.model_requests.inc((model, outcome))


def registerRuntimeCollectors(registry: CollectorRegistry) -> None:
    """
    The standard ``process_*`` (CPU, memory, open files) and ``python_*`` (version, GC) series.

    prometheus_client registers these only in its global registry, which the
    server does not export; every dashboard expects them next to the
    application's own metrics.  ``ProcessCollector`` reads /proc, so on
    other platforms it yields nothing.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)  # on interpreters without gc.get_stats it yields nothing


def registerBackendCollectors(registry: CollectorRegistry, backend: object) -> None:
    """
    Register the collectors of a backend that provides ``IBackendMetrics``.

    One that clashes with a metric already registered is skipped with a log
    line: a plugin's metrics must not take the server down.
    """
    provider = IBackendMetrics(backend, None)
    if provider is None:
        return
    for collector in provider.collectors():
        try:
            registry.register(collector)
        except ValueError as e:
            log.error("not exporting backend metrics from {collector!r}: {error}", collector=collector, error=e)
