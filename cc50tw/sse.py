"""
Server-Sent Events, parsed incrementally, and text that is safe to forward.

Upstream inference servers (llama-server, vLLM, TGI, Ollama, OpenAI itself)
stream answers as ``text/event-stream``.  TCP cuts that stream wherever it
likes: an event may arrive over several reads, a read may hold several
events, and a CRLF may be split between two reads.  ``SSEParser`` is a pure
state machine (bytes in, events out, no I/O), so every such cut can be tested
byte by byte and every backend that speaks SSE shares one implementation.

The parser follows the WHATWG "event stream interpretation" rules: lines end
in CRLF, LF or CR; a blank line dispatches the event; lines starting with
``:`` are comments (servers send them as keep-alive pings); ``data`` lines
accumulate with newlines between them; an event without data is not
dispatched; a partial event at the end of the stream is discarded.

``TextAssembler`` exists because a CC50 chunk must never carry a broken
character.  Upstream text arrives in pieces that need not end on a character
boundary: raw UTF-8 bytes can stop mid-character, and a JSON string can end
in half of a ``\\ud83d\\ude00`` surrogate pair.  It holds such a tail back
until the rest arrives, and turns what can never be completed into U+FFFD.
"""

from __future__ import annotations

import codecs
import re
from typing import NamedTuple

#: Default bound on one event's size (its buffered lines plus the current
#: line), so a misbehaving upstream that never sends a newline cannot grow
#: our memory without limit.  llama-server's largest events (the final one,
#: with timings, or one with ``n_probs``) are a few KiB.
DEFAULT_MAX_EVENT_BYTES = 8 << 20

_BOM = "\ufeff"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


class SSEError(ValueError):
    """The byte stream cannot be an event stream we are willing to parse."""


