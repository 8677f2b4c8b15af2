"""
Streaming completions from HTTP inference servers: the machinery that the
``llama_server`` and ``openai`` backends share.

Each request is one streaming HTTP POST through treq, over a persistent
connection pool, and its body is parsed as Server-Sent Events (by the one
``cc50tw.sse.SSEParser``) as it arrives, never buffered whole.  The
per-request ``UpstreamStream`` is the ``IPushProducer`` the CC50 sink
pauses: pausing stops reading the HTTP body, so the upstream's own TCP
window closes and backpressure reaches the model; cancelling closes the HTTP
connection, which is how the upstream learns to stop generating and free
its slot.

Three upstream dialects share that machinery: llama.cpp's native
``/completion`` and the OpenAI-compatible ``/v1/completions`` and
``/v1/chat/completions`` (which vLLM, TGI, Ollama and llama-server speak).

``HTTPStreamingBackend`` puts it together over an ``UpstreamPool``
(``cc50tw.backends.pool``): each request goes to the least-loaded upstream
that is up; a connection failure or 5xx before anything was streamed takes
that upstream out of routing for a while and moves the request, once, to
another one; a poller checks every upstream's health URL.  The concrete
backends only add their options, their dialect and their headers.

Every way a request can fail ends as one ``BackendError`` whose message says
what happened and where, with the CC50 error code a program can act on:
UPSTREAM_UNAVAILABLE (not reachable, loading, went away: retry later),
TIMEOUT (connect, first event or idle timeout) and BACKEND_ERROR (the
upstream rejected the request or spoke something we cannot parse).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred, succeed
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
from twisted.internet.task import LoopingCall
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

from cc50tw.backends.pool import DEFAULT_BACKOFF, Upstream, UpstreamCollector, UpstreamPool
from cc50tw.backends.warmpool import WarmConnectionPool
from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult, IBackend, IBackendMetrics, InferenceRequest, ITokenSink
from cc50tw.sse import SSEError, SSEEvent, SSEParser, TextAssembler

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
#: Seconds between health checks of each upstream (0: no polling).
DEFAULT_HEALTH_INTERVAL = 5.0

#: Idle connections kept per upstream; only their reuse is capped, not how
#: many requests run at once (the upstream's ``-np`` slots decide that).
MAX_PERSISTENT_PER_HOST = 64
#: Below cpp-httplib's 5 s keep-alive, so we drop an idle connection before
#: llama-server does, rather than racing its close with a new request.
CACHED_CONNECTION_TIMEOUT = 4
#: How much of an error response (for its message) or a health answer we read.
MAX_BODY_READ = 64 * 1024


# Dialects ------------------------------------------------------------------


@attrs.define
class Progress:
    """What one stream has learned from its events so far."""

    #: The request's max_tokens: the answer is complete once that many were streamed.
    limit: int = 0
    #: Tokens the events carried so far (llama.cpp's per-event ``tokens`` lists).
    streamedTokens: int = 0
    finished: bool = False
    sawFinishReason: bool = False
    events: int = 0
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    stop_type: str | None = None

    def count(self, prompt: object, generated: object) -> None:
        """Take the counts an event carries, where they are counts (each may be missing)."""
        prompt, generated = _count(prompt), _count(generated)
        if prompt is not None:
            self.prompt_tokens = prompt
        if generated is not None:
            self.generated_tokens = generated


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
        progress.count(value.get("tokens_evaluated"), value.get("tokens_predicted"))
        if value.get("stop") is True:
            progress.finished = True
            stopType = value.get("stop_type")
            progress.stop_type = stopType if isinstance(stopType, str) else None
        else:
            tokens = value.get("tokens")
            if isinstance(tokens, list):
                progress.streamedTokens += len(tokens)
                if 0 < progress.limit <= progress.streamedTokens:
                    # The last token the request allows has been streamed:
                    # llama-server's final event (stop: true, stop_type
                    # "limit") follows with no text, only settings and
                    # timings, a few hundred microseconds later; RESP_DONE
                    # need not wait for it.  Counted from the events' own
                    # token lists, not ``tokens_predicted``, which some
                    # builds advance by a whole speculative batch before
                    # that batch's events have been sent.
                    progress.finished = True
                    progress.stop_type = "limit"
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
    llama-server's ``cache_prompt``, which strict upstreams might reject;
    ``model`` names the model, which most servers other than llama-server
    require.
    """

    upstream: str
    chat: bool = False
    llamaExtensions: bool = True
    model: str | None = None

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
        if self.model is not None:
            body["model"] = self.model
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
            progress.count(usage.get("prompt_tokens"), usage.get("completion_tokens"))
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


