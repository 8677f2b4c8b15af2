"""
One HTTP request made for a stream: its connection, its event parser and
its timers, thrown away whole when the stream retries.

Because everything that belongs to one try lives here, nothing needs an
attempt number to tell a late callback from a current one: the stream asks
``attempt is self.attempt``, and an abandoned attempt closes its own
connection and goes quiet.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from cc50tw.backends.http.client import MAX_BODY_READ, BodyCollector, UpstreamHTTPClient, discard
from cc50tw.backends.http.faults import Fault, connectionFault, httpFault, isTLSFailure, neverAnswered
from cc50tw.backends.http.options import UpstreamSettings
from cc50tw.codec import ErrorCode
from cc50tw.sse import SSEError, SSEEvent, SSEParser


class AttemptOwner(Protocol):
    """What an attempt reports to, always passing itself so stale reports can be ignored."""

    def attemptFailed(self, attempt: Attempt, fault: Fault, stale: bool) -> None:
        """No stream: ``stale`` when a reused connection turned out closed before any answer."""

    def attemptStreaming(self, attempt: Attempt) -> None:
        """The upstream answered 200 with an event stream."""

    def eventsArrived(self, attempt: Attempt, events: list[SSEEvent]) -> None: ...

    def bodyEnded(self, attempt: Attempt, reason: Failure) -> None:
        """The event stream's body ended (its events were all handed over first)."""


class Request(Protocol):
    """Where and how: what the attempt needs to know of its stream's upstream."""

    where: str
    path: str
    hint: str
    optionPrefix: str