class SSEEvent(NamedTuple):
    """One dispatched event; ``event`` is ``"message"`` unless the stream named it."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


#: Builds an ``SSEEvent`` from a tuple of all four fields without the
#: NamedTuple's generated ``__new__`` (a Python call), as ``cc50tw.codec``
#: builds its frames: this is once per token.
_newEvent = tuple.__new__


class SSEParser:
    """
    Incremental ``text/event-stream`` parser.

    Feed it bytes as they arrive; it returns the events completed by them.
    It decodes each line as UTF-8 on its own, which is safe because a
    line ending byte can never be part of a multi-byte UTF-8 character.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = b""
        self._skipCR = False  # the last read ended in CR: a leading LF is part of that line end
        self._firstLine = True
        self._data: list[str] = []
        self._hasData = False
        self._eventType = ""
        self._lastId: str | None = None
        self._retry: int | None = None
        self._eventBytes = 0
        self._errorField: list[str] = []

    @property
    def lastEventId(self) -> str | None:
        """The last ``id`` seen; kept across events, as the specification says."""
        return self._lastId

    @property
    def pending(self) -> bool:
        """Whether bytes of an event that has not been dispatched yet are held."""
        return bool(self._buffer) or self._hasData or bool(self._eventType) or bool(self._errorField)

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse ``data``, the next bytes of the stream; return the events it completes."""
        events: list[SSEEvent] = []
        if not data:
            return events
        if self._skipCR:
            self._skipCR = False
            if data[:1] == b"\n":
                data = data[1:]
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            lines = _LINE_END.split(buffer)
            # A CR that ends this read is a whole line ending, but an LF at the
            # start of the next read would belong to it, not end another line.
            self._skipCR = buffer.endswith(b"\r")
        else:
            lines = buffer.split(b"\n")  # the common case: LF only, one C-level split
        self._buffer = lines.pop()  # what follows the last line ending: an incomplete line
        for raw in lines:
            # What every inference server sends, once per token: one ``data``
            # line, then a blank line.  Both are handled here, without a call
            # per line; anything else takes the general path in ``_line``.
            if raw[:6] == b"data: " and not self._firstLine:
                size = self._eventBytes + len(raw)
                if size > self.max_event_bytes:
                    raise SSEError(f"event larger than {self.max_event_bytes} bytes without a blank line")
                self._eventBytes = size
                self._data.append(raw[6:].decode("utf-8", "replace"))
                self._hasData = True
            elif not raw and len(self._data) == 1 and not (self._eventType or self._errorField) and self._retry is None:
                events.append(_newEvent(SSEEvent, (self._data.pop(), "message", self._lastId, None)))
                self._hasData = False
                self._eventBytes = 0
            else:
                event = self._line(raw)
                if event is not None:
                    events.append(event)
        if self._eventBytes + len(self._buffer) > self.max_event_bytes:
            raise SSEError(f"event larger than {self.max_event_bytes} bytes without a blank line")
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        self._eventBytes += len(raw)
        if self._eventBytes > self.max_event_bytes:
            raise SSEError(f"event larger than {self.max_event_bytes} bytes without a blank line")
        line = raw.decode("utf-8", "replace")
        if self._firstLine:
            self._firstLine = False
            if line.startswith(_BOM):
                line = line[1:]
                if not line:
                    return self._dispatch()
        if line[0] == ":":
            return None  # a comment: llama-server's keep-alive ping is ":\n\n"
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._hasData = True
        elif field == "event":
            self._eventType = value
        elif field == "id":
            if "\0" not in value:
                self._lastId = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        elif field == "error":
            # Not a field of the specification: older llama-server builds
            # report a failure mid-stream as ``error: {json}``.  Kept, and
            # dispatched as an event named "error" if no data comes with it,
            # so the upstream's own message is not lost.
            self._errorField.append(value)
        # Any other field is ignored, as the specification requires.
        return None

    def _dispatch(self) -> SSEEvent | None:
        hasData, eventType = self._hasData, self._eventType
        data = "\n".join(self._data)
        self._data = []
        self._hasData = False
        self._eventType = ""
        self._eventBytes = 0
        retry, self._retry = self._retry, None
        errorField, self._errorField = self._errorField, []
        if not hasData:
            if errorField:
                return SSEEvent("\n".join(errorField), "error", self._lastId, retry)
            return None
        return SSEEvent(data, eventType or "message", self._lastId, retry)

    def finish(self) -> SSEEvent | None:
        """
        At the end of the body: an ``error:`` line of an event the stream
        never completed, as an "error" event (its message is worth more than
        the rule that discards a partial event); otherwise nothing.
        """
        if self._buffer:
            self._line(self._buffer)
            self._buffer = b""
        if self._errorField:
            self._data, self._hasData = [], False
            return self._dispatch()
        return None


class TextAssembler:
    """
    Turns pieces of upstream text into strings made of whole characters only.

    ``decode`` takes raw UTF-8 bytes; ``text`` takes ``str`` pieces such as
    JSON string values, which may end in a lone high surrogate whose partner
    arrives in the next piece.  Both return what can be forwarded now (possibly
    ``""``); ``finish`` returns the held tail at the end of the stream, with
    anything that never became a whole character replaced by U+FFFD.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._highSurrogate = ""

    def decode(self, data: bytes) -> str:
        """Forwardable text from the next raw UTF-8 bytes."""
        return self.text(self._decoder.decode(data))

    def text(self, piece: str) -> str:
        """Forwardable text from the next decoded piece (surrogates allowed)."""
        if self._highSurrogate:
            piece = self._highSurrogate + piece
            self._highSurrogate = ""
        if not piece:
            return ""
        if piece.isascii():
            return piece  # most tokens: no surrogate to pair, nothing held
        if "\ud800" <= piece[-1] <= "\udbff":
            self._highSurrogate = piece[-1]
            piece = piece[:-1]
        return _joinSurrogates(piece)

    def finish(self) -> str:
        """What was held back, now that nothing more will come."""
        tail = self.text(self._decoder.decode(b"", final=True))
        if self._highSurrogate:
            self._highSurrogate = ""
            tail += _REPLACEMENT
        return tail

    @property
    def holding(self) -> bool:
        """Whether part of a character is held back."""
        return bool(self._highSurrogate) or bool(self._decoder.getstate()[0])


def _joinSurrogates(text: str) -> str:
    """Pair surrogates into characters and replace the ones with no partner."""
    if _SURROGATE.search(text) is None:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if "\ud800" <= c <= "\udbff" and i + 1 < n and "\udc00" <= text[i + 1] <= "\udfff":
            out.append(chr(0x10000 + ((ord(c) - 0xD800) << 10) + (ord(text[i + 1]) - 0xDC00)))
            i += 2
            continue
        out.append(_REPLACEMENT if "\ud800" <= c <= "\udfff" else c)
        i += 1
    return "".join(out)