def dialectFor(endpoint: str, upstream: str, llamaExtensions: bool = True, model: str | None = None) -> Dialect:
    """The dialect spoken at ``endpoint``, one of ``ENDPOINTS``; ``upstream`` names the server in messages."""
    if endpoint == "/completion":
        return CompletionDialect(upstream)
    if endpoint == "/v1/completions":
        return OpenAICompletionsDialect(upstream, chat=False, llamaExtensions=llamaExtensions, model=model)
    if endpoint == "/v1/chat/completions":
        return OpenAICompletionsDialect(upstream, chat=True, llamaExtensions=llamaExtensions, model=model)
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


class UpstreamHTTPClient(HTTPClient):
    """
    treq's ``HTTPClient``, with lean methods for the requests the backends make.

    ``request`` wraps every call in treq's cookie, redirect and gzip agents
    and re-parses the URL with ``hyperlink`` (IDNA included): about 100 µs
    of CPU per request here, 40% of starting one, on the path to the first
    token and serialized across requests that arrive together.  None of it
    applies to a POST that streams events from a fixed upstream URL, and
    hyperlink cannot even take an IPv6-literal host (``http://[::1]:8080``),
    so the stream (``postStream``) and the health check (``getDirect``)
    hand their prepared requests straight to the agent.  The rest of treq's
    client stays available to anyone holding this one.
    """

    def __init__(self, agent: IAgent) -> None:
        super().__init__(agent, data_to_body_producer=_bodyProducer)
        self.agent = agent

    def postStream(self, uri: bytes, headers: Headers, body: bytes) -> Deferred[IResponse]:
        """POST ``body`` to ``uri`` (absolute, already encoded); fires with the response once its headers arrive."""
        return self.agent.request(b"POST", uri, headers, _BytesProducer(body))  # type: ignore[no-any-return]

    def getDirect(self, uri: bytes, headers: Headers) -> Deferred[IResponse]:
        """GET ``uri`` (absolute, already encoded); fires with the response once its headers arrive."""
        return self.agent.request(b"GET", uri, headers)  # type: ignore[no-any-return]


def makeHTTPClient(agent: IAgent) -> UpstreamHTTPClient:
    """A treq client over ``agent`` that sends ``bytes`` bodies without a reactor turn."""
    return UpstreamHTTPClient(agent)


class _SSEBody(TwistedProtocol):
    """Hands the HTTP body's bytes, and its end, to the stream that owns it, tagged with the attempt."""

    def __init__(self, stream: UpstreamStream, attempt: int) -> None:
        self.stream = stream
        self.attempt = attempt

    def connectionMade(self) -> None:
        self.stream._bodyConnected(self.transport, self.attempt)

    def dataReceived(self, data: bytes) -> None:
        self.stream._bodyData(data, self.attempt)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stream._bodyEnded(reason, self.attempt)


class _BodyCollector(TwistedProtocol):
    """
    Reads at most ``limit`` bytes of a response (an error's message, a health
    check's answer), then hangs up; cancelling ``finished`` hangs up too.
    """

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


class StreamingBackend(Protocol):
    """What an ``UpstreamStream`` needs from its backend."""

    reactor: IReactorTime
    http: UpstreamHTTPClient
    freshHTTP: UpstreamHTTPClient
    pool: UpstreamPool
    #: How messages name an upstream: "llama-server" (at URL).
    upstream_name: str
    #: The backend's option prefix, for messages that name an option: "llama".
    option_prefix: str
    #: The options to check when the upstream has no such API.
    endpoint_hint: str
    #: Headers of every streaming request.
    streamHeaders: dict[bytes, list[bytes]]
    connect_timeout: float
    first_event_timeout: float
    idle_timeout: float
    #: Streams whose answer has ended but whose HTTP body is still being read.
    draining: set[UpstreamStream]

    def dialectFor(self, upstream: Upstream) -> Dialect: ...


