"""
A pool of upstream inference servers: which one gets the next request, and
which ones are up.

- **Routing.**  Each request goes to the upstream with the fewest requests
  outstanding (sent and not yet ended), relative to its weight, among those
  that are up and serve the request's model (``--config``'s
  ``[[upstreams]]``; without one, every upstream serves every request);
  ties go round-robin, so a quiet pool still alternates.  An upstream at
  its ``max_concurrency`` is skipped; when every one serving the model is,
  ``choose`` raises ``AllBusy`` (the request gets OVERLOADED: waiting there
  would only queue behind a limit the operator set on purpose).  When none is up, every
  upstream is a candidate ("panic mode", as Envoy calls it): refusing all
  traffic would turn a false alarm, or a server that has just come back,
  into an outage, while trying costs one fast failure.
- **Passive health.**  A failure that says the upstream is unwell (a
  broken connection, 502/503/504, a stall mid-stream: the taxonomy in
  ``cc50tw.backends.http.faults``; reported by the
  stream through ``failed``) takes the upstream out of routing for a
  back-off period, doubled for each further failure in a row (a failure
  after a back-off ended) up to ``MAX_BACKOFF_FACTOR`` times; an answer
  that starts streaming (``succeeded``) ends the back-off at once.
- **Active health.**  The backend polls each upstream's health URL and
  reports through ``healthChecked``; an upstream whose last check failed is
  out of routing until one passes.

Upstream state changes are logged with the upstream's counts, and
``UpstreamCollector`` exports the same figures to Prometheus.  Nothing here
does I/O: the backend owns the HTTP side, which keeps this unit-testable
with a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Seconds an upstream is kept out of routing after its first failure in a row.
DEFAULT_BACKOFF = 2.0
#: The back-off doubles with each further failure in a row, up to this factor.
MAX_BACKOFF_FACTOR = 8
#: How an attempt on an upstream ended: the label values of
#: ``cc50_upstream_requests_total{outcome}``.
#: ``failed``: a failure that says the upstream is unwell (passive health
#: counts these; docs/backends.md has the table); ``error``: any other.
OUTCOMES = ("done", "failed", "error", "cancelled")


class AllBusy(Exception):
    """Every upstream serving the model is at its ``max_concurrency``."""

    def __init__(self, model: str | None, limit: int) -> None:
        super().__init__(model, limit)
        self.model = model
        #: The requests they take at once, all together.
        self.limit = limit


@attrs.define(eq=False)
class Upstream:
    """One upstream server and what the pool knows about it."""

    url: str
    #: Requests sent to it that have not ended.
    outstanding: int = 0
    #: What its last health check said; ``None`` until it has been checked.
    healthy: bool | None = None
    healthMessage: str = ""
    #: Out of routing until this time (the reactor's clock) after failures.
    downUntil: float = 0.0
    #: Failures in a row, which set the back-off.
    failures: int = 0
    lastError: str = ""
    #: Attempts ended, by outcome (see ``OUTCOMES``).
    outcomes: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(OUTCOMES, 0))
    #: Requests that failed here before streaming and were moved to another upstream.
    retries: int = 0
    #: Times passive health took it out of routing.
    backoffs: int = 0
    #: Smooth weighted round-robin's running credit (see ``UpstreamPool.choose``).
    turn: float = 0.0
    #: A health check is under way (the poller does not start another).
    probing: bool = False
    #: Times it said it was overloaded (HTTP 429) and was held out of routing.
    holdOffs: int = 0
    #: The model clients ask for to be routed here; ``None``: any request.
    model: str | None = None
    #: Its share of the load: ``outstanding / weight`` is what routing compares.
    weight: float = 1.0
    #: Requests it takes at once; ``None``: no limit.
    maxConcurrency: int | None = None

    def serves(self, model: str | None) -> bool:
        """Whether a request for ``model`` may go here (an upstream with no model takes any)."""
        return self.model is None or model is None or self.model == model

    @property
    def full(self) -> bool:
        return self.maxConcurrency is not None and self.outstanding >= self.maxConcurrency

    def counts(self) -> str:
        """Its figures, for log lines."""
        outcomes = " ".join(f"{name}={count}" for name, count in self.outcomes.items())
        return f"outstanding={self.outstanding} {outcomes} retried_elsewhere={self.retries} backoffs={self.backoffs}"


class UpstreamPool:
    """The upstreams of one backend, and the routing and health rules above."""

    log = Logger()

    def __init__(
        self,
        urls: Sequence[str | Upstream],
        clock: IReactorTime,
        backoff: float = DEFAULT_BACKOFF,
        label: str = "upstream",
    ) -> None:
        """``urls``: URLs, or ``Upstream``s that carry a model, weight and limit."""
        if not urls:
            raise ValueError("an upstream pool needs at least one URL")
        members = [Upstream(url) if isinstance(url, str) else url for url in urls]
        names = [upstream.url for upstream in members]
        if len(set(names)) != len(names):
            duplicates = sorted({url for url in names if names.count(url) > 1})
            raise ValueError(f"upstream URL given more than once: {', '.join(duplicates)}")
        self.members = members
        self.clock = clock
        self.backoff = backoff
        #: How log lines name an upstream: "llama-server at URL".
        self.label = label
        self._next = 0  # where the round-robin among ties starts

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    # Routing -----------------------------------------------------------------

    def isUp(self, upstream: Upstream, now: float | None = None) -> bool:
        """Whether ``upstream`` takes new requests: its last check passed (or none ran) and it is not backing off."""
        if now is None:
            now = self.clock.seconds()
        return upstream.healthy is not False and now >= upstream.downUntil

    def upCount(self) -> int:
        now = self.clock.seconds()
        return sum(1 for upstream in self.members if self.isUp(upstream, now))

    def models(self) -> list[str]:
        """The models the upstreams serve, each once, in the order first listed."""
        return list(dict.fromkeys(upstream.model for upstream in self.members if upstream.model is not None))

    def choose(self, exclude: Upstream | None = None, model: str | None = None) -> Upstream | None:
        """
        The upstream for the next attempt at a request for ``model``: the
        least loaded (outstanding per unit of weight, counting this request)
        that is up, ties round-robin; if none is up, the least loaded of all
        (panic mode).  ``None`` when no upstream but ``exclude`` serves the
        model; ``AllBusy`` when every one that does is at its limit.

        Counting the request itself, ``(outstanding + 1) / weight``, lets a
        weight matter in a quiet pool too: idle, the heavier upstream is
        the one with room for more.
        """
        now = self.clock.seconds()
        serving = [upstream for upstream in self.members if upstream is not exclude and upstream.serves(model)]
        if not serving:
            return None
        up = [upstream for upstream in serving if self.isUp(upstream, now)]
        # Panic mode only when none of the model's upstreams is up: one that
        # is up but full means the model is busy, not that the down ones
        # should be tried.
        candidates = [upstream for upstream in (up or serving) if not upstream.full]
        if not candidates:
            raise AllBusy(model, sum(upstream.maxConcurrency or 0 for upstream in serving))
        least = min(upstream.outstanding / upstream.weight for upstream in candidates)
        tied = [upstream for upstream in candidates if upstream.outstanding / upstream.weight <= least + 1e-9]
        # Among the least loaded, smooth weighted round-robin (nginx's): each
        # gains its weight, the one with the most goes and pays back the
        # total, so one-at-a-time traffic is shared by weight too.
        total = sum(upstream.weight for upstream in tied)
        for upstream in tied:
            upstream.turn += upstream.weight
        best = max(tied, key=lambda upstream: upstream.turn)
        best.turn -= total
        return best

    def acquire(self, upstream: Upstream) -> None:
        upstream.outstanding += 1

    def release(self, upstream: Upstream, outcome: str) -> None:
        upstream.outstanding -= 1
        upstream.outcomes[outcome] += 1

    # Passive health ------------------------------------------------------------

    def failed(self, upstream: Upstream, reason: str) -> None:
        """
        A failure that says the upstream is unwell: take ``upstream`` out of routing for its
        back-off.  Failures while it is already backing off (the other
        requests it had in flight when it died, or attempts made in panic
        mode) neither extend nor double the back-off: only a failure after a
        back-off ended counts as one more in a row.
        """
        now = self.clock.seconds()
        upstream.lastError = reason
        if now < upstream.downUntil:
            return
        wasUp = upstream.healthy is not False
        upstream.failures += 1
        upstream.backoffs += 1
        delay = self.backoff * min(2 ** min(upstream.failures - 1, 16), MAX_BACKOFF_FACTOR)
        upstream.downUntil = now + delay
        if wasUp:
            self.log.warn(
                "{label} at {url} is down for {delay:g}s ({failures} failure(s) in a row): {reason}; "
                "{up}/{total} upstreams up; {counts}",
                label=self.label,
                url=upstream.url,
                delay=delay,
                failures=upstream.failures,
                reason=reason,
                up=self.upCount(),
                total=len(self.members),
                counts=upstream.counts(),
            )

    def holdOff(self, upstream: Upstream, seconds: float | None, reason: str) -> None:
        """
        The upstream is overloaded (HTTP 429): no requests for ``seconds``
        (its Retry-After; the back-off when it gave none).  Not a failure:
        its health and its failures in a row are untouched.
        """
        delay = self.backoff if seconds is None else seconds
        upstream.holdOffs += 1
        upstream.lastError = reason
        upstream.downUntil = max(upstream.downUntil, self.clock.seconds() + delay)
        self.log.info(
            "{label} at {url} is overloaded: no requests for {delay:g}s ({reason}); {up}/{total} upstreams up",
            label=self.label,
            url=upstream.url,
            delay=delay,
            reason=reason,
            up=self.upCount(),
            total=len(self.members),
        )

    def retried(self, upstream: Upstream) -> None:
        """A request that failed on ``upstream`` before streaming is moving to another one."""
        upstream.retries += 1

    def succeeded(self, upstream: Upstream) -> None:
        """``upstream`` started streaming an answer: whatever back-off it was in is over."""
        if upstream.failures or upstream.downUntil:
            backingOff = upstream.downUntil > self.clock.seconds()
            upstream.failures = 0
            upstream.downUntil = 0.0
            if backingOff:
                self.log.info(
                    "{label} at {url} is answering again; {up}/{total} upstreams up; {counts}",
                    label=self.label,
                    url=upstream.url,
                    up=self.upCount(),
                    total=len(self.members),
                    counts=upstream.counts(),
                )

    # Active health -------------------------------------------------------------

    def healthChecked(self, upstream: Upstream, healthy: bool, message: str) -> None:
        """Record a health check's verdict; log a change (the first verdict is the start-up log's)."""
        previous = upstream.healthy
        upstream.healthy = healthy
        upstream.healthMessage = message
        if previous is not None and previous != healthy:
            self.log.info(
                "{label} at {url} health check now {state}: {message}; {up}/{total} upstreams up; {counts}",
                label=self.label,
                url=upstream.url,
                state="passes" if healthy else "fails",
                message=message,
                up=self.upCount(),
                total=len(self.members),
                counts=upstream.counts(),
            )

    def anyHealthy(self) -> bool:
        """Whether the last health check of at least one upstream passed."""
        return any(upstream.healthy for upstream in self.members)

    def allChecked(self) -> bool:
        return all(upstream.healthy is not None for upstream in self.members)

    def logSummary(self) -> None:
        for upstream in self.members:
            self.log.info("{label} at {url}: {counts}", label=self.label, url=upstream.url, counts=upstream.counts())


class UpstreamCollector(Collector):
    """Per-upstream state and counts for Prometheus, read at scrape time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        pool = self._pool
        now = pool.clock.seconds()
        up = GaugeMetricFamily(
            "cc50_upstream_up",
            "1 when the upstream takes new requests: its last health check passed and it is not backing off.",
            labels=["url"],
        )
        healthy = GaugeMetricFamily(
            "cc50_upstream_health_check_ok",
            "1 when the upstream's last health check passed (before the first check: 1).",
            labels=["url"],
        )
        outstanding = GaugeMetricFamily(
            "cc50_upstream_outstanding", "Requests sent to the upstream that have not ended.", labels=["url"]
        )
        requests = CounterMetricFamily(
            "cc50_upstream_requests",
            "Attempts on the upstream, by outcome: done, failed (the upstream is unwell), error, cancelled.",
            labels=["url", "outcome"],
        )
        retries = CounterMetricFamily(
            "cc50_upstream_retries",
            "Requests that failed on the upstream before streaming and were retried on another one.",
            labels=["url"],
        )
        backoffs = CounterMetricFamily(
            "cc50_upstream_backoffs", "Times passive health took the upstream out of routing.", labels=["url"]
        )
        holdOffs = CounterMetricFamily(
            "cc50_upstream_hold_offs",
            "Times the upstream said it was overloaded (HTTP 429) and got no requests for its Retry-After.",
            labels=["url"],
        )
        for upstream in pool.members:
            labels = [upstream.url]
            up.add_metric(labels, 1.0 if pool.isUp(upstream, now) else 0.0)
            healthy.add_metric(labels, 0.0 if upstream.healthy is False else 1.0)
            outstanding.add_metric(labels, upstream.outstanding)
            for outcome, count in upstream.outcomes.items():
                requests.add_metric([upstream.url, outcome], count)
            retries.add_metric(labels, upstream.retries)
            backoffs.add_metric(labels, upstream.backoffs)
            holdOffs.add_metric(labels, upstream.holdOffs)
        yield from (up, healthy, outstanding, requests, retries, backoffs, holdOffs)
