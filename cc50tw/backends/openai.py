"""
The OpenAI-compatible backend: CC50 requests streamed from any server that
speaks OpenAI's ``/v1/completions`` or ``/v1/chat/completions`` (vLLM, TGI,
Ollama, llama-server, OpenAI itself).

It is the machinery of ``cc50tw.backends.http`` (the same SSE parser,
HTTP client, error taxonomy and pool of upstreams as the llama_server
backend) with OpenAI's conventions: a ``model`` in every request, an
``Authorization: Bearer`` key read from a file, and no llama.cpp
extensions in the body.  ``--openai-chat`` sends the prompt as one user
message to the chat API, so the server applies the model's chat template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.web.client import HTTPConnectionPool

from cc50tw.backends import BackendSpec, Repeatable
from cc50tw.backends.http import (
    Dialect,
    HTTPStreamingBackend,
    OpenAICompletionsDialect,
    UpstreamHTTPClient,
    UpstreamSettings,
    commonOptions,
    readKeyFile,
    settingsFrom,
    urlList,
)
from cc50tw.backends.http.routes import UpstreamRoute

#: Where vLLM, TGI and llama-server answer whether they can serve.  OpenAI
#: itself and Ollama have no such path: use /v1/models (with the key) there.
DEFAULT_HEALTH_PATH = "/health"


class OpenAIBackend(HTTPStreamingBackend):
    """Streams completions from one OpenAI-compatible server, or the least loaded of several."""

    name = "openai"
    upstream_name = "OpenAI-compatible server"
    option_prefix = "openai"
    endpoint_hint = "--openai-url (the server's base URL, without /v1) and --openai-chat"
    #: Strict OpenAI-compatible servers may refuse llama-server's fields.
    llamaExtensions = False

    def __init__(
        self,
        reactor: Any,
        urls: str | Sequence[str],
        model: str | None = None,
        chat: bool = False,
        api_key: str | None = None,
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
        ``routes`` (``--config``'s upstreams) replace ``urls``, ``model``,
        ``chat`` and ``api_key``: each upstream has its own.
        """
        self.model = model
        self.chat = chat
        fields.setdefault("health_path", DEFAULT_HEALTH_PATH)
        if settings is None:
            settings = UpstreamSettings(**fields)
        if api_key is not None:
            headers = {**settings.headers, b"Authorization": (b"Bearer " + api_key.encode("utf-8"),)}
            settings = attrs.evolve(settings, headers=headers)
        super().__init__(
            reactor, urls, settings, http=http, freshHTTP=freshHTTP, pool=pool, routes=routes, defaultModel=defaultModel
        )

    def makeDialect(self, where: str) -> Dialect:
        return OpenAICompletionsDialect(where, chat=self.chat, llamaExtensions=False, model=self.model)

    def models(self) -> list[str]:
        """
        The --model given, if any; without one, a request's model goes upstream as it is.
        With ``routes``, the models they serve, the default first.
        """
        if self.routes:
            return super().models()
        return [self.model] if self.model else []

    def describe(self) -> str:
        if self.routes:
            return super().describe()
        model = f"model {self.model!r}" if self.model else "no model named"
        key = "with an API key" if b"Authorization" in self.settings.headers else "no API key"
        return f"{super().describe()}; {model}, {key}"


def readAPIKey(path: str) -> str:
    """The key in ``path``; ``ValueError`` saying what is wrong with the file."""
    return readKeyFile(path, "--api-key-file")


def _healthPath(value: str) -> str | None:
    if value in ("", "none", "off"):
        return None
    if not value.startswith("/"):
        raise ValueError(f"must be a path starting with / (or 'none'), got {value!r}")
    return value


def build(options: Mapping[str, Any], reactor: Any) -> OpenAIBackend:
    routes = options.get("upstreams")
    if routes:  # --config's [[upstreams]]: cc50tw.config has refused --openai-url, --model and the rest
        return OpenAIBackend(
            reactor,
            (),
            routes=routes,
            defaultModel=options.get("default-model"),
            settings=settingsFrom(options, "openai", health_path=options["openai-health-path"]),
        )
    urls = urlList(options["openai-url"])
    for url in urls:
        if url.rstrip("/").endswith("/v1"):
            raise ValueError(f"--openai-url is the server's base URL, without /v1 (cc50tw adds /v1/...): {url!r}")
    if not urls:
        raise ValueError("--openai-url is required: the server's base URL, e.g. http://127.0.0.1:8000")
    return OpenAIBackend(
        reactor,
        urls,
        model=options["model"] or None,
        chat=bool(options["openai-chat"]),
        api_key=readAPIKey(options["api-key-file"]) if options["api-key-file"] else None,
        settings=settingsFrom(options, "openai", health_path=options["openai-health-path"]),
    )


SPEC = BackendSpec(
    name="openai",
    description="streams from OpenAI-compatible servers (vLLM, TGI, Ollama, llama-server) over HTTP",
    options=[
        [
            "openai-url",
            None,
            None,
            "Base URL of an OpenAI-compatible server, without /v1 (required); repeat it for a pool.",
            Repeatable(str),
        ],
        ["model", None, None, "Model name sent in every request (openai backend; most servers require it)."],
        [
            "api-key-file",
            None,
            None,
            "File holding the API key sent as 'Authorization: Bearer KEY' (openai backend).",
        ],
        [
            "openai-health-path",
            None,
            DEFAULT_HEALTH_PATH,
            "Path polled for each server's health: /health (vLLM, TGI, llama-server), /v1/models "
            "(OpenAI, Ollama), or none.",
            _healthPath,
        ],
        *commonOptions("openai", "openai"),
    ],
    flags=[
        ["openai-chat", None, "Use /v1/chat/completions, the prompt as one user message (default: /v1/completions)."],
    ],
    build=build,
)
