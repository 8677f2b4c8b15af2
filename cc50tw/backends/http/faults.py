"""
What went wrong upstream, and what each kind of failure means: the error
taxonomy of docs/backends.md, in one place.

A ``Fault`` says which CC50 error code the client gets (with the upstream's
own reason in the message), whether the request may move to another
upstream of the pool (only before any text reached the client), whether the
failure counts against the upstream's health (only what says the upstream
itself is unwell: never an error the request caused), and how long to keep
an overloaded upstream out of routing.  Pure: no I/O, so every row of the
table is a unit test.
"""

from __future__ import annotations

import email.utils
import json
import time

import attrs
from twisted.internet import error as netError
from twisted.python.failure import Failure

from cc50tw.codec import ErrorCode

#: Longest Retry-After honoured, in seconds: past it, a typo or a clock skew
#: would take an upstream out of routing for hours.
MAX_HOLD_OFF = 300.0

#: Longest upstream message quoted in an error (the log line and RESP_ERR).
MAX_MESSAGE = 500

#: How an upstream names a prompt that does not fit its context.
_CONTEXT_OVERFLOW = ("exceed_context_size_error", "context_length_exceeded", "context length", "context size", "context window")


@attrs.frozen
class Fault:
    code: ErrorCode
    message: str
    #: The request may move to another upstream, if nothing was streamed yet.
    retry: bool = False
    #: The upstream itself is unwell: passive health takes it out of routing.
    unhealthy: bool = False
    #: Overloaded: keep it out of routing this long (None: the pool's back-off).
    holdOff: float | None = None
    overloaded: bool = False
    #: The request may have reached the upstream.  A connection that was
    #: never made sent nothing, so moving on does not count as the retry.
    sent: bool = True

    @classmethod
    def backendError(cls, message: str) -> Fault:
        return cls(ErrorCode.BACKEND_ERROR, message)

    @property
    def outcome(self) -> str:
        """The ``cc50_upstream_requests_total{outcome}`` label."""
        if self.code == ErrorCode.CANCELLED:
            return "cancelled"
        return "failed" if self.unhealthy else "error"


def errorMessage(value: object) -> str:
    """The human part of an error body in llama-server's, OpenAI's, vLLM's or a plain shape, cut to a readable length."""
    message = _errorMessage(value)
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."


def _errorMessage(value: object) -> str:
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail") or inner.get("msg")
            if message:
                return str(message)
            return json.dumps(inner)[:500]
        if isinstance(inner, str) and inner:
            return inner
        detail = value.get("message") or value.get("detail")
        if detail:
            return str(detail)
    if isinstance(value, str):
        return value[:500] or "(no message)"
    return json.dumps(value)[:500]


