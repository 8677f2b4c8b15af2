"""
The settings every HTTP backend shares, and the command-line options that
set them: one record, ``UpstreamSettings``, instead of a dozen keyword
arguments repeated by each backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from hyperlink import EncodedURL

from cc50tw.backends.pool import DEFAULT_BACKOFF

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


@attrs.frozen
class UpstreamSettings:
    """How a backend talks to its upstreams; every field is an option of each HTTP backend."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    first_event_timeout: float = DEFAULT_FIRST_EVENT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    health_path: str | None = "/health"
    backoff: float = DEFAULT_BACKOFF
    #: Stream a reasoning model's thinking (``reasoning_content``) to the
    #: client with the answer; off, it is dropped (its tokens still count).
    reasoning: bool = True
    #: Sent with every request, health checks included (``Authorization``).
    headers: Mapping[bytes, tuple[bytes, ...]] = attrs.field(factory=dict)
    #: Backend-wide request body fields (``--llama-extra-body``): under the
    #: request's own fields and options, which win.
    extra_body: Mapping[str, Any] = attrs.field(factory=dict)


def normalizeURL(url: str, option: str = "--llama-url") -> str:
    """
    ``url`` without a trailing slash, after checking it is an http(s) URL
    with a host, and in its ASCII form (IDNA host, percent-encoded path), so
    each request can send it as bytes without parsing it again.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{option} must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        # Never sent (the Agent ignores them), yet logged and on /metrics.
        raise ValueError(f"{option} must not hold credentials (user:password@); give an API key file instead")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{option} has a bad port: {url!r}") from None
    # One spelling per upstream, so that duplicates are found and metrics agree:
    # the scheme and host in lower case, no default port.
    host = parts.hostname
    hostText = f"[{host}]" if ":" in host else host
    default = 80 if parts.scheme == "http" else 443
    netloc = hostText if port in (None, default) else f"{hostText}:{port}"
    url = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
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


#: A key is a line; a larger file is the wrong file (or /dev/zero).
MAX_KEY_FILE_BYTES = 64 * 1024


def readKeyFile(path: str, what: str) -> str:
    """The API key in ``path``, whitespace around it removed; ``ValueError`` naming ``what`` and the problem."""
    try:
        with open(path, "rb") as keyFile:
            raw = keyFile.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{what}: {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path} holds bytes that are not ASCII") from None
    if not key:
        raise ValueError(f"{what}: {path} is empty")
    if any(not 0x20 < ord(c) < 0x7F for c in key):
        raise ValueError(f"{what}: {path} holds more than one line, or spaces or control characters")
    return key


def positiveSeconds(value: str) -> float:
    number = float(value)
    if not 0 < number < float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return number


def intervalSeconds(value: str) -> float:
    """Seconds between health checks: 0 turns them off."""
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError(f"must be 0 (off) or a positive number of seconds, got {value}")
    return number


def reasoningChoice(value: str) -> bool:
    choice = value.strip().lower()
    if choice not in ("stream", "drop"):
        raise ValueError(f"must be 'stream' or 'drop', got {value!r}")
    return choice == "stream"


def urlList(value: object) -> list[str]:
    """A repeatable URL option's value as a list, whatever shape it came in."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)  # type: ignore[call-overload]


def commonOptions(prefix: str, backend: str) -> list[list[Any]]:
    """The timeout, health, back-off and reasoning options of ``backend``, whose options start with ``prefix``."""
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
            "Seconds an upstream gets no requests after a failure that says it is unwell (docs/backends.md), "
            f"doubled with each further failure in a row up to 8 times ({backend} backend).",
            positiveSeconds,
        ],
        [
            f"{prefix}-reasoning",
            None,
            "stream",
            "stream|drop: what to do with a reasoning model's thinking (reasoning_content): stream it to the "
            f"client with the answer, or drop it (its tokens still count) ({backend} backend).",
            reasoningChoice,
        ],
        [
            f"{prefix}-extra-body",
            None,
            None,
            "JSON object of fields added to every upstream request body, e.g. '{\"mirostat\": 2}'; a request's "
            f"own options and 'extra' fields win ({backend} backend).",
            jsonObject,
        ],
    ]


def jsonObject(value: str) -> dict[str, Any]:
    """A JSON object given on the command line (``--llama-extra-body``)."""
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise ValueError(f"must be a JSON object, e.g. '{{\"mirostat\": 2}}': {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


def settingsFrom(options: Mapping[str, Any], prefix: str, **more: Any) -> UpstreamSettings:
    """``UpstreamSettings`` from the options made by ``commonOptions`` (and ``more`` fields)."""
    reasoning = options.get(f"{prefix}-reasoning", True)
    return UpstreamSettings(
        connect_timeout=options[f"{prefix}-connect-timeout"],
        first_event_timeout=options[f"{prefix}-first-event-timeout"],
        idle_timeout=options[f"{prefix}-idle-timeout"],
        health_interval=options[f"{prefix}-health-interval"],
        backoff=options[f"{prefix}-backoff"],
        reasoning=reasoningChoice(reasoning) if isinstance(reasoning, str) else bool(reasoning),
        extra_body=options.get(f"{prefix}-extra-body") or {},
        **more,
    )
