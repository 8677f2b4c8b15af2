"""
Endpoint descriptions, with the C++ tools' ``HOST:PORT`` habit accepted too.

Twisted's endpoint strings (``tcp:9199:interface=127.0.0.1``, ``unix:/path``,
``ssl:...``) are the native form; people arriving from the C++ CC50 tools type
``127.0.0.1:9199``, so that is translated rather than rejected.
"""

from __future__ import annotations

import re

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$")

#: Endpoint types that must never be mistaken for a host name.
_ENDPOINT_TYPES = {"tcp", "tcp6", "unix", "ssl", "tls", "systemd", "launchd", "onion", "stdio"}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def server_description(text: str) -> str:
    """``9199``, ``HOST:PORT`` or ``[v6]:PORT`` become a ``tcp:`` description; others pass through."""
    text = text.strip()
    if text.isdigit():
        return f"tcp:{text}"
    match = _HOST_PORT.match(text)
    if match is None or (match.group("host") or "").lower() in _ENDPOINT_TYPES:
        return text
    host = match.group("v6") or match.group("host")
    port = match.group("port")
    kind = "tcp6" if match.group("v6") else "tcp"
    return f"{kind}:{port}:interface={_escape(host)}" if host else f"{kind}:{port}"


def client_description(text: str) -> str:
    """``HOST:PORT`` or ``[v6]:PORT`` become ``tcp:HOST:PORT``; endpoint strings pass through."""
    text = text.strip()
    match = _HOST_PORT.match(text)
    if match is None or (match.group("host") or "").lower() in _ENDPOINT_TYPES:
        return text
    host = match.group("v6") or match.group("host") or "127.0.0.1"
    return f"tcp:host={_escape(host)}:port={match.group('port')}"