@implementer(IPushProducer)
class UpstreamStream:
    """
    One CC50 request as one streaming HTTP request (two, when it is retried).

    It is the sink's push producer: ``pauseProducing`` pauses the HTTP body's
    transport (and the timers, since a paused stream is not the upstream's
    fault); ``stopProducing`` and cancelling ``done`` close the connection.
    Events already parsed when a pause arrives wait in ``_events`` (at most
    one TCP read's worth) and are written on resume.

    A connection failure or 5xx before any text was written to the sink is
    reported to the pool (passive health) and, once per request, the request
    moves to another upstream: the client cannot tell.  Once text has been
    written the request is the client's, and a failure ends it with
    ``RESP_ERR``.  Every HTTP request made is numbered (``_attempt``), and
    callbacks from an attempt that was given up are ignored.
    """

    log = Logger()

    def __init__(self, backend: StreamingBackend, request: InferenceRequest, sink: ITokenSink) -> None:
        self._backend = backend
        self._request = request
        self._sink = sink
        self._events: deque[SSEEvent] = deque()
        self._paused = False
        self._ended = False  # done has fired or been cancelled: nothing more happens
        self._draining = False
        self._attempt = 0  # HTTP requests made for this CC50 request, all upstreams together
        self._tries = 0  # HTTP requests made to the current upstream
        self._retried = False  # the one move to another upstream has been made
        self._upstream: Upstream | None = None
        self._holding = False  # counted in the current upstream's outstanding requests
        self._pending: Deferred[IResponse] | None = None  # the request, until headers arrive
        self._errorBody: Deferred[bytes] | None = None  # an error response's body, being read
        self._transport: Any = None  # the HTTP body's transport, while it is being read
        self._bodyEnd: Failure | None = None
        self._timer: IDelayedCall | None = None
        self._drainTimer: IDelayedCall | None = None  # the rest of the body, after the answer ended
        self._lastData = 0.0  # when the body last brought bytes, once streaming
        self._sawEvent = False
        self._chunks = 0  # sink writes: once there is one, the request is not retried
        self._dialect: Dialect = CompletionDialect("")
        self._parser = SSEParser()
        self._text = TextAssembler()
        self.progress = Progress()
        self.done: Deferred[GenerationResult] = Deferred(self._cancelled)

    @property
    def upstream(self) -> Upstream | None:
        """The upstream of the current (or last) attempt."""
        return self._upstream

    @property
    def _where(self) -> str:
        url = self._upstream.url if self._upstream is not None else "(no upstream)"
        return f"{self._backend.upstream_name} at {url}"

    # Starting --------------------------------------------------------------

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        upstream = self._backend.pool.choose()
        assert upstream is not None  # a pool is never empty
        self._use(upstream)
        self._send()

    def _use(self, upstream: Upstream) -> None:
        """Make ``upstream`` the one this request's next HTTP request goes to, with a clean slate."""
        self._upstream = upstream
        self._backend.pool.acquire(upstream)
        self._holding = True
        self._dialect = self._backend.dialectFor(upstream)
        self._tries = 0
        self._parser = SSEParser()
        self._text = TextAssembler()
        self.progress = Progress(limit=self._request.max_tokens)
        self._events.clear()
        self._bodyEnd = None
        self._sawEvent = False

    def _release(self, outcome: str) -> None:
        """The attempt on the current upstream is over: count it."""
        if self._holding and self._upstream is not None:
            self._holding = False
            self._backend.pool.release(self._upstream, outcome)

    def _send(self) -> None:
        assert self._upstream is not None
        self._tries += 1
        self._attempt += 1
        attempt = self._attempt
        body = json.dumps(self._dialect.requestBody(self._request)).encode("utf-8")
        self._armTimer()
        backend = self._backend
        http = backend.http if self._tries == 1 else backend.freshHTTP
        uri = (self._upstream.url + self._dialect.path).encode("ascii")
        pending: Deferred[IResponse] = maybeDeferred(http.postStream, uri, Headers(backend.streamHeaders), body)
        self._pending = pending
        pending.addCallbacks(self._gotResponse, self._requestFailed, callbackArgs=(attempt,), errbackArgs=(attempt,))

    def _requestFailed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._attempt:
            return  # an attempt given up for another one
        self._pending = None
        if self._ended:
            return
        prefix = self._backend.option_prefix
        if failure.check(netError.TimeoutError):
            self._fail(
                f"could not connect to {self._where} within {self._backend.connect_timeout:g}s "
                f"(--{prefix}-connect-timeout)",
                ErrorCode.TIMEOUT,
                fault=True,
            )
        elif failure.check(netError.ConnectError, netError.DNSLookupError):
            self._fail(
                f"{self._where} is not reachable ({failure.getErrorMessage()}); is it running?",
                ErrorCode.UPSTREAM_UNAVAILABLE,
                fault=True,
            )
        elif _neverAnswered(failure):
            if self._tries == 1:
                # A pooled keep-alive connection the upstream closed as we
                # reused it.  llama-server closes its connection after every
                # streamed answer, while advertising keep-alive, so the pool
                # hands out such a connection whenever a request starts in
                # the instant after another ended.  Retry once on a brand new
                # connection: another pooled one might be just as dead.
                self.log.debug("retrying request {req_id}: {reason}", req_id=self._request.req_id, reason=failure)
                self._send()
                return
            self._fail(
                f"{self._where} closed the connection before answering", ErrorCode.UPSTREAM_UNAVAILABLE, fault=True
            )
        elif failure.check(ResponseFailed):
            self._fail(
                f"{self._where} closed the connection while sending its response headers",
                ErrorCode.UPSTREAM_UNAVAILABLE,
                fault=True,
            )
        else:
            self._fail(f"request to {self._where} failed: {failure.getErrorMessage()}", ErrorCode.BACKEND_ERROR)

    def _gotResponse(self, response: IResponse, attempt: int) -> None:
        if attempt != self._attempt:
            _discard(response)
            return
        self._pending = None
        if self._ended:
            return
        if response.code != 200:
            self._readError(response, attempt)
            return
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if not contentType.lower().startswith(b"text/event-stream"):
            self._fail(
                f"{self._where} answered {self._dialect.path} with Content-Type "
                f"{contentType.decode('latin-1') or '(none)'} instead of an event stream; "
                f"check {self._backend.endpoint_hint}",
                ErrorCode.BACKEND_ERROR,
            )
            _discard(response)
            return
        assert self._upstream is not None
        self._backend.pool.succeeded(self._upstream)
        response.deliverBody(_SSEBody(self, attempt))
        # deliverBody resumes the transport after connecting us, undoing any
        # pause we applied in _bodyConnected; apply it again.
        if self._paused and self._transport is not None:
            self._transport.pauseProducing()

    def _readError(self, response: IResponse, attempt: int) -> None:
        collector = _BodyCollector(MAX_BODY_READ)
        response.deliverBody(collector)
        self._errorBody = collector.finished
        code = response.code
        collector.finished.addCallbacks(
            lambda body: self._httpError(code, body, attempt), lambda f: f.trap(CancelledError)
        )

    def _httpError(self, code: int, body: bytes, attempt: int) -> None:
        if attempt != self._attempt:
            return
        self._errorBody = None
        if self._ended:
            return
        message = _bodyMessage(body)
        if code == 503:
            self._fail(
                f"{self._where} is not ready (HTTP 503: {message}); it may still be loading its model, retry later",
                ErrorCode.UPSTREAM_UNAVAILABLE,
                fault=True,
            )
        elif code == 404:
            self._fail(
                f"{self._where} has no {self._dialect.path} (HTTP 404: {message}); check {self._backend.endpoint_hint}",
                ErrorCode.BACKEND_ERROR,
            )
        else:
            self._fail(
                f"{self._where} rejected the request: HTTP {code}: {message}",
                ErrorCode.BACKEND_ERROR,
                fault=code >= 500,
            )

    # The body ----------------------------------------------------------------

    def _bodyConnected(self, transport: Any, attempt: int) -> None:
        if attempt != self._attempt:
            transport.stopProducing()
            return
        self._transport = transport
        if self._ended:
            self._abortTransport()
        elif self._paused:
            transport.pauseProducing()
            self._cancelTimer()

    def _bodyData(self, data: bytes, attempt: int) -> None:
        if self._ended or attempt != self._attempt:
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

    def _bodyEnded(self, reason: Failure, attempt: int) -> None:
        if attempt != self._attempt:
            return
        self._transport = None
        if self._ended:
            self._drained()
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
                fault=True,
            )

    # Ending ------------------------------------------------------------------

    def _finish(self) -> None:
        tail = self._text.finish()
        if tail:
            self._sink.write(tail)
        self._end()
        if self._transport is not None:
            # Let the rest of the body (the final event, the chunked
            # terminator) drain so the connection can go back to the pool;
            # for as long as the idle timeout at most, and no longer than
            # the backend runs.  (Registered first: resuming may deliver the
            # end of the body at once.)
            self._backend.draining.add(self)
            self._drainTimer = self._backend.reactor.callLater(self._backend.idle_timeout, self.stopDraining)
            self._transport.resumeProducing()
        self._release("done")
        progress = self.progress
        generated = progress.generated_tokens
        if generated is None:
            # An upstream that reports no counts: chunks are the best estimate.
            generated = self._chunks
        self.done.callback(GenerationResult(progress.prompt_tokens or 0, generated))

    def stopDraining(self) -> None:
        """Close the connection whose rest of the body is still being read after the answer ended."""
        self._abortTransport()
        self._drained()

    def _drained(self) -> None:
        if self._drainTimer is not None:
            if self._drainTimer.active():
                self._drainTimer.cancel()
            self._drainTimer = None
        self._backend.draining.discard(self)

    def _fail(self, message: str, code: ErrorCode, fault: bool = False) -> None:
        """
        End the request with ``BackendError(message, code)``, unless it can
        move.  ``fault``: a connection failure or 5xx, which passive health
        counts against the upstream.
        """
        if self._ended:
            return
        upstream = self._upstream
        if fault and upstream is not None:
            self._backend.pool.failed(upstream, message)
            if self._chunks == 0 and not self._retried and self._retryElsewhere(upstream, message):
                return
        self._end()
        self._abort()
        self._release("failed" if fault else "cancelled" if code == ErrorCode.CANCELLED else "error")
        self.done.errback(BackendError(message, code))

    def _retryElsewhere(self, failedOn: Upstream, message: str) -> bool:
        """Move the request, which has sent nothing to its client yet, to another upstream."""
        other = self._backend.pool.choose(exclude=failedOn)
        if other is None:
            return False
        self._retried = True
        self._backend.pool.retried(failedOn)
        self.log.info(
            "request {req_id}: {message}; retrying on {url}",
            req_id=self._request.req_id,
            message=message,
            url=other.url,
        )
        self._attempt += 1  # whatever is left of the failed attempt is ignored from now on
        self._abort()
        self._release("failed")
        self._use(other)
        self._send()
        return True

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
            self._release("cancelled")

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
            f"(--{self._backend.option_prefix}-first-event-timeout); it may be overloaded or stuck",
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
            f"(--{self._backend.option_prefix}-idle-timeout), after {self.progress.events} events",
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


