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

    def dataReceived(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = FrameDecoder(self.MAX_LENGTH)
        try:
            for item in decoder.feed(data, self._chunkReceiver):
                if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
                    return
                if type(item) is Frame:
                    self.frameReceived(item)
                else:
                    self.lengthLimitExceeded(item)  # type: ignore[arg-type]
        except ProtocolError as error:
            self.streamCorrupted(error)

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
