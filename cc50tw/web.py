"""
The operator's HTTP side: Prometheus metrics and health, through twisted.web.

``/healthz`` answers 200 while the process runs (liveness); ``/readyz``
answers 200 only while the server is listening, not draining, and its
backend's last health check passed (readiness), so a load balancer stops
sending new connections to an instance that cannot serve them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cc50tw.server import CC50ServerFactory


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
    root.putChild(b"metrics", MetricsResource(factory.metrics.registry))
    root.putChild(b"healthz", _Health(lambda: (True, "alive")))
    root.putChild(b"readyz", _Health(lambda: readiness(factory, listening)))
    site = Site(root)
    site.noisy = False
    return site