def _wasCancelled(failure: Failure) -> bool:
    """Cancelled: while connecting, directly, or (a request under way) as the reason the response never came."""
    if failure.check(CancelledError, netError.ConnectingCancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None)  # ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed
    if isinstance(reasons, list):
        return any(isinstance(reason, Failure) and _wasCancelled(reason) for reason in reasons)
    return False


def _discard(response: IResponse) -> None:
    """Close a response whose body we do not want (it is not returned to the pool)."""
    collector = _BodyCollector(0)
    response.deliverBody(collector)
    collector._hangUp()


# The backend ---------------------------------------------------------------


@implementer(IBackend, IBackendMetrics)
class HTTPStreamingBackend:
    """
    Streams completions from a pool of HTTP upstreams (one or more URLs).

    Subclasses set the class attributes below and ``makeDialect``; the
    rest (routing, retries, health polling, metrics) is here.
    """

    name = "http"
    #: How messages name an upstream: "llama-server" (at URL).
    upstream_name = "upstream"
    #: Prefix of the backend's options, for messages that name one: "llama".
    option_prefix = "upstream"
    #: The options to check when the upstream has no such API.
    endpoint_hint = "the upstream URL"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        urls: str | Sequence[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        first_event_timeout: float = DEFAULT_FIRST_EVENT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        health_interval: float = DEFAULT_HEALTH_INTERVAL,
        health_path: str | None = "/health",
        backoff: float = DEFAULT_BACKOFF,
        headers: Mapping[bytes, Sequence[bytes]] | None = None,
        http: UpstreamHTTPClient | None = None,
        pool: HTTPConnectionPool | None = None,
        freshHTTP: UpstreamHTTPClient | None = None,
        preconnect: bool = False,
    ) -> None:
        self.reactor = reactor
        if isinstance(urls, str):
            urls = [urls]
        self.urls = [normalizeURL(url, f"--{self.option_prefix}-url") for url in urls]
        duplicates = sorted({url for url in self.urls if self.urls.count(url) > 1})
        if duplicates:
            raise ValueError(f"--{self.option_prefix}-url names an upstream more than once: {', '.join(duplicates)}")
        self.pool = UpstreamPool(self.urls, reactor, backoff, label=self.upstream_name)
        self.connect_timeout = connect_timeout
        self.first_event_timeout = first_event_timeout
        self.idle_timeout = idle_timeout
        self.health_interval = health_interval
        self.health_path = health_path or None
        self.backoff = backoff
        #: Sent with every request, health checks included (``Authorization``).
        self.extraHeaders = {name: list(values) for name, values in (headers or {}).items()}
        self.streamHeaders = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"text/event-stream"],
            **self.extraHeaders,
        }
        healthPool: HTTPConnectionPool | None = None
        if http is None:
            if pool is None:
                pool = WarmConnectionPool(reactor) if preconnect else HTTPConnectionPool(reactor, persistent=True)
                pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
                pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
                if preconnect:
                    # Health checks get connections of their own: a probe
                    # every few seconds must not keep a spare open when idle.
                    healthPool = HTTPConnectionPool(reactor, persistent=True)
                    healthPool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
            http = makeHTTPClient(upstreamAgent(reactor, connect_timeout, pool))
        if freshHTTP is None:
            if pool is None:
                freshHTTP = http  # a test's client: it decides what a connection is
            else:
                freshPool = HTTPConnectionPool(reactor, persistent=False)
                freshHTTP = makeHTTPClient(upstreamAgent(reactor, connect_timeout, freshPool))
        #: The HTTP connections, shared by all upstreams (the Agent keys them by host).
        self.connectionPool = pool
        self.http = http
        self.healthPool = healthPool
        #: For health checks: ``http``, unless spares are kept (``preconnect``).
        self.healthHTTP = http if healthPool is None else makeHTTPClient(upstreamAgent(reactor, connect_timeout, healthPool))
        #: Always a new connection: for the one retry after a pooled
        #: connection turned out to be closed (see ``UpstreamStream``).
        self.freshHTTP = freshHTTP
        #: Streams that have not ended; tests and metrics read its size.
        self.active: set[UpstreamStream] = set()
        self.draining: set[UpstreamStream] = set()
        self._dialects: dict[str, Dialect] = {}
        self.dialect = self.dialectFor(self.pool.members[0])
        self._poller: LoopingCall | None = None
        #: Health checks under way (``stopBackend`` cancels them).
        self._probes: set[Deferred[Any]] = set()
        self._stopped = False

    @property
    def url(self) -> str:
        """The first upstream's URL (the only one, unless it is a pool)."""
        return self.urls[0]

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
        if self.health_path and self.health_interval > 0:
            health = f"health checks of {self.health_path} every {self.health_interval:g}s"
        else:
            health = "no health polling"
        return (
            f"{where}, {self.dialect.path} ({self.dialect.description}); timeouts: "
            f"connect {self.connect_timeout:g}s, first event {self.first_event_timeout:g}s, "
            f"idle {self.idle_timeout:g}s; {health}; back-off {self.backoff:g}s"
            + ("; a spare connection kept ready per upstream" if isinstance(self.connectionPool, WarmConnectionPool) else "")
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

    def collectors(self) -> list[UpstreamCollector]:
        """Per-upstream gauges and counters (``IBackendMetrics``)."""
        return [UpstreamCollector(self.pool)]

    # Health ------------------------------------------------------------------

    def startBackend(self) -> Deferred[None]:
        """Check every upstream once and log what each says, then poll; never refuse to start."""
        probed = self.probeHealth(log=True)

        def poll(_: object) -> None:
            if self._stopped or not self.health_path or self.health_interval <= 0:
                return
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.health_interval, now=False).addErrback(
                lambda f: self.log.failure("upstream health polling stopped", f)
            )

        return probed.addCallback(poll)

    def checkHealth(self) -> Deferred[bool]:
        """Whether at least one upstream is healthy (never fails)."""
        if not self.health_path:
            return succeed(self.pool.upCount() > 0)
        if self._poller is not None and self._poller.running and self.pool.allChecked():
            return succeed(self.pool.anyHealthy())
        return self.probeHealth().addCallback(lambda probe: probe[0])

    def probeHealth(self, log: bool = False) -> Deferred[tuple[bool, str]]:
        """
        Check every upstream now: whether any is healthy, and a sentence per
        upstream (each logged, with ``log``); never fails.
        """
        if not self.health_path:
            return succeed((True, f"{self.upstream_name} health checks are off"))
        probes = [self._probe(upstream) for upstream in self.pool.members]

        def summarize(results: list[tuple[bool, str]]) -> tuple[bool, str]:
            if log:
                for _, message in results:
                    self.log.info("{message}", message=message)
            return any(ok for ok, _ in results), "; ".join(message for _, message in results)

        return gatherResults(probes).addCallback(summarize)

    def _poll(self) -> None:
        for upstream in self.pool.members:
            if not upstream.probing:
                self._probe(upstream)

    def _probe(self, upstream: Upstream) -> Deferred[tuple[bool, str]]:
        """Ask one upstream's health URL; record and return the verdict; never fails."""
        assert self.health_path is not None
        where = f"{self.upstream_name} at {upstream.url}"
        path = self.health_path
        if self._stopped:
            return succeed((False, f"{where} was not checked: the backend is stopping"))
        upstream.probing = True
        http = self.healthHTTP
        # One clock for the whole check, headers and body: it cancels
        # whichever step is under way (``step``), and a cancelled body read
        # hangs up, so a stalled upstream cannot leave a probe pending.
        got: Deferred[Any] = maybeDeferred(http.getDirect, (upstream.url + path).encode("ascii"), Headers(self.extraHeaders))
        step = [got]
        timer = self.reactor.callLater(self.connect_timeout + 5, lambda: step[-1].cancel())

        def answered(response: Any) -> Deferred[tuple[bool, str]]:
            collector = _BodyCollector(MAX_BODY_READ)
            response.deliverBody(collector)
            step.append(collector.finished)

            def read(data: bytes) -> tuple[bool, str]:
                if response.code == 200:
                    return True, f"{where} is healthy ({data.decode('utf-8', 'replace').strip()[:200]})"
                if response.code == 503:
                    consequence = self._untilHealthy("it has loaded its model")
                    return False, f"{where} is up but not ready (HTTP 503: {_bodyMessage(data)}); {consequence}"
                return False, f"{where} answered {path} with HTTP {response.code}: {_bodyMessage(data)}"

            return collector.finished.addCallback(read)

        def failed(failure: Failure) -> tuple[bool, str]:
            if _wasCancelled(failure):
                reason = "stopped: the backend is stopping" if self._stopped else "no answer in time"
            else:
                reason = failure.getErrorMessage()
            return False, f"{where} is not reachable ({reason}); {self._untilHealthy('it comes up')}"

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

    def _untilHealthy(self, when: str) -> str:
        """What an unhealthy upstream means for requests, for the health check's log line."""
        if len(self.pool) == 1:
            return f"requests will get UPSTREAM_UNAVAILABLE until {when}"
        return f"it gets no requests until {when}, unless no upstream is up"

    def stopBackend(self) -> Deferred[None]:
        self._stopped = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        for stream in list(self.active):
            stream.stopProducing()
        for stream in list(self.draining):
            stream.stopDraining()
        for probe in list(self._probes):
            probe.cancel()
        self.pool.logSummary()
        closing = [pool.closeCachedConnections() for pool in (self.connectionPool, self.healthPool) if pool is not None]
        return gatherResults(closing).addCallback(lambda _: None)


