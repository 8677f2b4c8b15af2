"""
Active health checks of a pool's upstreams: each one's health URL, polled.

One clock covers a whole check, headers and body: it cancels whichever
step is under way, and a cancelled body read hangs up, so a stalled
upstream cannot leave a probe (or the poller waiting on it) pending.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from cc50tw.backends.http.client import MAX_BODY_READ, BodyCollector, UpstreamHTTPClient
from cc50tw.backends.http.faults import bodyMessage, wasCancelled
from cc50tw.backends.http.options import UpstreamSettings
from cc50tw.backends.pool import Upstream, UpstreamPool


class HealthChecker:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pool: UpstreamPool,
        http: UpstreamHTTPClient,
        settings: UpstreamSettings,
        label: str,
        headersFor: Callable[[Upstream], Mapping[bytes, Any] | None] | None = None,
    ) -> None:
        """``headersFor``: an upstream's own headers (its API key), ``None`` for the shared ones."""
        self.reactor = reactor
        self.headersFor = headersFor
        self.pool = pool
        self.http = http
        self.settings = settings
        self.label = label
        self.path = settings.health_path or None
        self._poller: LoopingCall | None = None
        #: Checks under way (``stop`` cancels them).
        self._probes: set[Deferred[Any]] = set()
        self._stopped = False

    @property
    def polling(self) -> bool:
        return self._poller is not None and self._poller.running

    def start(self) -> Deferred[None]:
        """Check every upstream once and log what each says, then poll; never fails."""

        def poll(_: object) -> None:
            if self._stopped or not self.path or self.settings.health_interval <= 0:
                return
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.settings.health_interval, now=False).addErrback(
                lambda f: self.log.failure("upstream health polling stopped", f)
            )

        return self.probeAll(log=True).addCallback(poll)

    def stop(self) -> None:
        self._stopped = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        for probe in list(self._probes):
            probe.cancel()

    def probeAll(self, log: bool = False) -> Deferred[tuple[bool, str]]:
        """Whether any upstream is healthy now, and a sentence per upstream (each logged, with ``log``)."""
        if not self.path:
            return succeed((True, f"{self.label} health checks are off"))
        probes = [self.probe(upstream) for upstream in self.pool.members]

        def summarize(results: list[tuple[bool, str]]) -> tuple[bool, str]:
            if log:
                for _, message in results:
                    self.log.info("{message}", message=message)
            return any(ok for ok, _ in results), "; ".join(message for _, message in results)

        return gatherResults(probes).addCallback(summarize)

    def _poll(self) -> None:
        for upstream in self.pool.members:
            if not upstream.probing:
                self.probe(upstream)

    def probe(self, upstream: Upstream) -> Deferred[tuple[bool, str]]:
        """Ask one upstream's health URL; record and return the verdict; never fails."""
        assert self.path is not None
        where = f"{self.label} at {upstream.url}"
        path = self.path
        if self._stopped:
            return succeed((False, f"{where} was not checked: the backend is stopping"))
        upstream.probing = True
        own = self.headersFor(upstream) if self.headersFor is not None else None
        headers = Headers(dict(own if own is not None else self.settings.headers))
        got: Deferred[Any] = maybeDeferred(self.http.getDirect, (upstream.url + path).encode("ascii"), headers)
        step = [got]
        timer = self.reactor.callLater(self.settings.connect_timeout + 5, lambda: step[-1].cancel())

        def answered(response: Any) -> Deferred[tuple[bool, str]]:
            collector = BodyCollector(MAX_BODY_READ)
            response.deliverBody(collector)
            step.append(collector.finished)

            def read(data: bytes) -> tuple[bool, str]:
                if response.code == 200:
                    return True, f"{where} is healthy ({data.decode('utf-8', 'replace').strip()[:200]})"
                if response.code == 503:
                    consequence = self.untilHealthy("it has loaded its model")
                    return False, f"{where} is up but not ready (HTTP 503: {bodyMessage(data)}); {consequence}"
                return False, f"{where} answered {path} with HTTP {response.code}: {bodyMessage(data)}"

            return collector.finished.addCallback(read)

        def failed(failure: Failure) -> tuple[bool, str]:
            if wasCancelled(failure):
                reason = "stopped: the backend is stopping" if self._stopped else "no answer in time"
            else:
                reason = failure.getErrorMessage()
            return False, f"{where} is not reachable ({reason}); {self.untilHealthy('it comes up')}"

        def record(result: tuple[bool, str]) -> tuple[bool, str]:
            if timer.active():
                timer.cancel()
            self._probes.discard(got)
            upstream.probing = False
            if not self._stopped:
                self.pool.healthChecked(upstream, *result)
            return result

        self._probes.add(got)
        got.addCallbacks(answered, failed)
        got.addErrback(failed)
        result: Deferred[tuple[bool, str]] = got.addCallback(record)
        return result

    def untilHealthy(self, when: str) -> str:
        """What an unhealthy upstream means for requests, for the health check's log line."""
        if len(self.pool) == 1:
            return f"requests will get UPSTREAM_UNAVAILABLE until {when}"
        return f"it gets no requests until {when}, unless no upstream is up"
