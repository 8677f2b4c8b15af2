"""
Errors that end one request, carrying the CC50 error code they map to.

Backends raise ``BackendError`` so the server can tell a client *why* (the
upstream is down, the prompt is too long) with a code a program can act on,
instead of a bare "backend error".
"""

from __future__ import annotations

from cc50tw.codec import ErrorCode


class RequestFailed(Exception):
    """Ends a request with RESP_ERR ``code`` and ``message`` (text for a person)."""

    code: ErrorCode = ErrorCode.BACKEND_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BackendError(RequestFailed):
    """The backend could not produce the answer."""


class ClientError(RequestFailed):
    """
    What the client library raises when the server answered RESP_ERR.

    ``code`` is the raw flags value, which may be a code this version does
    not know, so it is kept as an int alongside the enum where possible.
    """

    def __init__(self, req_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.req_id = req_id
        self.raw_code = code
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.UNKNOWN

    def __str__(self) -> str:
        return f"request {self.req_id} failed: {self.code.name} ({self.raw_code}): {self.message}"