class _Body(TwistedProtocol):
    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt

    def connectionMade(self) -> None:
        self.attempt._bodyConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.attempt._bodyData(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.attempt._bodyEnded(reason)


class Attempt:
    def __init__(
        self,
        owner: AttemptOwner,
        reactor: IReactorTime,
        settings: UpstreamSettings,
        http: UpstreamHTTPClient,
        uri: bytes,
        headers: dict[bytes, list[bytes]],
        body: bytes,
        request: Request,
        pooled: bool,
    ) -> None:
        self.owner = owner
        self.reactor = reactor
        self.settings = settings
        self.request = request
        #: Whether the connection may be a reused one (a stale one is retried once).
        self.pooled = pooled
        self.parser = SSEParser()
        self.sawEvent = False
        self.over = False
        self._http, self._uri, self._headers, self._body = http, uri, headers, body
        self._paused = False
        self._pending: Deferred[IResponse] | None = None
        self._errorBody: Deferred[bytes] | None = None
        self._transport: Any = None
        self._timer: IDelayedCall | None = None
        self._lastData = 0.0
        self._drainTimer: IDelayedCall | None = None
        self._drained: Any = None

    def start(self) -> None:
        self._arm()
        before = self._http.newConnections()
        pending: Deferred[IResponse] = maybeDeferred(self._http.postStream, self._uri, Headers(self._headers), self._body)
        if before is not None and self._http.newConnections() != before:
            self.pooled = False  # the pool connected anew: no stale connection to blame
        self._pending = pending
        pending.addCallbacks(self._gotResponse, self._requestFailed)

    # The response --------------------------------------------------------------

    def _requestFailed(self, failure: Failure) -> None:
        self._pending = None
        if self.over:
            return
        fault = connectionFault(failure, self.request.where, self.settings.connect_timeout, self.request.optionPrefix)
        # A handshake that failed was a new connection, not a stale reused one.
        self._report(fault, stale=self.pooled and neverAnswered(failure) and not isTLSFailure(failure))

    def _gotResponse(self, response: IResponse) -> None:
        self._pending = None
        if self.over:
            discard(response)
            return
        if response.code != 200:
            self._readError(response)
            return
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if not contentType.lower().startswith(b"text/event-stream"):
            discard(response)
            self._report(
                Fault.backendError(
                    f"{self.request.where} answered {self.request.path} with Content-Type "
                    f"{contentType.decode('latin-1') or '(none)'} instead of an event stream; check {self.request.hint}"
                )
            )
            return
        response.deliverBody(_Body(self))
        # deliverBody resumes the transport after connecting us, undoing a
        # pause applied in _bodyConnected; apply it again.
        if self._paused and self._transport is not None:
            self._transport.pauseProducing()

    def _readError(self, response: IResponse) -> None:
        """
        Read (some of) an error answer's body for its message.  The status
        says what happened, so a body that never ends is cut at the idle
        timeout and the status reported with what came of it.
        """
        self._disarm()
        collector = BodyCollector(MAX_BODY_READ)
        response.deliverBody(collector)
        self._errorBody = collector.finished
        status, retry = response.code, response.headers.getRawHeaders(b"retry-after")

        def enough() -> None:
            collector._hangUp()
            collector._fire()

        timer = self.reactor.callLater(self.settings.idle_timeout, enough)

        def read(body: bytes) -> None:
            if timer.active():
                timer.cancel()
            self._httpError(status, body, retry)

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            if not failure.check(CancelledError) and not self.over:
                self._report(Fault.backendError(f"{self.request.where} answered HTTP {status}; its body could not be read"))

        collector.finished.addCallback(read).addErrback(failed)

    def _httpError(self, status: int, body: bytes, retry: list[bytes] | None) -> None:
        self._errorBody = None
        if not self.over:
            r = self.request
            try:
                fault = httpFault(status, body, r.where, r.path, r.hint, retry)
            except Exception as e:  # whatever the body held, the status is still the answer
                fault = Fault.backendError(f"{r.where} answered HTTP {status} ({type(e).__name__} reading its body)")
            self._report(fault)

    # The body ------------------------------------------------------------------

    def _bodyConnected(self, transport: Any) -> None:
        self._transport = transport
        if self.over:
            self._abortTransport()
        elif self._paused:
            transport.pauseProducing()
            self._disarm()

    def _bodyData(self, data: bytes) -> None:
        if self.over:
            return
        try:
            events = self.parser.feed(data)
        except SSEError as e:
            self._report(Fault.backendError(f"{self.request.where} sent a malformed event stream: {e}"))
            return
        if not events:
            # Keep-alive comments alone do not show a stream that is making
            # progress: only events move the clocks.
            return
        if not self.sawEvent:
            self.sawEvent = True
            # An answer has started: whatever back-off the upstream was in is
            # over (not on the headers alone: a crashing worker behind a proxy
            # sends those and then drops the connection).
            self.owner.attemptStreaming(self)
            if self.over:
                return
            if not self._paused:
                self._arm()  # the first-event clock gives way to the idle clock
        self._lastData = self.reactor.seconds()
        self.owner.eventsArrived(self, events)

    def _bodyEnded(self, reason: Failure) -> None:
        self._transport = None
        if self._drained is not None:
            self._endDrain()
            return
        if self.over:
            return
        self._disarm()
        last = self.parser.finish()
        if last is not None:
            self.owner.eventsArrived(self, [last])
        if not self.over:
            self.owner.bodyEnded(self, reason)

    # Flow ----------------------------------------------------------------------

    def pause(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pauseProducing()
            self._disarm()  # we stopped reading: silence from here on is ours, not the upstream's

    def resume(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resumeProducing()
            self._arm()

    # Ending --------------------------------------------------------------------

    def _report(self, fault: Fault, stale: bool = False) -> None:
        self.abandon()
        self.owner.attemptFailed(self, fault, stale)

    def abandon(self) -> None:
        """Close the HTTP request now (the upstream stops generating and frees its slot) and go quiet."""
        self.over = True
        self._disarm()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._errorBody is not None:
            errorBody, self._errorBody = self._errorBody, None
            errorBody.cancel()
        self._abortTransport()

    def drainRest(self, registry: set[Attempt]) -> None:
        """
        The answer is complete: read the rest of the body (the final event, the
        chunked terminator) so the connection can go back to the pool, for the
        idle timeout at most.  ``registry`` holds it meanwhile, so stopping the
        backend can close it.
        """
        self.over = True
        self._disarm()
        if self._transport is None:
            return
        self._drained = registry
        registry.add(self)
        self._drainTimer = self.reactor.callLater(self.settings.idle_timeout, self.stopDraining)
        self._transport.resumeProducing()

    def stopDraining(self) -> None:
        self._abortTransport()
        self._endDrain()

    def _endDrain(self) -> None:
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        self._drainTimer = None
        if self._drained is not None:
            self._drained.discard(self)
            self._drained = None

    def _abortTransport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            # The body's transport is a TransportProxyProducer, whose
            # stopProducing closes the TCP connection.
            transport.stopProducing()

    # Timers --------------------------------------------------------------------

    def _arm(self) -> None:
        """Start the clock that applies now: first-event until an event came, idle after."""
        self._disarm()
        if self.over:
            return
        if self.sawEvent:
            self._lastData = self.reactor.seconds()
            self._timer = self.reactor.callLater(self.settings.idle_timeout, self._idleExpired)
        else:
            self._timer = self.reactor.callLater(self.settings.first_event_timeout, self._firstEventExpired)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _firstEventExpired(self) -> None:
        self._timer = None
        r = self.request
        # The prompt may be what takes long: not held against the upstream.
        self._report(
            Fault(
                ErrorCode.TIMEOUT,
                f"{r.where} sent no event within {self.settings.first_event_timeout:g}s of the request "
                f"(--{r.optionPrefix}-first-event-timeout); it may be overloaded or stuck",
            )
        )

    def _idleExpired(self) -> None:
        self._timer = None
        # Data only records when it came (one float per event, no timer
        # churn); the clock checks, when it fires, whether it really expired.
        quiet = self.reactor.seconds() - self._lastData
        if quiet < self.settings.idle_timeout:
            self._timer = self.reactor.callLater(self.settings.idle_timeout - quiet, self._idleExpired)
            return
        r = self.request
        self._report(
            Fault(
                ErrorCode.TIMEOUT,
                f"{r.where} sent nothing for {self.settings.idle_timeout:g}s mid-stream "
                f"(--{r.optionPrefix}-idle-timeout)",
                unhealthy=True,
            )
        )
