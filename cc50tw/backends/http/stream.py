"""
One CC50 request streamed from an HTTP upstream: the sink's push producer,
and the retry policy.

Pausing the stream pauses the current attempt's HTTP body (so the upstream's
TCP window closes and backpressure reaches the model); cancelling it closes
the connection, which is how the upstream learns to stop generating.

**Retry once, in all.**  A request makes at most two HTTP requests: when a
reused keep-alive connection turns out to have been closed by the upstream
before it answered (llama-server closes after every streamed answer while
advertising keep-alive), the second goes to the same upstream on a fresh
connection; when the upstream fails in a way the taxonomy (``faults``) marks
retryable, the second goes to another upstream of the pool.  Either way only
before any text reached the client: after that the request is the client's,
and a failure ends it with its one ``RESP_ERR``.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from cc50tw.backends.http.attempt import Attempt
from cc50tw.backends.http.client import UpstreamHTTPClient
from cc50tw.backends.http.dialects import Delta, Dialect, Progress
from cc50tw.backends.http.faults import Fault, causes
from cc50tw.backends.http.options import UpstreamSettings
from cc50tw.backends.pool import AllBusy, Upstream, UpstreamPool
from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.generation import GenerationOptions, OptionsError
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink
from cc50tw.sse import SSEEvent, TextAssembler


class StreamingBackend(Protocol):
    """What an ``UpstreamStream`` needs from its backend."""

    reactor: IReactorTime
    settings: UpstreamSettings
    http: UpstreamHTTPClient
    freshHTTP: UpstreamHTTPClient
    pool: UpstreamPool
    #: How messages name an upstream: "llama-server" (at URL).
    upstream_name: str
    #: The backend's option prefix, for messages that name an option: "llama".
    option_prefix: str
    #: The options to check when the upstream has no such API.
    endpoint_hint: str
    streamHeaders: dict[bytes, list[bytes]]
    #: Attempts whose answer has ended but whose HTTP body is still being read.
    draining: set[Attempt]

    def dialectFor(self, upstream: Upstream) -> Dialect: ...

    def headersFor(self, upstream: Upstream) -> dict[bytes, list[bytes]]:
        """What a request to ``upstream`` carries (its own API key, when it has one)."""

    def modelFor(self, options: GenerationOptions) -> str | None:
        """The model a request is routed by; ``None``: any upstream will do."""

    def finished(self, reason: str | None) -> None:
        """Count why an answer ended (metrics)."""


class _Where:
    """What an attempt needs to name its upstream in messages."""

    def __init__(self, where: str, path: str, hint: str, optionPrefix: str) -> None:
        self.where, self.path, self.hint, self.optionPrefix = where, path, hint, optionPrefix


@implementer(IPushProducer)
class UpstreamStream:
    log = Logger()

    def __init__(self, backend: StreamingBackend, request: InferenceRequest, sink: ITokenSink) -> None:
        self._backend = backend
        self._request = request
        self._sink = sink
        self._events: deque[SSEEvent] = deque()
        self._paused = False
        self._ended = False
        self._draining = False
        self._bodyEnd: Failure | None = None
        self._staleRetried = False  # the retry on a new connection to the same upstream
        self._moved = False  # the one move to another upstream
        self._holding = False
        self._chunks = 0  # sink writes: once there is one, the request is not retried
        self.upstream: Upstream | None = None
        self.attempt: Attempt | None = None
        self.posts = 0
        #: The model the request is routed by (``None``: not routing by model).
        self.model: str | None = None
        self._dialect: Dialect | None = None
        self._text = TextAssembler()
        self._thinking = TextAssembler()
        self.progress = Progress()
        self.done: Deferred[GenerationResult] = Deferred(self._cancelled)

    @property
    def _where(self) -> str:
        url = self.upstream.url if self.upstream is not None else "(no upstream)"
        return f"{self._backend.upstream_name} at {url}"

    # Attempts ----------------------------------------------------------------

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        model = self.model = self._backend.modelFor(self._request.options)
        try:
            upstream = self._backend.pool.choose(model=model)
        except AllBusy as busy:
            self._fail(
                Fault(
                    ErrorCode.OVERLOADED,
                    f"every upstream serving model {model!r} is at its max_concurrency "
                    f"({busy.limit} requests at once); try again later",
                )
            )
            return
        if upstream is None:  # the server refuses unknown models first; this is the backstop
            self._fail(Fault(ErrorCode.BAD_REQUEST, f"no upstream serves model {model!r}"))
            return
        self._use(upstream)
        self._send(pooled=True)

    def _use(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._backend.pool.acquire(upstream)
        self._holding = True
        self._dialect = self._backend.dialectFor(upstream)

    def _release(self, outcome: str) -> None:
        if self._holding and self.upstream is not None:
            self._holding = False
            self._backend.pool.release(self.upstream, outcome)

    def _send(self, pooled: bool) -> None:
        assert self.upstream is not None and self._dialect is not None
        backend = self._backend
        self._events.clear()
        self._bodyEnd = None
        self._text = TextAssembler()
        self._thinking = TextAssembler()
        self.progress = Progress(limit=self._request.max_tokens)
        try:
            fields = self._dialect.requestBody(self._request)
        except OptionsError as e:
            self._fail(Fault(ErrorCode.BAD_REQUEST, f"{self._where}: {e}"))
            return
        body = json.dumps({**backend.settings.extra_body, **fields}, allow_nan=False).encode("utf-8")
        where = _Where(self._where, self._dialect.path, backend.endpoint_hint, backend.option_prefix)
        uri = (self.upstream.url + self._dialect.path).encode("ascii")
        http = backend.http if pooled else backend.freshHTTP
        headers = backend.headersFor(self.upstream)
        attempt = Attempt(self, backend.reactor, backend.settings, http, uri, headers, body, where, pooled)
        self.attempt = attempt
        self.posts += 1
        if self._paused:
            attempt.pause()
        attempt.start()

    def attemptFailed(self, attempt: Attempt, fault: Fault, stale: bool) -> None:
        if attempt is not self.attempt or self._ended:
            return
        if stale and self._chunks == 0 and not self._staleRetried and not self._moved:
            # A pooled connection the upstream had closed: another pooled one
            # might be just as dead, so the one retry uses a brand new one.
            self._staleRetried = True
            self.log.debug(
                "retrying request {req_id} on a new connection: {why}", req_id=self._request.req_id, why=fault.message
            )
            self._send(pooled=False)
            return
        self._fault(fault)

    def _fault(self, fault: Fault) -> None:
        """
        The one place a failure is judged: held against the upstream or not,
        moved to another upstream or not (see ``faults``), else the end.
        """
        if self._ended:
            return
        upstream = self.upstream
        assert upstream is not None
        pool = self._backend.pool
        if fault.unhealthy:
            pool.failed(upstream, fault.message)
        elif fault.overloaded:
            pool.holdOff(upstream, fault.holdOff, fault.message)
        # One retry in all: one move to another upstream, unless the stale
        # connection's retry was spent on this one, and then only if this
        # attempt sent nothing (its connection was never made: the upstream
        # died), so that no request is POSTed more than twice.
        mayMove = not self._moved and (not self._staleRetried or not fault.sent)
        if fault.retry and self._chunks == 0 and mayMove:
            # Only to another upstream serving the same model.
            try:
                other = pool.choose(exclude=upstream, model=self.model)
            except AllBusy:
                other = None
            # Only to one that takes requests: with every other one down (or
            # held off after a 429), a second try is just a second failure.
            if other is not None and pool.isUp(other):
                self._moved = True
                pool.retried(upstream)
                self.log.info(
                    "request {req_id}: {message}; retrying on {url}",
                    req_id=self._request.req_id,
                    message=fault.message,
                    url=other.url,
                )
                if self.attempt is not None:
                    self.attempt.abandon()
                self._release(fault.outcome)
                self._use(other)
                self._send(pooled=True)
                return
        self._fail(fault)

    def attemptStreaming(self, attempt: Attempt) -> None:
        if attempt is self.attempt and self.upstream is not None:
            self._backend.pool.succeeded(self.upstream)

    def eventsArrived(self, attempt: Attempt, events: list[SSEEvent]) -> None:
        if attempt is not self.attempt or self._ended:
            return
        self._events.extend(events)
        self._drain()

    def bodyEnded(self, attempt: Attempt, reason: Failure) -> None:
        if attempt is not self.attempt or self._ended:
            return
        self._bodyEnd = reason
        self._drain()

    # The answer --------------------------------------------------------------

    def _drain(self) -> None:
        """Write queued events' text, one write per event, until paused, finished, or out of events."""
        if self._draining:
            return
        self._draining = True
        events, progress, dialect = self._events, self.progress, self._dialect
        assert dialect is not None
        try:
            while events and not self._paused and not self._ended:
                delta = dialect.interpret(events.popleft(), progress)
                progress.apply(delta)
                if delta.error is not None:
                    self._fault(delta.error)
                    return
                if delta.text or delta.reasoning:
                    self._write(delta)
                if progress.finished:
                    self._finish()
                    return
        finally:
            self._draining = False
        if not self._events and self._bodyEnd is not None and not self._ended:
            self._bodyFinished(self._bodyEnd)

    def _write(self, delta: Delta) -> None:
        text = self._text.text(delta.text)
        if delta.reasoning and self._backend.settings.reasoning:
            text = self._thinking.text(delta.reasoning) + text
        if text:
            self._chunks += 1
            self._sink.write(text)  # may pause us: the loop then stops before the next event

    def _bodyFinished(self, reason: Failure) -> None:
        """The body ended before the dialect's terminal event."""
        assert self._dialect is not None
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if clean and self._dialect.endedCleanly(self.progress):
            self._finish()
        elif clean:
            self._fault(
                Fault.backendError(
                    f"{self._where} ended the stream without its final event (after {self.progress.events} events)"
                )
            )
        else:
            self._fault(
                Fault(
                    ErrorCode.UPSTREAM_UNAVAILABLE,
                    f"{self._where} closed the connection mid-stream (after {self.progress.events} events: "
                    f"{causes(reason)}); it may have crashed or been restarted",
                    retry=True,
                    unhealthy=True,
                )
            )

    # Ending ------------------------------------------------------------------

    def _finish(self) -> None:
        tail = self._thinking.finish() + self._text.finish()
        if tail:
            self._sink.write(tail)
        self._end()
        if self.attempt is not None:
            self.attempt.drainRest(self._backend.draining)
        self._release("done")
        progress = self.progress
        generated = progress.generatedTokens
        if generated is None:
            # An upstream that reports no counts: chunks are the best estimate.
            generated = self._chunks
        self._backend.finished(progress.finishReason)
        self.done.callback(GenerationResult(progress.promptTokens or 0, generated, progress.finishReason))

    def _fail(self, fault: Fault) -> None:
        """End the request with the fault's code and message (the upstream's own reason in it)."""
        if self._ended:
            return
        self._end()
        if self.attempt is not None:
            self.attempt.abandon()
        self._release(fault.outcome)
        self.done.errback(BackendError(fault.message, fault.code))

    def _end(self) -> None:
        self._ended = True
        self._events.clear()
        self._sink.unregisterProducer()

    def _cancelled(self, _: Deferred[GenerationResult]) -> None:
        """The server gave up on the request (client cancelled or went away)."""
        if not self._ended:
            self._end()
            if self.attempt is not None:
                self.attempt.abandon()
            self._release("cancelled")

    # IPushProducer -----------------------------------------------------------

    def pauseProducing(self) -> None:
        if self._paused or self._ended:
            return
        self._paused = True
        if self.attempt is not None:
            self.attempt.pause()

    def resumeProducing(self) -> None:
        if not self._paused or self._ended:
            return
        self._paused = False
        if self.attempt is not None:
            self.attempt.resume()
        self._drain()

    def stopProducing(self) -> None:
        self._fail(Fault(ErrorCode.CANCELLED, "the CC50 request was stopped"))


__all__ = ["StreamingBackend", "UpstreamStream"]
