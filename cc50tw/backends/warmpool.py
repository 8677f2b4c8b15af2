"""
An HTTP connection pool that connects ahead of need.

llama-server closes its connection after every streamed answer (while
advertising keep-alive), so without help every request pays for a new TCP
connection before its request can even be written: the ``connect`` call,
llama-server waking a thread to accept it, and a reactor turn for the
connection to complete, all on the way to the first token.
``WarmConnectionPool`` keeps one spare, already connected, per upstream it
was recently asked about: each request that takes the spare (or that
finds none) starts the next one, so a steady stream of requests finds a
connection waiting.

The cost is one idle connection per upstream, and one of llama-server's
HTTP threads (``--threads-http``; at least ``--parallel`` + 2) while it
waits, for at most ``cachedConnectionTimeout`` seconds after the last
request; that is why it is the backend's choice (``--llama-preconnect``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

#: Seconds after a request took (or missed) a spare before the next spare
#: is started: long enough for that request to have been written.
WARM_DELAY = 0.001


class WarmConnectionPool(HTTPConnectionPool):
    """
    ``HTTPConnectionPool`` (persistent) that keeps one connected spare per key.

    A spare is an ``HTTP11ClientProtocol`` connected and never used: the
    pool's own cache holds it (``_putConnection``), so the cache's timeout
    closes it when no request comes, and ``getConnection`` hands it out like
    any kept-alive connection.  One is made only when the cache holds no live
    idle connection for the key when it is due: an upstream that keeps its
    connections alive (vLLM, OpenAI) gives each request back to the cache and
    never needs a spare, while llama-server has closed its streamed-on
    connection by then.  A spare that fails to connect is dropped quietly:
    the request that needs a connection next makes its own and reports any
    failure.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor, persistent=True)
        self._warming: dict[Hashable, Deferred[Any]] = {}
        self._scheduled: dict[Hashable, IDelayedCall] = {}
        self._closed = False
        #: Spares connected so far (for tests and figures).
        self.sparesMade = 0

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        connection: Deferred[Any] = super().getConnection(key, endpoint)
        if not self._closed and key not in self._warming and key not in self._scheduled:
            # Not now: connecting costs the reactor tens of microseconds, and
            # the request that called us is still waiting to be written.
            self._scheduled[key] = self._reactor.callLater(WARM_DELAY, self._warm, key, endpoint)
        return connection

    def _idleWaiting(self, key: Hashable) -> bool:
        """Whether a cached connection for ``key`` could take the next request now."""
        return any(
            connection.state == "QUIESCENT" and not getattr(connection.transport, "disconnecting", False)
            for connection in self._connections.get(key, ())
        )

    def _warm(self, key: Hashable, endpoint: IStreamClientEndpoint) -> None:
        self._scheduled.pop(key, None)
        if self._closed or key in self._warming or self._idleWaiting(key):
            return
        connecting: Deferred[Any] = self._newConnection(key, endpoint)
        self._warming[key] = connecting

        def connected(protocol: Any) -> None:
            self._warming.pop(key, None)
            if self._closed:
                protocol.abort()
                return
            self.sparesMade += 1
            self._putConnection(key, protocol)

        def failed(failure: Failure) -> None:
            self._warming.pop(key, None)
            if not failure.check(CancelledError, ConnectingCancelledError):
                self.log.debug("spare connection failed: {reason}", reason=failure.getErrorMessage())

        connecting.addCallbacks(connected, failed)

    def closeCachedConnections(self) -> Deferred[None]:
        """Close the cached connections and stop making spares (the backend is stopping)."""
        self._closed = True
        for call in self._scheduled.values():
            call.cancel()
        self._scheduled.clear()
        for connecting in list(self._warming.values()):
            connecting.cancel()
        self._warming.clear()
        closing: Deferred[None] = super().closeCachedConnections()
        return closing


__all__ = ["WARM_DELAY", "WarmConnectionPool"]
