"""
``HTTPStreamingBackend``: the ``IBackend`` over a pool of HTTP upstreams,
what the ``llama_server`` and ``openai`` backends (and a plugin's, for
another streaming server) are made of.

Each request goes to the least-loaded upstream that is up
(``cc50tw.backends.pool``) as an ``UpstreamStream``; a ``HealthChecker``
polls every upstream's health URL.  A concrete backend adds its options,
its dialect and its headers.  Given ``routes`` (``--config``'s
``[[upstreams]]``), each upstream has its own model, dialect and key
instead, and a request goes only to the upstreams serving its model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
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
from cc50tw.backends.http.routes import UpstreamRoute
from cc50tw.backends.http.stream import UpstreamStream
from cc50tw.backends.pool import Upstream, UpstreamCollector, UpstreamPool
from cc50tw.generation import OPTION_NAMES, GenerationOptions
from cc50tw.interfaces import GenerationResult, IBackend, IBackendMetrics, InferenceRequest, ITokenSink

DIALECT_WORDS = {"llama": "llama.cpp /completion", "openai": "/v1/completions", "chat": "/v1/chat/completions"}


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
    #: Whether a route's OpenAI-style dialect adds llama-server's extensions
    #: (``cache_prompt``, ``top_k``...): a strict upstream may refuse them.
    llamaExtensions = True
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
        routes: Sequence[UpstreamRoute] = (),
        defaultModel: str | None = None,
    ) -> None:
        """
        ``http`` and ``freshHTTP`` replace the clients (tests give in-memory ones).
        ``routes`` replace ``urls``: each route is an upstream with its own
        model, dialect and key; ``defaultModel`` is the model of a request
        that names none (else the first route's).
        """
        self.reactor = reactor
        self.settings = settings if settings is not None else UpstreamSettings()
        self.routes: dict[str, UpstreamRoute] = {}
        if routes:
            urls = [route.url for route in routes]
        elif isinstance(urls, str):
            urls = [urls]
        self.urls = [normalizeURL(url, f"--{self.option_prefix}-url") for url in urls]
        duplicates = sorted({url for url in self.urls if self.urls.count(url) > 1})
        if duplicates:
            raise ValueError(f"--{self.option_prefix}-url names an upstream more than once: {', '.join(duplicates)}")
        if routes:
            routes = [attrs.evolve(route, url=url) for route, url in zip(routes, self.urls, strict=True)]
            self.routes = {route.url: route for route in routes}
            served = list(dict.fromkeys(route.model for route in routes))
            if defaultModel is not None and defaultModel not in served:
                raise ValueError(
                    f"default_model {defaultModel!r} is served by no upstream (models: {', '.join(served)})"
                )
            self.defaultModel: str | None = defaultModel if defaultModel is not None else served[0]
            members: list[str | Upstream] = [route.member() for route in routes]
        else:
            self.defaultModel = None
            members = list(self.urls)
        self.pool = UpstreamPool(members, reactor, self.settings.backoff, label=self.upstream_name)
        self.streamHeaders: dict[bytes, list[bytes]] = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"text/event-stream"],
            **{name: list(values) for name, values in self.settings.headers.items()},
        }
        #: Each routed upstream's headers: the shared ones and its own key.
        self._routeHeaders = {url: route.headers(self.streamHeaders) for url, route in self.routes.items()}
        timeout = self.settings.connect_timeout
        if http is None:
            if pool is None:
                pool = pooledConnections(reactor)
            http = makeHTTPClient(upstreamAgent(reactor, timeout, pool), pool)
        if freshHTTP is None:
            if pool is None:
                freshHTTP = http  # a test's client: it decides what a connection is
            else:
                freshHTTP = makeHTTPClient(
                    upstreamAgent(reactor, timeout, pooledConnections(reactor, persistent=False))
                )
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
        healthHeaders = {url: route.headers(self.settings.headers) for url, route in self.routes.items()}
        self.health = HealthChecker(
            reactor,
            self.pool,
            http,
            self.settings,
            self.upstream_name,
            lambda upstream: healthHeaders.get(upstream.url),
        )
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
            where = f"{self.upstream_name} at {upstream.url}"
            route = self.routes.get(upstream.url)
            made = route.makeDialect(where, self.llamaExtensions) if route is not None else self.makeDialect(where)
            dialect = self._dialects[upstream.url] = made
        return dialect

    def headersFor(self, upstream: Upstream) -> dict[bytes, list[bytes]]:
        """What a request to ``upstream`` carries: a routed upstream's own key goes to it alone."""
        return self._routeHeaders.get(upstream.url, self.streamHeaders)

    def models(self) -> list[str]:
        """The models the routes serve, the default first (HELLO and ``unknownModel`` read it)."""
        served = self.pool.models()
        if self.defaultModel is None:
            return served
        return [self.defaultModel, *(model for model in served if model != self.defaultModel)]

    def modelFor(self, options: GenerationOptions) -> str | None:
        """The model a request is routed by: its own, else the default (``None`` when not routing)."""
        return options.model if options.model is not None else self.defaultModel

    def describe(self) -> str:
        if self.routes:
            return self._describeRoutes()
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

    def _describeRoutes(self) -> str:
        routes = "; ".join(
            f"{route.model!r} at {route.url} ({DIALECT_WORDS[route.dialect]}"
            + (f", as {route.upstream_model!r}" if route.upstream_model is not None else "")
            + (f", weight {route.weight:g}" if route.weight != 1 else "")
            + (f", at most {route.max_concurrency} at once" if route.max_concurrency is not None else "")
            + (", with its API key" if route.api_key is not None else "")
            + ")"
            for route in self.routes.values()
        )
        s = self.settings
        return (
            f"{len(self.routes)} {self.upstream_name} upstream(s) by model, default {self.defaultModel!r}: {routes}; "
            f"timeouts: connect {s.connect_timeout:g}s, first event {s.first_event_timeout:g}s, "
            f"idle {s.idle_timeout:g}s; back-off {s.backoff:g}s"
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
        """
        Whether at least one upstream is healthy (never fails).  With health
        checks off (no path, or ``--*-health-interval=0``) it probes nothing:
        the server's own readiness poll must not mark upstreams down behind
        the operator's back; only failed requests do then.
        """
        if not self.settings.health_path or self.settings.health_interval <= 0:
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
