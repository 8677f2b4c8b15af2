"""
``HTTPStreamingBackend``: the ``IBackend`` over a pool of HTTP upstreams,
what the ``llama_server`` and ``openai`` backends (and a plugin's, for
another streaming server) are made of.

Each request goes to the least-loaded upstream that is up
(``cc50tw.backends.pool``) as an ``UpstreamStream``; a ``HealthChecker``
polls every upstream's health URL.  A concrete backend adds its options,
its dialect and its headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from cc50tw.backends.http.attempt import Attempt
from cc50tw.backends.http.client import UpstreamHTTPClient, makeHTTPClient, pooledConnections, upstreamAgent
from cc50tw.backends.http.dialects import Dialect
from cc50tw.backends.http.health import HealthChecker
from cc50tw.backends.http.options import UpstreamSettings, normalizeURL
from cc50tw.backends.http.stream import UpstreamStream
from cc50tw.backends.pool import Upstream, UpstreamCollector, UpstreamPool
from cc50tw.generation import OPTION_NAMES
from cc50tw.interfaces import GenerationResult, IBackend, IBackendMetrics, InferenceRequest, ITokenSink


class FinishReasonCollector(Collector):
    """Why answers ended, as each upstream said it ("stop", "length", ...)."""

    def __init__(self, reasons: dict[str, int]) -> None:
        self._reasons = reasons

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "cc50_finish_reasons", "Answers that ended, by the upstream's finish_reason.", labels=["reason"]
        )
        for reason, count in sorted(self._reasons.items()):
            family.add_metric([reason], count)
        yield family


@implementer(IBackend, IBackendMetrics)
class HTTPStreamingBackend:
    """Streams completions from a pool of HTTP upstreams (one or more URLs)."""

    name = "http"
    #: How messages name an upstream: "llama-server" (at URL).
    upstream_name = "upstream"
    #: Prefix of the backend's options, for messages that name one: "llama".
    option_prefix = "upstream"
    #: The options to check when the upstream has no such API.
    endpoint_hint = "the upstream URL"
    #: Every generation option: a dialect refuses, with BAD_REQUEST naming
    #: it, what its API cannot take (``system`` without chat, say).
    generationOptions = frozenset(OPTION_NAMES)
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        urls: str | Sequence[str],
        settings: UpstreamSettings | None = None,
        *,
        http: UpstreamHTTPClient | None = None,
        freshHTTP: UpstreamHTTPClient | None = None,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        """``http`` and ``freshHTTP`` replace the clients (tests give in-memory ones)."""
        self.reactor = reactor
        self.settings = settings if settings is not None else UpstreamSettings()
        if isinstance(urls, str):
            urls = [urls]
        self.urls = [normalizeURL(url, f"--{self.option_prefix}-url") for url in urls]
        duplicates = sorted({url for url in self.urls if self.urls.count(url) > 1})
        if duplicates:
            raise ValueError(f"--{self.option_prefix}-url names an upstream more than once: {', '.join(duplicates)}")
        self.pool = UpstreamPool(self.urls, reactor, self.settings.backoff, label=self.upstream_name)
        self.streamHeaders: dict[bytes, list[bytes]] = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"text/event-stream"],
            **{name: list(values) for name, values in self.settings.headers.items()},
        }
        timeout = self.settings.connect_timeout
        if http is None:
            if pool is None:
                pool = pooledConnections(reactor)
            http = makeHTTPClient(upstreamAgent(reactor, timeout, pool), pool)
        if freshHTTP is None:
            if pool is None:
                freshHTTP = http  # a test's client: it decides what a connection is
            else:
                freshHTTP = makeHTTPClient(upstreamAgent(reactor, timeout, pooledConnections(reactor, persistent=False)))
        #: The HTTP connections, shared by all upstreams (the Agent keys them by host).
        self.connectionPool = pool
        self.http = http
        #: Always a new connection: for the retry after a pooled connection
        #: turned out to be closed (see ``UpstreamStream``).
        self.freshHTTP = freshHTTP
        #: Streams that have not ended; tests and metrics read its size.
        self.active: set[UpstreamStream] = set()
        #: Attempts whose answer ended and whose body is still being read.
        self.draining: set[Attempt] = set()
        #: Answers ended, by the upstream's finish_reason.
        self.finishReasons: dict[str, int] = {}
        self.health = HealthChecker(reactor, self.pool, http, self.settings, self.upstream_name)
        self._dialects: dict[str, Dialect] = {}
        self.dialect = self.dialectFor(self.pool.members[0])

    # What tests and the log read off a backend.

    @property
    def url(self) -> str:
        """The first upstream's URL (the only one, unless it is a pool)."""
        return self.urls[0]

    @property
    def connect_timeout(self) -> float:
        return self.settings.connect_timeout

    @property
    def first_event_timeout(self) -> float:
        return self.settings.first_event_timeout

    @property
    def idle_timeout(self) -> float:
        return self.settings.idle_timeout

    @property
    def health_interval(self) -> float:
        return self.settings.health_interval

    @property
    def health_path(self) -> str | None:
        return self.settings.health_path

    @property
    def backoff(self) -> float:
        return self.settings.backoff

    def makeDialect(self, where: str) -> Dialect:
        """The dialect for one upstream; ``where`` names it in messages ("llama-server at URL")."""
        raise NotImplementedError

    def dialectFor(self, upstream: Upstream) -> Dialect:
        dialect = self._dialects.get(upstream.url)
        if dialect is None:
            dialect = self._dialects[upstream.url] = self.makeDialect(f"{self.upstream_name} at {upstream.url}")
        return dialect

    def describe(self) -> str:
        if len(self.urls) == 1:
            where = f"{self.upstream_name} at {self.urls[0]}"
        else:
            where = f"a pool of {len(self.urls)} {self.upstream_name} upstreams ({', '.join(self.urls)})"
        s = self.settings
        if s.health_path and s.health_interval > 0:
            health = f"health checks of {s.health_path} every {s.health_interval:g}s"
        else:
            health = "no health polling"
        return (
            f"{where}, {self.dialect.path} ({self.dialect.description}); timeouts: "
            f"connect {s.connect_timeout:g}s, first event {s.first_event_timeout:g}s, "
            f"idle {s.idle_timeout:g}s; {health}; back-off {s.backoff:g}s; "
            f"reasoning text {'streamed' if s.reasoning else 'dropped'}"
        )

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        stream = UpstreamStream(self, request, sink)
        self.active.add(stream)

        def forget(result: object) -> object:
            self.active.discard(stream)
            return result

        stream.done.addBoth(forget)
        stream.start()
        return stream.done

    def finished(self, reason: str | None) -> None:
        key = reason or "unknown"
        self.finishReasons[key] = self.finishReasons.get(key, 0) + 1

    def collectors(self) -> list[Collector]:
        """Per-upstream gauges and counters, and finish reasons (``IBackendMetrics``)."""
        return [UpstreamCollector(self.pool), FinishReasonCollector(self.finishReasons)]

    # Health ------------------------------------------------------------------

    def startBackend(self) -> Deferred[None]:
        """Check every upstream once and log what each says, then poll; never refuse to start."""
        return self.health.start()

    def checkHealth(self) -> Deferred[bool]:
        """Whether at least one upstream is healthy (never fails)."""
        if not self.settings.health_path:
            return succeed(self.pool.upCount() > 0)
        if self.health.polling and self.pool.allChecked():
            return succeed(self.pool.anyHealthy())
        return self.probeHealth().addCallback(lambda probe: probe[0])

    def probeHealth(self, log: bool = False) -> Deferred[tuple[bool, str]]:
        return self.health.probeAll(log)

    def stopBackend(self) -> Deferred[None]:
        self.health.stop()
        for stream in list(self.active):
            stream.stopProducing()
        for attempt in list(self.draining):
            attempt.stopDraining()
        self.pool.logSummary()
        closing = [self.connectionPool.closeCachedConnections()] if self.connectionPool is not None else []
        return gatherResults(closing).addCallback(lambda _: None)
