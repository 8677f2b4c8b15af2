"""
The request log (one line per finished request), made cheap.

Emitted as a ``twisted.logger`` event, the line cost more than the whole
request (issue 18): about 100 µs of CPU on a 2-vCPU machine, most of it
Twisted's field-by-field ``string.Formatter`` walk over twelve fields, then a
timestamp built with ``strftime`` and a write and flush per line, all before
the reactor got back to sending the reply.  A production access log formats
once and writes in batches, and so does this one: when cc50tw's own observer
owns twistd's log (``cc50tw.logs``, which installs it for the text and json
formats), a finished request only appends its figures (a ``RequestRecord``)
and the time to a buffer.  The buffer is formatted, with plain string
formatting, in exactly the form the observer would have written each line,
then written and flushed every ``FLUSH_INTERVAL`` seconds, before any other
log event (so lines stay in order), when it grows large, and at shutdown:
the formatting is paid in batches, off the path from request to reply.

Anywhere else (tests capturing events, ``twist``, syslog, a ``--logger`` of
the user's), the line is the ``twisted.logger`` event it always was.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any, NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, eventAsJSON, formatTime
from twisted.python.compat import ioType
from zope.interface import implementer

#: Seconds a line may wait in the buffer: short enough for someone tailing the
#: log, long enough that a busy server writes hundreds of lines per flush.
FLUSH_INTERVAL = 0.1

#: Lines held before a flush whatever the timer says, to bound the buffer.
#: Lines are formatted when flushed, on the reactor, so this also bounds
#: how long one flush holds the reactor: 512 text lines take about 1.5 ms.
MAX_BUFFERED_LINES = 512

#: The same for ``--log-format=json``, whose lines cost some 22 µs each to
#: format: 64 keep a flush's stall near that of the text form's 512.
MAX_BUFFERED_JSON_LINES = 64

#: The event's format: what ``formatEvent`` and the json form's ``log_format`` show.
REQUEST_FORMAT = (
    "request {req_id} from {peer}: {outcome} backend={backend}{model_text} tokens={tokens} "
    "prompt_tokens={prompt_tokens} bytes={bytes} latency_ms={latency_ms:.3f} ttft_ms={ttft_text}"
    "{finish_text}{detail}"
)

# The json form's constant parts, as ``eventAsJSON`` writes them (the log
# level with its class marker; the logger and source, which JSON cannot hold).
_SAVED = json.loads(eventAsJSON({"log_level": LogLevel.info, "log_logger": object(), "log_format": ""}))
_INFO_JSON, _UNPERSISTABLE_JSON = _SAVED["log_level"], _SAVED["log_logger"]


class RequestRecord(NamedTuple):
    """One finished request's figures, as ``logRequest`` takes them."""

    reqId: int
    peer: str
    outcome: str
    backend: str
    model: str | None
    tokens: int | None
    promptTokens: int | None
    bytesSent: int
    latencyMs: float
    ttftMs: float | None
    message: str
    finishReason: str | None


_newTuple = tuple.__new__


def requestFields(record: RequestRecord) -> dict[str, Any]:
    """The request line's event fields: what ``REQUEST_FORMAT`` and the json form show."""
    (reqId, peer, outcome, backend, model, tokens, promptTokens, bytesSent, latencyMs, ttftMs, message, finishReason) = record
    return {
        "req_id": reqId,
        "peer": peer,
        "outcome": outcome,
        "backend": backend,
        "model": model,
        "model_text": f" model={model if model.isprintable() and ' ' not in model else repr(model)}"
        if model is not None
        else "",
        "tokens": tokens,
        "prompt_tokens": promptTokens,
        "bytes": bytesSent,
        "latency_ms": latencyMs,
        "ttft_ms": ttftMs,
        "ttft_text": f"{ttftMs:.3f}" if ttftMs is not None else "none",
        "detail": f" ({message})" if message else "",
        "finish_reason": finishReason,
        "finish_text": f" finish={finishReason}" if finishReason else "",
    }


