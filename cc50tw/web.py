"""
The operator's HTTP side: Prometheus metrics and health, through twisted.web.

``/healthz`` answers 200 while the process runs (liveness); ``/readyz``
answers 200 only while the server is listening, not draining, and its
backend's last health check passed (readiness), so a load balancer stops
sending new connections to an instance that cannot serve them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cc50tw.server import CC50ServerFactory


class _Metrics(Resource):
    """
    Prometheus exposition rendered in the reactor thread.

    prometheus_client's own Twisted resource renders through WSGI in the
    reactor's thread pool; our collector reads the server's live connection
    set, which only the reactor thread may touch, and the pool is shared with
    the toy backend's CPU work.  Rendering takes well under a millisecond.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)


class _Health(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> bytes:
        ok, detail = self._check()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return f"{'ok' if ok else 'unavailable'}: {detail}\n".encode()


def readiness(factory: CC50ServerFactory, listening: Callable[[], bool]) -> tuple[bool, str]:
    if factory.draining:
        return False, "shutting down"
    if not listening():
        return False, "not listening"
    if not factory.backendHealthy:
        return False, f"backend {factory.backend.name!r} is unhealthy"
    return True, f"backend {factory.backend.name!r} healthy, {len(factory.connections)} connections"


def operationsSite(factory: CC50ServerFactory, listening: Callable[[], bool]) -> Site:
    root = Resource()
    root.putChild(b"metrics", _Metrics(factory.metrics.registry))
    root.putChild(b"healthz", _Health(lambda: (True, "alive")))
    root.putChild(b"readyz", _Health(lambda: readiness(factory, listening)))
    return _QuietSite(root)


class _QuietSite(Site):
    """No access-log line per scrape or health probe: they come every few seconds."""

    noisy = False

    def log(self, request: Request) -> None:  # type: ignore[override]
        pass