# Options shared by the backends built on this ----------------------------------


def normalizeURL(url: str, option: str = "--llama-url") -> str:
    """
    ``url`` without a trailing slash, after checking it is an http(s) URL
    with a host, and in its ASCII form (IDNA host, percent-encoded path), so
    each request can send it as bytes without parsing it again.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{option} must be an http:// or https:// URL with a host, got {url!r}")
    if not url.isascii():
        try:
            url = EncodedURL.from_text(url).to_uri().to_text()
        except (ValueError, UnicodeError) as e:
            raise ValueError(f"{option} is not a valid URL ({e}): {url!r}") from None
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        # What Twisted's Agent accepts in a request URI: otherwise every
        # request would fail at once, long after start-up said nothing.
        raise ValueError(f"{option} must not contain spaces or control characters (percent-encode them): {url!r}")
    return url.rstrip("/")


def positiveSeconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return number


def intervalSeconds(value: str) -> float:
    """Seconds between health checks: 0 turns them off."""
    number = float(value)
    if not number >= 0:
        raise ValueError(f"must be 0 (off) or a positive number of seconds, got {value}")
    return number


def urlList(value: object) -> list[str]:
    """A repeatable URL option's value as a list, whatever shape it came in."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)  # type: ignore[call-overload]


def commonOptions(prefix: str, backend: str) -> list[list[Any]]:
    """The timeout, health and back-off options of ``backend``, whose options start with ``prefix``."""
    return [
        [
            f"{prefix}-connect-timeout",
            None,
            DEFAULT_CONNECT_TIMEOUT,
            f"Seconds to connect to an upstream before the attempt fails with TIMEOUT ({backend} backend).",
            positiveSeconds,
        ],
        [
            f"{prefix}-first-event-timeout",
            None,
            DEFAULT_FIRST_EVENT_TIMEOUT,
            f"Seconds from request to the upstream's first event: prompt processing, queueing for a slot "
            f"({backend} backend).",
            positiveSeconds,
        ],
        [
            f"{prefix}-idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            f"Seconds without data from the upstream mid-stream before the request fails with TIMEOUT "
            f"({backend} backend).",
            positiveSeconds,
        ],
        [
            f"{prefix}-health-interval",
            None,
            DEFAULT_HEALTH_INTERVAL,
            f"Seconds between health checks of each upstream; 0: none ({backend} backend).",
            intervalSeconds,
        ],
        [
            f"{prefix}-backoff",
            None,
            DEFAULT_BACKOFF,
            "Seconds an upstream gets no requests after a connection failure or 5xx, doubled with each "
            f"further failure in a row up to 8 times ({backend} backend).",
            positiveSeconds,
        ],
    ]