class AccessLogSink:
    """
    A buffered writer of request lines to the file the log observer writes to.

    ``formatLine(namespace, fields, when)`` turns a request's fields
    (``requestFields``) into the line the observer would have written for the
    equivalent event; it runs when the buffer is flushed.
    """

    observer: ILogObserver

    def __init__(
        self,
        output: IO[Any],
        formatLine: Callable[[str, dict[str, Any], float], str],
        reactor: IReactorTime,
        interval: float = FLUSH_INTERVAL,
        maxBuffered: int = MAX_BUFFERED_LINES,
    ) -> None:
        self.output = output
        self.formatLine = formatLine
        self.reactor = reactor
        self.interval = interval
        self.maxBuffered = maxBuffered
        #: What is waiting to be written: (namespace, record, time).
        self.pending: list[tuple[str, RequestRecord, float]] = []
        #: The wall clock stamped on lines, as ``Logger.emit`` stamps events.
        self.now: Callable[[], float] = time.time
        self._timer: IDelayedCall | None = None
        #: Text or bytes, as ``FileLogObserver`` decides for the same file.
        self._encode = ioType(output) is not str
        self._torn = False

    def add(self, namespace: str, request: RequestRecord) -> None:
        """Buffer one request's line, to be formatted when it is written."""
        pending = self.pending
        pending.append((namespace, request, self.now()))
        if len(pending) >= self.maxBuffered:
            self.flush()
        elif self._timer is None:
            self._timer = self.reactor.callLater(self.interval, self._timerFlush)

    def _timerFlush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write and flush what is buffered; a failing write loses those lines, never the server."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        formatLine = self.formatLine
        lines = []
        for namespace, request, when in pending:
            try:
                lines.append(formatLine(namespace, requestFields(request), when))
            except Exception as e:  # a line that cannot be formatted is lost alone, and said so
                stderr = sys.__stderr__
                if stderr is not None:
                    stderr.write(f"cc50: could not format a request log line: {e!r}\n")
        text = "".join(lines)
        if self._torn:
            text = "\n" + text  # the last batch may have stopped mid-line
        # Replacement, not an error: one unencodable line must not lose its batch.
        data: str | bytes = text.encode("utf-8", "backslashreplace") if self._encode else text
        try:
            while data:
                # An unbuffered file (LogFile's) writes short, not raising, when the disk fills.
                written = self.output.write(data)  # type: ignore[arg-type]
                if written is None or written >= len(data):
                    break
                if written <= 0:
                    raise OSError(f"no room: {len(data)} bytes not written")
                data = data[written:]
            self.output.flush()
        except (OSError, ValueError) as e:  # a full disk, a closed file: say so on stderr, once per batch
            stderr = sys.__stderr__
            if stderr is not None:
                lost = data.count(b"\n") if isinstance(data, bytes) else data.count("\n")
                stderr.write(f"cc50: could not write {lost} request log lines: {e}\n")
            self._torn = True
            return
        self._torn = False


@implementer(ILogObserver)
class FlushingObserver:
    """
    Wraps the log's observer: the buffered request lines go out first, so
    the file keeps the order in which things happened.
    """

    def __init__(self, observer: ILogObserver, sink: AccessLogSink) -> None:
        self.observer = observer
        self.sink = sink

    def __call__(self, event: LogEvent) -> None:
        self.sink.flush()
        self.observer(event)


#: The sink the request lines go to, once cc50tw's observer owns the log
#: (``install``); ``None``: they are ``twisted.logger`` events.  Process-wide,
#: as the log itself is (``globalLogBeginner``).
_sink: AccessLogSink | None = None


