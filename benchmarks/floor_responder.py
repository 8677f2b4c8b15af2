"""
The floor (issue 18): the least a Twisted CC50 server can do per request.

It answers each REQ_INFER with one RESP_CHUNK ``" token"`` and a RESP_DONE,
and nothing else: no limits, metrics, logging or backend.  A ``twistd cc50``
round trip set against this one, in the same run, shows what cc50tw costs
beyond Twisted itself on that machine.

With ``--send-now`` it also sends its replies in the read, as cc50tw does
(``cc50tw.sendnow``), instead of leaving them queued for the reactor's next
turn: the floor for cc50tw's own work alone, without what sending early saves.

    python benchmarks/floor_responder.py [--send-now] tcp:9199:interface=127.0.0.1
"""

from __future__ import annotations

import struct
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol

HEADER = struct.Struct("<IHHQII")  # magic, version, type, req_id, flags, length
MAGIC, REQ_INFER, RESP_CHUNK, RESP_DONE = 0x30354343, 1, 2, 3
CHUNK, DONE = b" token", struct.pack("<IIQ", 1, 0, 0)  # DONE: tokens, reserved, elapsed_us
SEND_NOW = "--send-now" in sys.argv


class Responder(Protocol):
    buffer = b""
    transport: ITCPTransport

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # as cc50tw's server does

    def dataReceived(self, data: bytes) -> None:
        buffer, offset, replies = self.buffer + data, 0, list[bytes]()
        while len(buffer) - offset >= HEADER.size:
            _magic, _version, kind, reqId, _flags, length = HEADER.unpack_from(buffer, offset)
            if len(buffer) - offset < HEADER.size + length:
                break
            offset += HEADER.size + length
            if kind == REQ_INFER:
                replies += (HEADER.pack(MAGIC, 1, RESP_CHUNK, reqId, 0, len(CHUNK)), CHUNK)
                replies += (HEADER.pack(MAGIC, 1, RESP_DONE, reqId, 0, len(DONE)), DONE)
        self.buffer = buffer[offset:]
        if replies:
            self.transport.write(b"".join(replies))
            if SEND_NOW and not self.transport.disconnecting:  # type: ignore[attr-defined]
                self.transport.doWrite()  # type: ignore[attr-defined]  # a tcp.Server


if __name__ == "__main__":
    listen = [arg for arg in sys.argv[1:] if arg != "--send-now"][0]
    serverFromString(reactor, listen).listen(Factory.forProtocol(Responder))
    print(f"floor responder listening on {listen}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