def commonSettings(options: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``HTTPStreamingBackend`` keyword arguments from the options made by ``commonOptions``."""
    return {
        "connect_timeout": options[f"{prefix}-connect-timeout"],
        "first_event_timeout": options[f"{prefix}-first-event-timeout"],
        "idle_timeout": options[f"{prefix}-idle-timeout"],
        "health_interval": options[f"{prefix}-health-interval"],
        "backoff": options[f"{prefix}-backoff"],
        "preconnect": bool(options.get(f"{prefix}-preconnect")),
    }


def commonFlags(prefix: str, backend: str) -> list[list[Any]]:
    """The on/off options of ``backend`` shared by the HTTP backends (``optFlags`` form)."""
    return [
        [
            f"{prefix}-preconnect",
            None,
            "Keep one spare connection to each upstream, connected before a request needs it: saves a TCP "
            "connect per request (llama-server closes its connection after every streamed answer), at the "
            f"cost of one idle upstream connection and HTTP thread ({backend} backend).",
        ]
    ]


__all__ = [
    "ENDPOINTS",
    "CompletionDialect",
    "Dialect",
    "HTTPStreamingBackend",
    "OpenAICompletionsDialect",
    "Progress",
    "UpstreamEndpoints",
    "UpstreamHTTPClient",
    "UpstreamStream",
    "dialectFor",
    "makeHTTPClient",
    "upstreamAgent",
]
