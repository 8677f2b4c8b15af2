"""
The llama-server backend: CC50 requests bridged to llama.cpp's HTTP server.

The HTTP streaming, the dialects, the error taxonomy and the pool of
upstreams live in ``cc50tw.backends.http``, shared with the ``openai``
backend; this module is llama-server's options and defaults.
``--llama-endpoint`` picks llama.cpp's native ``/completion`` (the default)
or its OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``;
``--llama-url`` may repeat, for a pool of llama-servers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.web.client import HTTPConnectionPool

from cc50tw.backends import BackendSpec, Repeatable
from cc50tw.backends.http import (
    ENDPOINTS,
    Dialect,
    HTTPStreamingBackend,
    UpstreamHTTPClient,
    UpstreamSettings,
    commonOptions,
    dialectFor,
    settingsFrom,
    urlList,
)
from cc50tw.backends.http.routes import UpstreamRoute

DEFAULT_URL = "http://127.0.0.1:8080"


class LlamaServerBackend(HTTPStreamingBackend):
    """Streams completions from one llama-server, or the least loaded of several."""

    name = "llama_server"
    upstream_name = "llama-server"
    option_prefix = "llama"
    endpoint_hint = "--llama-endpoint"

    def __init__(
        self,
        reactor: Any,
        url: str | Sequence[str] = DEFAULT_URL,
        endpoint: str = "/completion",
        settings: UpstreamSettings | None = None,
        *,
        http: UpstreamHTTPClient | None = None,
        freshHTTP: UpstreamHTTPClient | None = None,
        pool: HTTPConnectionPool | None = None,
        routes: Sequence[UpstreamRoute] = (),
        defaultModel: str | None = None,
        **fields: Any,
    ) -> None:
        """
        ``fields``: ``UpstreamSettings`` fields, for callers that set one or two (tests).
        ``routes`` (``--config``'s upstreams) replace ``url`` and ``endpoint``.
        """
        dialectFor(endpoint, "")  # raises ValueError for an unknown endpoint
        self.endpoint = endpoint
        if settings is None:
            settings = UpstreamSettings(**fields)
        super().__init__(
            reactor, url, settings, http=http, freshHTTP=freshHTTP, pool=pool, routes=routes, defaultModel=defaultModel
        )

    def makeDialect(self, where: str) -> Dialect:
        return dialectFor(self.endpoint, where)


def _endpoint(value: str) -> str:
    if value not in ENDPOINTS:
        raise ValueError(f"must be one of {', '.join(ENDPOINTS)}, got {value!r}")
    return value


def build(options: Mapping[str, Any], reactor: Any) -> LlamaServerBackend:
    routes = options.get("upstreams")
    if routes:  # --config's [[upstreams]]: cc50tw.config has refused --llama-url and --llama-endpoint
        return LlamaServerBackend(
            reactor, (), routes=routes, defaultModel=options.get("default-model"), settings=settingsFrom(options, "llama")
        )
    return LlamaServerBackend(
        reactor,
        url=urlList(options["llama-url"]),
        endpoint=options["llama-endpoint"],
        settings=settingsFrom(options, "llama"),
    )


SPEC = BackendSpec(
    name="llama_server",
    description="streams from llama.cpp's llama-server, or a pool of them, over HTTP",
    options=[
        [
            "llama-url",
            None,
            DEFAULT_URL,
            "Base URL of llama-server; repeat it for a pool (each request goes to the least loaded).",
            Repeatable(str),
        ],
        [
            "llama-endpoint",
            None,
            "/completion",
            "Upstream API: /completion (llama.cpp native), /v1/completions or /v1/chat/completions.",
            _endpoint,
        ],
        *commonOptions("llama", "llama_server"),
    ],
    build=build,
)

__all__ = ["DEFAULT_URL", "SPEC", "LlamaServerBackend"]
