"""
Streaming completions from HTTP inference servers: what the ``llama_server``
and ``openai`` backends share, one idea per module:

- ``dialects``: each upstream API's request body and events (pure);
- ``faults``: the error taxonomy, what each failure means (pure);
- ``client``: connections and requests (a Twisted ``Agent``);
- ``attempt``: one HTTP request of a stream, with its parser and timers;
- ``stream``: one CC50 request: the sink's producer and the retry policy;
- ``health``: active health checks;
- ``backend``: ``HTTPStreamingBackend``, the ``IBackend`` over a pool;
- ``options``: ``UpstreamSettings`` and the command-line options.
"""

from cc50tw.backends.http.backend import HTTPStreamingBackend
from cc50tw.backends.http.client import (
    CACHED_CONNECTION_TIMEOUT,
    MAX_PERSISTENT_PER_HOST,
    UpstreamEndpoints,
    UpstreamHTTPClient,
    makeHTTPClient,
    upstreamAgent,
)
from cc50tw.backends.http.dialects import (
    ENDPOINTS,
    CompletionDialect,
    Delta,
    Dialect,
    OpenAICompletionsDialect,
    Progress,
    dialectFor,
)
from cc50tw.backends.http.faults import Fault
from cc50tw.backends.http.options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FIRST_EVENT_TIMEOUT,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_IDLE_TIMEOUT,
    UpstreamSettings,
    commonOptions,
    normalizeURL,
    positiveSeconds,
    readKeyFile,
    settingsFrom,
    urlList,
)
from cc50tw.backends.http.stream import UpstreamStream

__all__ = [
    "CACHED_CONNECTION_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_FIRST_EVENT_TIMEOUT",
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_IDLE_TIMEOUT",
    "ENDPOINTS",
    "MAX_PERSISTENT_PER_HOST",
    "CompletionDialect",
    "Delta",
    "Dialect",
    "Fault",
    "HTTPStreamingBackend",
    "OpenAICompletionsDialect",
    "Progress",
    "UpstreamEndpoints",
    "UpstreamHTTPClient",
    "UpstreamSettings",
    "UpstreamStream",
    "commonOptions",
    "dialectFor",
    "makeHTTPClient",
    "normalizeURL",
    "positiveSeconds",
    "readKeyFile",
    "settingsFrom",
    "upstreamAgent",
    "urlList",
]
