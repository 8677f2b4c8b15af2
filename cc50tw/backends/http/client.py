"""
The HTTP side of talking to an upstream: connections, requests, bodies.

Requests go straight to a Twisted ``Agent`` over our own endpoint factory.
treq is not on this path: its ``request`` re-parses every URL with
hyperlink (which cannot take an IPv6-literal host) and wraps each call in
cookie, redirect and gzip agents, about 100 µs per request on the way to the
first token, none of which a POST streaming events from a fixed URL needs.
(treq's in-memory ``RequestTraversalAgent`` is what the tests drive this
client with.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

#: Idle connections kept per upstream; only their reuse is capped, not how
#: many requests run at once (the upstream's ``-np`` slots decide that).
MAX_PERSISTENT_PER_HOST = 64
#: Below cpp-httplib's 5 s keep-alive, so we drop an idle connection before
#: llama-server does, rather than racing its close with a new request.
CACHED_CONNECTION_TIMEOUT = 4
#: How much of an error response (for its message) or a health answer we read.
MAX_BODY_READ = 64 * 1024


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


class UpstreamHTTPClient:
    """The two requests the backends make, handed prepared to the agent."""

    def __init__(self, agent: IAgent, pool: HTTPConnectionPool | None = None) -> None:
        self.agent = agent
        self.pool = pool

    def newConnections(self) -> int | None:
        """
        Connections made so far, if the pool counts them (``ReuseAwarePool``):
        comparing it before and after a request starts tells a reused
        connection from a new one.  None when unknown.
        """
        return self.pool.newConnections if isinstance(self.pool, ReuseAwarePool) else None

    def postStream(self, uri: bytes, headers: Headers, body: bytes) -> Deferred[IResponse]:
        """POST ``body`` to ``uri`` (absolute, already encoded); fires with the response once its headers arrive."""
        return self.agent.request(b"POST", uri, headers, _BytesProducer(body))  # type: ignore[no-any-return]

    def getDirect(self, uri: bytes, headers: Headers) -> Deferred[IResponse]:
        """GET ``uri`` (absolute, already encoded); fires with the response once its headers arrive."""
        return self.agent.request(b"GET", uri, headers)  # type: ignore[no-any-return]


def makeHTTPClient(agent: IAgent, pool: HTTPConnectionPool | None = None) -> UpstreamHTTPClient:
    return UpstreamHTTPClient(agent, pool)


@implementer(IStreamClientEndpoint)
class _Counted:
    def __init__(self, endpoint: IStreamClientEndpoint, pool: ReuseAwarePool) -> None:
        self.endpoint = endpoint
        self.pool = pool

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        self.pool.newConnections += 1
        # The pool makes a factory per connection, and a noisy one logs
        # "Starting factory" and "Stopping factory" with its long repr: since
        # llama-server closes after every streamed answer, that was two log
        # lines per request, costing more than the request's own line.
        protocolFactory.noisy = False
        return self.endpoint.connect(protocolFactory)  # type: ignore[no-any-return]


class ReuseAwarePool(HTTPConnectionPool):
    """
    A pool that counts the connections it makes: ``getConnection`` connects
    the endpoint it is given only when it has no cached connection, and it
    does so before returning.  A request that fails before any answer on a
    reused connection may have met one the upstream had just closed (and is
    retried on a new one); on a new connection it may not.
    """

    newConnections = 0

    def getConnection(self, key: Any, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        return super().getConnection(key, _Counted(endpoint, self))  # type: ignore[no-any-return]


def pooledConnections(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """A connection pool with the limits above."""
    pool = ReuseAwarePool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    return pool


class BodyCollector(Protocol):
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


def discard(response: IResponse) -> None:
    """Close a response whose body we do not want (it is not returned to the pool)."""
    collector = BodyCollector(0)
    response.deliverBody(collector)
    collector._hangUp()