def install(
    observer: ILogObserver,
    output: IO[Any],
    formatLine: Callable[[str, dict[str, Any], float], str],
    reactor: Any = None,
    maxBuffered: int = MAX_BUFFERED_LINES,
) -> ILogObserver:
    """
    Send request lines to ``output`` through a buffer; returns the observer to
    give twistd (``observer``, flushing the buffer before each event).  The
    buffer is also flushed after the reactor shuts down.
    """
    global _sink
    if reactor is None:
        from twisted.internet import reactor
    _sink = AccessLogSink(output, formatLine, reactor, maxBuffered=maxBuffered)
    if IReactorCore.providedBy(reactor):
        reactor.addSystemEventTrigger("after", "shutdown", _sink.flush)
    return FlushingObserver(observer, _sink)


def uninstall() -> None:
    """Back to events (tests); flushes first."""
    global _sink
    if _sink is not None:
        _sink.flush()
    _sink = None


def logRequest(
    log: Logger,
    reqId: int,
    peer: str,
    outcome: str,
    backend: str,
    model: str | None,
    tokens: int | None,
    promptTokens: int | None,
    bytesSent: int,
    latencyMs: float,
    ttftMs: float | None,
    message: str,
    finishReason: str | None,
) -> None:
    """One request's line: buffered when a sink is installed, else a ``twisted.logger`` event."""
    # Built as the bare tuple it is: a NamedTuple's generated ``__new__`` is a Python call.
    record = _newTuple(
        RequestRecord,
        (reqId, peer, outcome, backend, model, tokens, promptTokens, bytesSent, latencyMs, ttftMs, message, finishReason),
    )
    sink = _sink
    if sink is None:
        log.info(REQUEST_FORMAT, **requestFields(record))
    else:
        sink.add(log.namespace, record)


def requestText(fields: dict[str, Any]) -> str:
    """``REQUEST_FORMAT`` filled in, as ``twisted.logger.formatEvent`` fills it."""
    f = fields
    return (
        f"request {f['req_id']} from {f['peer']}: {f['outcome']} backend={f['backend']}{f['model_text']} "
        f"tokens={f['tokens']} prompt_tokens={f['prompt_tokens']} bytes={f['bytes']} "
        f"latency_ms={f['latency_ms']:.3f} ttft_ms={f['ttft_text']}{f['finish_text']}{f['detail']}"
    )


class TextLines:
    """
    Lines as ``textFileLogObserver`` writes them: ``TIME [NAMESPACE#info] TEXT``.

    The timestamp has whole seconds, so it is formatted once per second.
    """

    def __init__(self, timeFormat: str | None = None) -> None:
        from twisted.logger import timeFormatRFC3339

        self.timeFormat = timeFormatRFC3339 if timeFormat is None else timeFormat
        self._second = -1
        self._stamp = ""

    def __call__(self, namespace: str, fields: dict[str, Any], when: float) -> str:
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(when, self.timeFormat)
            self._second = second
        text = requestText(fields)
        if "\n" in text:  # as formatEventAsClassicLogText indents continuation lines
            text = text.replace("\n", "\n\t")
        return f"{self._stamp} [{namespace}#info] {text}\n"


def jsonLine(namespace: str, fields: dict[str, Any], when: float) -> str:
    """The line ``jsonFileLogObserver(recordSeparator="")`` writes for the equivalent event."""
    event = dict(fields)
    event["log_logger"] = _UNPERSISTABLE_JSON
    event["log_level"] = _INFO_JSON
    event["log_namespace"] = namespace
    event["log_source"] = _UNPERSISTABLE_JSON
    event["log_format"] = REQUEST_FORMAT
    event["log_time"] = when
    flattened: dict[str, Any] = {}
    for name in ("req_id", "peer", "outcome", "backend", "model_text", "tokens", "prompt_tokens", "bytes"):
        value = fields[name]
        flattened[f"{name}!s:"] = str(value)
        flattened[f"{name}!:"] = value
    latency = fields["latency_ms"]
    flattened["latency_ms!s:.3f"] = str(latency)
    flattened["latency_ms!:.3f"] = latency
    for name in ("ttft_text", "finish_text", "detail"):
        value = fields[name]
        flattened[f"{name}!s:"] = str(value)
        flattened[f"{name}!:"] = value
    event["log_flattened"] = flattened
    return json.dumps(event) + "\n"
