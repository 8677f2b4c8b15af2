"""
The frame-receiving half of a CC50 connection, shared by server and client.

Shaped like ``twisted.protocols.basic.Int32StringReceiver``: subclasses get
``frameReceived`` for whole frames, ``lengthLimitExceeded`` when a header
announces more than ``MAX_LENGTH`` payload bytes (which are then skipped, never
buffered), and ``streamCorrupted`` when the byte stream cannot be CC50.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import Protocol

from cc50tw.codec import Frame, FrameDecoder, Oversized, ProtocolError


def setTcpNoDelay(transport: object) -> None:
    """
    Send small frames at once.  With Nagle's algorithm on, a chunk written
    while an earlier one is unacknowledged waits for the peer's delayed ACK:
    about 40 ms per request on Linux, for any request of more than one chunk.
    Unix sockets and test transports have no such option.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


class CC50Receiver(Protocol):
    #: Largest payload accepted into memory; a frame's header is 24 bytes more.
    MAX_LENGTH = 1 << 20

    #: A subclass that receives RESP_CHUNK frames by the million (the client)
    #: sets this to a callable taking ``(req_id, payload)``: chunk frames then
    #: go straight to it instead of through ``frameReceived`` as ``Frame``
    #: objects.  It returns true to stop reading this data (the connection is
    #: closing), having delivered nothing.
    _chunkReceiver: Callable[[int, bytes], bool] | None = None

    _decoder: FrameDecoder | None = None

    #: While true, frames stay buffered instead of being delivered; see ``pauseReading``.
    readingPaused = False
    #: Bytes that arrived while reading was paused, not yet parsed.
    _held: list[bytes] | None = None
    _heldSize = 0

    def pauseReading(self) -> None:
        """
        Stop delivering frames, and stop reading the transport, until ``resumeReading``.

        A receiver whose replies cannot be written (the peer does not read)
        must not go on reading requests that earn replies: they would queue
        without bound.  This is ``twisted.protocols.basic``'s pauseable
        receiver: the transport stops reading, and frames already read stay
        buffered (at most what one read brought) until resumed.
        """
        if self.readingPaused:
            return
        self.readingPaused = True
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()

    def resumeReading(self) -> None:
        """Read again, first delivering what was held while paused."""
        if not self.readingPaused:
            return
        self.readingPaused = False
        held, self._held, self._heldSize = self._held, None, 0
        # This class's own delivery, not a subclass's accounting: these bytes were counted on arrival.
        CC50Receiver.dataReceived(self, b"".join(held) if held else b"")
        if not self.readingPaused:
            resume = getattr(self.transport, "resumeProducing", None)
            if resume is not None and not getattr(self.transport, "disconnecting", False):
                resume()

    def discardInput(self) -> None:
        """Nothing more will be read (the connection is closing): free what is buffered."""
        self._decoder = FrameDecoder(0)
        self._held, self._heldSize = None, 0

    @property
    def heldBytes(self) -> int:
        """Bytes received while paused and not yet parsed."""
        return self._heldSize

    def dataReceived(self, data: bytes) -> None:
        if self.readingPaused:
            # A transport may deliver what it had already read after being
            # paused; keep it, unparsed, for resumeReading.
            if self._held is None:
                self._held = []
            self._held.append(data)
            self._heldSize += len(data)
            return
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = FrameDecoder(self.MAX_LENGTH)
        if self._chunkReceiver is None:
            # One read holding one whole frame (a client waiting for each
            # answer): no parsing loop to set up.
            frame = decoder.whole(data)
            if frame is not None:
                if self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
                    self.wholeFrameReceived(frame)
                return
        try:
            while True:
                for item in decoder.feed(data, self._chunkReceiver):
                    if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
                        return
                    if type(item) is Frame:
                        self.frameReceived(item)
                    else:
                        self.lengthLimitExceeded(item)  # type: ignore[arg-type]
                    if self.readingPaused:
                        return  # the rest stays in the decoder until resumeReading
                    if self._limitChanged:
                        break  # the decoder read its limit once per feed: start a new one
                else:
                    return
                self._limitChanged = False
                data = b""
        except ProtocolError as error:
            self.streamCorrupted(error)

    def wholeFrameReceived(self, frame: Frame) -> None:
        """
        A read that held exactly ``frame``, nothing before or after it: a
        peer waiting for each answer.  ``frameReceived``, unless a subclass
        does more for such a read (the server sends its answer sooner).
        """
        self.frameReceived(frame)

    def setMaxLength(self, maxLength: int) -> None:
        """Change the frame limit, effective from the next frame (frames of the same read included)."""
        self.MAX_LENGTH = maxLength
        if self._decoder is not None:
            self._decoder.max_payload = maxLength
            self._limitChanged = True

    _limitChanged = False

    @property
    def bufferedBytes(self) -> int:
        """Bytes of an incomplete frame held in memory."""
        return self._decoder.buffered if self._decoder is not None else 0

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError

    def lengthLimitExceeded(self, header: Oversized) -> None:
        """A frame too large to accept; its payload is being discarded."""
        self.transport.loseConnection()  # type: ignore[union-attr]

    def streamCorrupted(self, error: ProtocolError) -> None:
        """Bad magic or version: framing is lost, so the connection must go."""
        self.transport.loseConnection()  # type: ignore[union-attr]
