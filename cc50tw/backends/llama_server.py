"""
The llama-server backend: CC50 requests bridged to llama.cpp's HTTP server.

Each request is one streaming HTTP POST through treq, over a persistent
connection pool, and its body is parsed as Server-Sent Events as it arrives
(never buffered whole).  The per-request ``UpstreamStream`` is the
``IPushProducer`` the CC50 sink pauses: pausing stops reading the HTTP body,
so the upstream's own TCP window closes and backpressure reaches the model;
cancelling closes the HTTP connection, which is how llama-server learns to
stop generating and free its slot.

Three upstream dialects share that machinery: llama.cpp's native
``/completion`` and the OpenAI-compatible ``/v1/completions`` and
``/v1/chat/completions`` (which vLLM, TGI and Ollama also speak).  The
dialect classes and ``UpstreamStream`` are meant to be reused by an
OpenAI-compatible backend; only the options and the start-up check are
llama-server's own.

Every way a request can fail ends as one ``BackendError`` whose message says
what happened and where, with the CC50 error code a program can act on:
UPSTREAM_UNAVAILABLE (not reachable, loading, went away: retry later),
TIMEOUT (connect, first event or idle timeout) and BACKEND_ERROR (the
upstream rejected the request or spoke something we cannot parse).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from cc50tw.backends import BackendSpec
from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult, IBackend, InferenceRequest, ITokenSink
from cc50tw.sse import SSEError, SSEEvent, SSEParser, TextAssembler

DEFAULT_URL = "http://127.0.0.1:8080"
ENDPOINTS = ("/completion", "/v1/completions", "/v1/chat/completions")

#: Seconds to establish the TCP connection; an upstream on the same host or
#: network answers in milliseconds, so a few seconds means it is not there.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds from sending the request to its first event: prompt processing on
#: a CPU, and waiting for a free slot when all ``-np`` slots are busy, both
#: count here, so it is generous.
DEFAULT_FIRST_EVENT_TIMEOUT = 300.0
#: Seconds without a byte once the stream has started: a generating server
#: sends one event per token, so a long silence means it is stuck.
DEFAULT_IDLE_TIMEOUT = 60.0

#: Idle connections kept per upstream; only their reuse is capped, not how
#: many requests run at once (the upstream's ``-np`` slots decide that).
MAX_PERSISTENT_PER_HOST = 64
#: Below cpp-httplib's 5 s keep-alive, so we drop an idle connection before
#: llama-server does, rather than racing its close with a new request.
CACHED_CONNECTION_TIMEOUT = 4
#: How much of an error response we read for its message.
MAX_ERROR_BODY = 64 * 1024


# Dialects ------------------------------------------------------------------


@attrs.define
class Progress:
    """What one stream has learned from its events so far."""

    finished: bool = False
    sawFinishReason: bool = False
    events: int = 0
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    stop_type: str | None = None


class Dialect(Protocol):
    """How to ask one kind of upstream API for a stream, and how to read it."""

    @property
    def path(self) -> str:
        """Where the API lives under the upstream's base URL."""

    @property
    def description(self) -> str:
        """A few words for the startup log."""

    def requestBody(self, request: InferenceRequest) -> dict[str, Any]:
        """The JSON body that starts a streaming generation for ``request``."""

    def interpret(self, event: SSEEvent, progress: Progress) -> str:
        """Text carried by ``event`` (maybe ``""``); updates ``progress``; raises ``BackendError``."""

    def endedCleanly(self, progress: Progress) -> bool:
        """Whether a body that ended without the terminal event still counts as complete."""