def bodyMessage(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        return errorMessage(json.loads(text))
    except (ValueError, RecursionError):
        return text[:MAX_MESSAGE] or "(empty body)"


def _overflows(value: object, message: str) -> bool:
    """Whether an error says the prompt does not fit the model's context."""
    words = [message.lower()]
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            words += [str(inner.get("type", "")).lower(), str(inner.get("code", "")).lower()]
    return any(marker in word for marker in _CONTEXT_OVERFLOW for word in words)


def errorFault(value: object, prefix: str) -> Fault:
    """An error the upstream reported in its stream: never retried, never the upstream's health."""
    message = errorMessage(value)
    code = ErrorCode.TOO_LARGE if _overflows(value, message) else ErrorCode.BACKEND_ERROR
    return Fault(code, f"{prefix}: {message}")


def retryAfter(values: list[bytes] | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent or unreadable."""
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_HOLD_OFF)
    try:
        when = email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), MAX_HOLD_OFF)


def httpFault(status: int, body: bytes, where: str, path: str, hint: str, retryAfterHeader: list[bytes] | None = None) -> Fault:
    """An HTTP error status in place of the stream."""
    try:
        value: object = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        value = None
    message = errorMessage(value) if value is not None else bodyMessage(body)
    said = f"HTTP {status}: {message}"
    if status in (401, 403):
        return Fault(ErrorCode.BACKEND_ERROR, f"{where} refused our credentials ({said}); check the API key it expects")
    if status == 413 or (status in (400, 422) and _overflows(value, message)):
        return Fault(ErrorCode.TOO_LARGE, f"{where} says the request is too large ({said})")
    if status == 404:
        if "model" in message.lower():
            return Fault(ErrorCode.BAD_REQUEST, f"{where} does not serve that model ({said})")
        return Fault(ErrorCode.BACKEND_ERROR, f"{where} has no {path} ({said}); check {hint}")
    if status in (400, 422):
        return Fault(ErrorCode.BAD_REQUEST, f"{where} rejected the request ({said})")
    if status == 429:
        return Fault(
            ErrorCode.OVERLOADED,
            f"{where} is overloaded ({said}); retry later",
            retry=True,
            holdOff=retryAfter(retryAfterHeader),
            overloaded=True,
        )
    if status == 500:
        # One request can cause it (a prompt the tokenizer chokes on): tried
        # elsewhere once, but not held against the upstream.
        return Fault(ErrorCode.BACKEND_ERROR, f"{where} failed on the request ({said})", retry=True)
    if status in (502, 503):
        reason = "may still be loading its model" if status == 503 else "its gateway could not reach it"
        return Fault(
            ErrorCode.UPSTREAM_UNAVAILABLE, f"{where} is not ready ({said}); it {reason}, retry later", True, True
        )
    if status == 504:
        return Fault(ErrorCode.TIMEOUT, f"{where} timed out behind its gateway ({said})", True, True)
    if status >= 500:
        return Fault(ErrorCode.BACKEND_ERROR, f"{where} failed ({said})", True, True)
    return Fault(ErrorCode.BACKEND_ERROR, f"{where} rejected the request ({said})")


def _reasons(failure: Failure) -> list[Failure]:
    """``failure`` and the failures it wraps (ResponseFailed and friends keep a list), depth first."""
    found = [failure]
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list):
        for reason in reasons:
            if isinstance(reason, Failure):
                found += _reasons(reason)
    return found


def isTLSFailure(failure: Failure) -> bool:
    return _tlsReason(failure) is not None


def _tlsReason(failure: Failure) -> str | None:
    """The verifier's (or OpenSSL's) words, if the failure is a TLS one."""
    for reason in _reasons(failure):
        kind = type(reason.value)
        if kind.__module__.startswith(("OpenSSL", "service_identity")) or "VerificationError" in kind.__name__:
            args = reason.value.args if reason.value is not None else ()
            if args and isinstance(args[0], list):  # OpenSSL.SSL.Error: [(library, function, reason), ...]
                return "; ".join(str(item[-1]) for item in args[0] if item) or kind.__name__
            return str(reason.value) or kind.__name__
    return None


def causes(failure: Failure) -> str:
    """What lies under a wrapped failure, for messages: "ConnectionLost: ..."."""
    inner = [reason for reason in _reasons(failure)[1:]] or [failure]
    return "; ".join(f"{type(reason.value).__name__}: {reason.getErrorMessage()}".rstrip(": ") for reason in inner)


def neverAnswered(failure: Failure) -> bool:
    from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

    return failure.check(ResponseNeverReceived, RequestTransmissionFailed) is not None


def wasCancelled(failure: Failure) -> bool:
    """Cancelled: while connecting, directly, or (a request under way) as the reason the response never came."""
    from twisted.internet.defer import CancelledError

    return any(reason.check(CancelledError, netError.ConnectingCancelledError) for reason in _reasons(failure))


def connectionFault(failure: Failure, where: str, connectTimeout: float, optionPrefix: str) -> Fault:
    """The request never got an HTTP answer."""
    from twisted.web.client import ResponseFailed

    tls = _tlsReason(failure)
    if tls is not None:
        return Fault(ErrorCode.UPSTREAM_UNAVAILABLE, f"TLS with {where} failed: {tls}", True, True, sent=False)
    if failure.check(netError.TimeoutError):
        return Fault(
            ErrorCode.TIMEOUT,
            f"could not connect to {where} within {connectTimeout:g}s (--{optionPrefix}-connect-timeout)",
            True,
            True,
            sent=False,
        )
    if failure.check(netError.ConnectError, netError.DNSLookupError):
        return Fault(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"{where} is not reachable ({failure.getErrorMessage()}); is it running?",
            True,
            True,
            sent=False,
        )
    if neverAnswered(failure):
        return Fault(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"{where} closed the connection before answering ({causes(failure)})",
            True,
            True,
        )
    if failure.check(ResponseFailed):
        return Fault(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"{where} closed the connection while sending its response headers ({causes(failure)})",
            True,
            True,
        )
    return Fault.backendError(f"request to {where} failed: {failure.getErrorMessage()}")