def _loadEvent(event: SSEEvent, upstream: str) -> dict[str, Any]:
    try:
        value = json.loads(event.data)
    except ValueError as e:
        raise BackendError(
            f"{upstream} sent an event that is not JSON ({e}): {event.data[:200]!r}", ErrorCode.BACKEND_ERROR
        ) from None
    if not isinstance(value, dict):
        raise BackendError(f"{upstream} sent an event that is not a JSON object: {event.data[:200]!r}")
    if value.get("error") is not None:
        raise BackendError(f"{upstream} failed mid-stream: {_errorMessage(value)}")
    return value


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _string(value: object, what: str, upstream: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BackendError(f"{upstream} sent {what} that is not a string: {value!r:.200}")
    return value


@attrs.frozen
class CompletionDialect:
    """llama.cpp's native ``/completion``: ``content`` per event, counts on ``stop: true``."""

    upstream: str
    path: str = "/completion"
    description: str = "llama.cpp /completion"

    def requestBody(self, request: InferenceRequest) -> dict[str, Any]:
        return {"prompt": request.prompt, "n_predict": request.max_tokens, "stream": True, "cache_prompt": True}

    def interpret(self, event: SSEEvent, progress: Progress) -> str:
        value = _loadEvent(event, self.upstream)
        text = _string(value.get("content"), "content", self.upstream)
        predicted = _count(value.get("tokens_predicted"))
        evaluated = _count(value.get("tokens_evaluated"))
        if predicted is not None:
            progress.generated_tokens = predicted
        if evaluated is not None:
            progress.prompt_tokens = evaluated
        if value.get("stop") is True:
            progress.finished = True
            stopType = value.get("stop_type")
            progress.stop_type = stopType if isinstance(stopType, str) else None
        return text

    def endedCleanly(self, progress: Progress) -> bool:
        return False  # llama-server always sends a final event with stop: true


@attrs.frozen
class OpenAICompletionsDialect:
    """
    OpenAI-style ``/v1/completions`` (and, with ``chat``, ``/v1/chat/completions``).

    The stream ends with ``data: [DONE]``; counts come from ``usage``, asked
    for with ``stream_options.include_usage`` and carried either by the last
    chunk with choices (llama-server's ``/v1/completions``) or by a chunk
    with none (OpenAI, vLLM, llama-server's chat).  ``llamaExtensions`` adds
    llama-server's ``cache_prompt``, which strict upstreams might reject.
    """

    upstream: str
    chat: bool = False
    llamaExtensions: bool = True

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    @property
    def description(self) -> str:
        return f"OpenAI-compatible {self.path}"

    def requestBody(self, request: InferenceRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.llamaExtensions:
            body["cache_prompt"] = True
        return body

    def interpret(self, event: SSEEvent, progress: Progress) -> str:
        if event.data.strip() == "[DONE]":
            progress.finished = True
            return ""
        value = _loadEvent(event, self.upstream)
        usage = value.get("usage")
        if isinstance(usage, dict):
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
            if prompt is not None:
                progress.prompt_tokens = prompt
            if completion is not None:
                progress.generated_tokens = completion
        choices = value.get("choices")
        if choices is None:
            return ""
        if not isinstance(choices, list):
            raise BackendError(f"{self.upstream} sent 'choices' that is not a list: {choices!r:.200}")
        pieces = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # we ask for one choice; ignore any other
            if self.chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    pieces.append(_string(delta.get("content"), "delta.content", self.upstream))
            else:
                pieces.append(_string(choice.get("text"), "text", self.upstream))
            reason = choice.get("finish_reason")
            if reason is not None:
                progress.sawFinishReason = True
                progress.stop_type = str(reason)
        return "".join(pieces)

    def endedCleanly(self, progress: Progress) -> bool:
        # Some OpenAI-compatible servers end the body without [DONE]; a choice
        # that said why it finished is as good a terminal event.
        return progress.sawFinishReason


def dialectFor(endpoint: str, upstream: str, llamaExtensions: bool = True) -> Dialect:
    """The dialect spoken at ``endpoint``, one of ``ENDPOINTS``."""
    if endpoint == "/completion":
        return CompletionDialect(upstream)
    if endpoint == "/v1/completions":
        return OpenAICompletionsDialect(upstream, chat=False, llamaExtensions=llamaExtensions)
    if endpoint == "/v1/chat/completions":
        return OpenAICompletionsDialect(upstream, chat=True, llamaExtensions=llamaExtensions)
    raise ValueError(f"unknown endpoint {endpoint!r}; choose one of {', '.join(ENDPOINTS)}")


def _errorMessage(value: object) -> str:
    """The human part of an error body in llama-server's, OpenAI's or a plain shape."""
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail") or inner.get("msg")
            if message:
                return str(message)
            return json.dumps(inner)[:500]
        if isinstance(inner, str):
            return inner
        detail = value.get("detail") or value.get("message")
        if detail:
            return str(detail)
    return json.dumps(value)[:500]


def _bodyMessage(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        return _errorMessage(json.loads(text))
    except ValueError:
        return text[:500] or "(empty body)"


# One request ---------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body written in one go.

    treq turns ``bytes`` into a ``FileBodyProducer``, which writes from a
    ``Cooperator`` task one reactor turn later; a prompt is small, and that
    turn would be added to every request's time to first token.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    Connects to IP-literal upstreams directly, and to host names as ``Agent`` would.

    ``Agent``'s own endpoints resolve every host, an IP address too, with
    ``getaddrinfo`` in a thread: a few hundred microseconds per connection.
    That matters because llama-server closes its connection after every
    streamed answer, so nearly every request opens a new one.
    """

    def __init__(self, reactor: Any, connectTimeout: float) -> None:
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, timeout=self.connectTimeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, timeout=self.connectTimeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.connectTimeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def upstreamAgent(reactor: Any, connectTimeout: float, pool: HTTPConnectionPool) -> IAgent:
    """An ``Agent`` for upstream requests, over ``UpstreamEndpoints``."""
    return Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor, connectTimeout), pool=pool)


def _bodyProducer(data: Any) -> IBodyProducer:
    return _BytesProducer(data) if isinstance(data, bytes) else IBodyProducer(data)


def makeHTTPClient(agent: IAgent) -> HTTPClient:
    """A treq client over ``agent`` that sends ``bytes`` bodies without a reactor turn."""
    return HTTPClient(agent, data_to_body_producer=_bodyProducer)


class _SSEBody(TwistedProtocol):
    """Hands the HTTP body's bytes, and its end, to the stream that owns it."""

    def __init__(self, stream: UpstreamStream) -> None:
        self.stream = stream

    def connectionMade(self) -> None:
        self.stream._bodyConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.stream._bodyData(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stream._bodyEnded(reason)


class _ErrorBodyCollector(TwistedProtocol):
    """Reads at most ``limit`` bytes of an error response, then hangs up."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(lambda _: self._hangUp())

    def dataReceived(self, data: bytes) -> None:
        if self.size >= self.limit:
            return
        self.chunks.append(data[: self.limit - self.size])
        self.size += len(self.chunks[-1])
        if self.size >= self.limit:
            self._hangUp()
            self._fire()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fire()

    def _fire(self) -> None:
        if not self.finished.called:
            self.finished.callback(b"".join(self.chunks))

    def _hangUp(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class _Upstream(Protocol):
    """What an ``UpstreamStream`` needs from its backend."""

    reactor: IReactorTime
    http: HTTPClient
    freshHTTP: HTTPClient
    url: str
    upstream_name: str
    connect_timeout: float
    first_event_timeout: float
    idle_timeout: float


@implementer(IPushProducer)
class UpstreamStream:
    """
    One CC50 request as one streaming HTTP request.

    It is the sink's push producer: ``pauseProducing`` pauses the HTTP body's
    transport (and the timers, since a paused stream is not the upstream's
    fault); ``stopProducing`` and cancelling ``done`` close the connection.
    Events already parsed when a pause arrives wait in ``_events`` (at most
    one TCP read's worth) and are written on resume.
    """

    log = Logger()

    def __init__(self, backend: _Upstream, dialect: Dialect, request: InferenceRequest, sink: ITokenSink) -> None:
        self._backend = backend
        self._dialect = dialect
        self._request = request
        self._sink = sink
        self._parser = SSEParser()
        self._text = TextAssembler()
        self._events: deque[SSEEvent] = deque()
        self.progress = Progress()
        self._paused = False
        self._ended = False  # done has fired or been cancelled: nothing more happens
        self._draining = False
        self._attempts = 0
        self._pending: Deferred[IResponse] | None = None  # the request, until headers arrive
        self._errorBody: Deferred[bytes] | None = None  # an error response's body, being read
        self._transport: Any = None  # the HTTP body's transport, while it is being read
        self._bodyEnd: Failure | None = None
        self._timer: IDelayedCall | None = None
        self._lastData = 0.0  # when the body last brought bytes, once streaming
        self._sawEvent = False
        self._chunks = 0
        self.done: Deferred[GenerationResult] = Deferred(self._cancelled)

    @property
    def _where(self) -> str:
        return f"{self._backend.upstream_name} at {self._backend.url}"

    # Starting --------------------------------------------------------------

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        self._send()

    def _send(self) -> None:
        self._attempts += 1
        body = json.dumps(self._dialect.requestBody(self._request)).encode("utf-8")
        self._armTimer()
        http = self._backend.http if self._attempts == 1 else self._backend.freshHTTP
        pending: Deferred[IResponse] = http.post(  # type: ignore[assignment]
            self._backend.url + self._dialect.path,
            data=body,
            headers=Headers({b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}),
            unbuffered=True,
        )
        self._pending = pending
        pending.addCallbacks(self._gotResponse, self._requestFailed)

    def _requestFailed(self, failure: Failure) -> None:
        self._pending = None
        if self._ended:
            return
        if failure.check(netError.TimeoutError):
            self._fail(
                f"could not connect to {self._where} within {self._backend.connect_timeout:g}s "
                "(--llama-connect-timeout)",
                ErrorCode.TIMEOUT,
            )
        elif failure.check(netError.ConnectError, netError.DNSLookupError):
            self._fail(
                f"{self._where} is not reachable ({failure.getErrorMessage()}); is llama-server running?",
                ErrorCode.UPSTREAM_UNAVAILABLE,
            )
        elif _neverAnswered(failure):
            if self._attempts == 1:
                # A pooled keep-alive connection the upstream closed as we
                # reused it.  llama-server closes its connection after every
                # streamed answer, while advertising keep-alive, so the pool
                # hands out such a connection whenever a request starts in
                # the instant after another ended.  Retry once on a brand new
                # connection: another pooled one might be just as dead.
                self.log.debug("retrying request {req_id}: {reason}", req_id=self._request.req_id, reason=failure)
                self._send()
                return
            self._fail(f"{self._where} closed the connection before answering", ErrorCode.UPSTREAM_UNAVAILABLE)
        elif failure.check(ResponseFailed):
            self._fail(
                f"{self._where} closed the connection while sending its response headers",
                ErrorCode.UPSTREAM_UNAVAILABLE,
            )
        else:
            self._fail(f"request to {self._where} failed: {failure.getErrorMessage()}", ErrorCode.BACKEND_ERROR)

    def _gotResponse(self, response: IResponse) -> None:
        self._pending = None
        if self._ended:
            return
        if response.code != 200:
            self._readError(response)
            return
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if not contentType.lower().startswith(b"text/event-stream"):
            self._fail(
                f"{self._where} answered {self._dialect.path} with Content-Type "
                f"{contentType.decode('latin-1') or '(none)'} instead of an event stream; "
                "is --llama-endpoint a streaming completion API?",
                ErrorCode.BACKEND_ERROR,
            )
            _discard(response)
            return
        response.deliverBody(_SSEBody(self))
        # deliverBody resumes the transport after connecting us, undoing any
        # pause we applied in _bodyConnected; apply it again.
        if self._paused and self._transport is not None:
            self._transport.pauseProducing()

    def _readError(self, response: IResponse) -> None:
        collector = _ErrorBodyCollector(MAX_ERROR_BODY)
        response.deliverBody(collector)
        self._errorBody = collector.finished
        code = response.code
        collector.finished.addCallbacks(lambda body: self._httpError(code, body), lambda f: f.trap(CancelledError))

    def _httpError(self, code: int, body: bytes) -> None:
        self._errorBody = None
        if self._ended:
            return
        message = _bodyMessage(body)
        if code == 503:
            self._fail(
                f"{self._where} is not ready (HTTP 503: {message}); it may still be loading its model, retry later",
                ErrorCode.UPSTREAM_UNAVAILABLE,
            )
        elif code == 404:
            self._fail(
                f"{self._where} has no {self._dialect.path} (HTTP 404: {message}); check --llama-endpoint",
                ErrorCode.BACKEND_ERROR,
            )
        else:
            self._fail(f"{self._where} rejected the request: HTTP {code}: {message}", ErrorCode.BACKEND_ERROR)

    # The body ----------------------------------------------------------------

    def _bodyConnected(self, transport: Any) -> None:
        self._transport = transport
        if self._ended:
            self._abortTransport()
        elif self._paused:
            transport.pauseProducing()
            self._cancelTimer()

    def _bodyData(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            events = self._parser.feed(data)
        except SSEError as e:
            self._fail(f"{self._where} sent a malformed event stream: {e}", ErrorCode.BACKEND_ERROR)
            return
        if events:
            self._events.extend(events)
            if not self._sawEvent:
                self._sawEvent = True
                if not self._paused:
                    self._armTimer()  # the first-event clock gives way to the idle clock
        if self._sawEvent:
            # Any byte (a keep-alive comment too) shows the stream is alive;
            # before the first event, only an event stops the first-event clock.
            self._lastData = self._backend.reactor.seconds()
        self._drain()

    def _bodyEnded(self, reason: Failure) -> None:
        self._transport = None
        if self._ended:
            return
        self._bodyEnd = reason
        self._cancelTimer()
        self._drain()

    def _drain(self) -> None:
        """Write queued events' text, one write per event, until paused, finished, or out of events."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._events and not self._paused and not self._ended:
                event = self._events.popleft()
                self.progress.events += 1
                try:
                    text = self._dialect.interpret(event, self.progress)
                except BackendError as e:
                    self._fail(e.message, e.code)
                    return
                text = self._text.text(text)
                if text:
                    self._chunks += 1
                    self._sink.write(text)  # may pause us: the loop then stops before the next event
                if self.progress.finished:
                    self._finish()
                    return
        finally:
            self._draining = False
        if not self._events and self._bodyEnd is not None and not self._ended:
            self._bodyFinished(self._bodyEnd)

    def _bodyFinished(self, reason: Failure) -> None:
        """The body ended before the dialect's terminal event."""
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if clean and self._dialect.endedCleanly(self.progress):
            self._finish()
        elif clean:
            self._fail(
                f"{self._where} ended the stream without its final event (after {self.progress.events} events)",
                ErrorCode.BACKEND_ERROR,
            )
        else:
            self._fail(
                f"{self._where} closed the connection mid-stream (after {self.progress.events} events); "
                "it may have crashed or been restarted",
                ErrorCode.UPSTREAM_UNAVAILABLE,
            )

    # Ending ------------------------------------------------------------------

    def _finish(self) -> None:
        tail = self._text.finish()
        if tail:
            self._sink.write(tail)
        self._end()
        if self._transport is not None:
            # Let the rest of the body (normally just the chunked terminator)
            # drain so the connection goes back to the pool for the next request.
            self._transport.resumeProducing()
        progress = self.progress
        generated = progress.generated_tokens
        if generated is None:
            # An upstream that reports no counts: chunks are the best estimate.
            generated = self._chunks
        self.done.callback(GenerationResult(progress.prompt_tokens or 0, generated))

    def _fail(self, message: str, code: ErrorCode) -> None:
        if self._ended:
            return
        self._end()
        self._abort()
        self.done.errback(BackendError(message, code))

    def _end(self) -> None:
        self._ended = True
        self._events.clear()
        self._cancelTimer()
        self._sink.unregisterProducer()

    def _cancelled(self, _: Deferred[GenerationResult]) -> None:
        """The server gave up on the request (client cancelled or went away)."""
        if not self._ended:
            self._end()
            self._abort()

    def _abort(self) -> None:
        """Close the upstream HTTP request now, so it stops generating and frees its slot."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._errorBody is not None:
            errorBody, self._errorBody = self._errorBody, None
            errorBody.cancel()
        self._abortTransport()

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

    # Timers ------------------------------------------------------------------

    def _armTimer(self) -> None:
        """Start the clock that applies now: first-event until an event came, idle after."""
        self._cancelTimer()
        if self._sawEvent:
            self._lastData = self._backend.reactor.seconds()
            self._timer = self._backend.reactor.callLater(self._backend.idle_timeout, self._idleExpired)
        else:
            self._timer = self._backend.reactor.callLater(self._backend.first_event_timeout, self._firstEventExpired)

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _firstEventExpired(self) -> None:
        self._timer = None
        self._fail(
            f"{self._where} sent no event within {self._backend.first_event_timeout:g}s of the request "
            "(--llama-first-event-timeout); it may be overloaded or stuck",
            ErrorCode.TIMEOUT,
        )

    def _idleExpired(self) -> None:
        self._timer = None
        # Data only records when it came (one float per event, no timer
        # churn); the clock checks, when it fires, whether it really expired.
        quiet = self._backend.reactor.seconds() - self._lastData
        if quiet < self._backend.idle_timeout:
            self._timer = self._backend.reactor.callLater(self._backend.idle_timeout - quiet, self._idleExpired)
            return
        self._fail(
            f"{self._where} sent nothing for {self._backend.idle_timeout:g}s mid-stream "
            f"(--llama-idle-timeout), after {self.progress.events} events",
            ErrorCode.TIMEOUT,
        )

    # IPushProducer -----------------------------------------------------------

    def pauseProducing(self) -> None:
        if self._paused or self._ended:
            return
        self._paused = True
        if self._transport is not None:
            self._transport.pauseProducing()
            # We stopped reading: silence from here on is ours, not the upstream's.
            self._cancelTimer()

    def resumeProducing(self) -> None:
        if not self._paused or self._ended:
            return
        self._paused = False
        if self._transport is not None:
            self._transport.resumeProducing()
            self._armTimer()
        self._drain()

    def stopProducing(self) -> None:
        self._fail("the CC50 request was stopped", ErrorCode.CANCELLED)


def _neverAnswered(failure: Failure) -> bool:
    from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

    return failure.check(ResponseNeverReceived, RequestTransmissionFailed) is not None


def _discard(response: IResponse) -> None:
    """Close a response whose body we do not want (it is not returned to the pool)."""
    collector = _ErrorBodyCollector(0)
    response.deliverBody(collector)
    collector._hangUp()


# The backend ---------------------------------------------------------------


@implementer(IBackend)
class LlamaServerBackend:
    """Streams completions from one llama-server (or OpenAI-compatible) upstream."""

    name = "llama_server"
    #: How error messages name the upstream.
    upstream_name = "llama-server"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str = DEFAULT_URL,
        endpoint: str = "/completion",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        first_event_timeout: float = DEFAULT_FIRST_EVENT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        http: HTTPClient | None = None,
        pool: HTTPConnectionPool | None = None,
        freshHTTP: HTTPClient | None = None,
    ) -> None:
        self.reactor = reactor
        self.url = normalizeURL(url)
        self.endpoint = endpoint
        self.dialect = dialectFor(endpoint, f"llama-server at {self.url}")
        self.connect_timeout = connect_timeout
        self.first_event_timeout = first_event_timeout
        self.idle_timeout = idle_timeout
        if http is None:
            if pool is None:
                pool = HTTPConnectionPool(reactor, persistent=True)
                pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
                pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
            http = makeHTTPClient(upstreamAgent(reactor, connect_timeout, pool))
        if freshHTTP is None:
            if pool is None:
                freshHTTP = http  # a test's client: it decides what a connection is
            else:
                freshPool = HTTPConnectionPool(reactor, persistent=False)
                freshHTTP = makeHTTPClient(upstreamAgent(reactor, connect_timeout, freshPool))
        self.pool = pool
        self.http = http
        #: Always a new connection: for the one retry after a pooled
        #: connection turned out to be closed (see ``UpstreamStream``).
        self.freshHTTP = freshHTTP
        #: Streams that have not ended; tests and metrics read its size.
        self.active: set[UpstreamStream] = set()

    def describe(self) -> str:
        return (
            f"llama-server at {self.url}{self.endpoint} ({self.dialect.description}); timeouts: "
            f"connect {self.connect_timeout:g}s, first event {self.first_event_timeout:g}s, "
            f"idle {self.idle_timeout:g}s"
        )

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        stream = UpstreamStream(self, self.dialect, request, sink)
        self.active.add(stream)

        def forget(result: object) -> object:
            self.active.discard(stream)
            return result

        stream.done.addBoth(forget)
        stream.start()
        return stream.done

    def startBackend(self) -> Deferred[None]:
        """Check ``/health`` once and log what it says; never refuse to start."""
        probed = self.probeHealth()
        probed.addCallback(lambda probe: self.log.info("{message}", message=probe[1]))
        return probed.addCallback(lambda _: None)

    def checkHealth(self) -> Deferred[bool]:
        """Whether llama-server's ``/health`` says it can serve now (never fails)."""
        return self.probeHealth().addCallback(lambda probe: probe[0])

    def probeHealth(self) -> Deferred[tuple[bool, str]]:
        """Ask ``/health``: whether the upstream is ready, and a sentence for the log; never fails."""
        where = f"llama-server at {self.url}"
        got: Deferred[Any] = self.http.get(self.url + "/health", timeout=self.connect_timeout + 5)

        def answered(response: Any) -> Deferred[tuple[bool, str]]:
            body: Deferred[bytes] = treq.content(response)

            def read(data: bytes) -> tuple[bool, str]:
                if response.code == 200:
                    return True, f"{where} is healthy ({data.decode('utf-8', 'replace').strip()[:200]})"
                if response.code == 503:
                    return False, (
                        f"{where} is up but not ready (HTTP 503: {_bodyMessage(data)}); requests will get "
                        "UPSTREAM_UNAVAILABLE until it has loaded its model"
                    )
                return False, f"{where} answered /health with HTTP {response.code}: {_bodyMessage(data)}"

            return body.addCallback(read)

        def failed(failure: Failure) -> tuple[bool, str]:
            if failure.check(CancelledError):
                reason = "no answer in time"
            else:
                reason = failure.getErrorMessage()
            return False, (
                f"{where} is not reachable ({reason}); requests will get UPSTREAM_UNAVAILABLE until it comes up"
            )

        got.addCallbacks(answered, failed)
        got.addErrback(failed)
        return got

    def stopBackend(self) -> Deferred[None]:
        for stream in list(self.active):
            stream.stopProducing()
        if self.pool is None:
            return succeed(None)
        closing: Deferred[None] = self.pool.closeCachedConnections()
        return closing


def normalizeURL(url: str) -> str:
    """``url`` without a trailing slash, after checking it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--llama-url must be an http:// or https:// URL with a host, got {url!r}")
    return url.rstrip("/")


def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return number


def _endpoint(value: str) -> str:
    if value not in ENDPOINTS:
        raise ValueError(f"must be one of {', '.join(ENDPOINTS)}, got {value!r}")
    return value


def build(options: Mapping[str, Any], reactor: Any) -> LlamaServerBackend:
    return LlamaServerBackend(
        reactor,
        url=options["llama-url"],
        endpoint=options["llama-endpoint"],
        connect_timeout=options["llama-connect-timeout"],
        first_event_timeout=options["llama-first-event-timeout"],
        idle_timeout=options["llama-idle-timeout"],
    )


SPEC = BackendSpec(
    name="llama_server",
    description="streams from llama.cpp's llama-server (or an OpenAI-compatible server) over HTTP",
    options=[
        ["llama-url", None, DEFAULT_URL, "Base URL of llama-server (llama_server backend).", str],
        [
            "llama-endpoint",
            None,
            "/completion",
            "Upstream API: /completion (llama.cpp native), /v1/completions or /v1/chat/completions.",
            _endpoint,
        ],
        [
            "llama-connect-timeout",
            None,
            DEFAULT_CONNECT_TIMEOUT,
            "Seconds to connect to llama-server before a request fails with TIMEOUT.",
            _seconds,
        ],
        [
            "llama-first-event-timeout",
            None,
            DEFAULT_FIRST_EVENT_TIMEOUT,
            "Seconds from request to llama-server's first event (prompt processing, queueing for a slot).",
            _seconds,
        ],
        [
            "llama-idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds without data from llama-server mid-stream before the request fails with TIMEOUT.",
            _seconds,
        ],
    ],
    build=build,
)
