"""
The bridge floor (issue 18): the least a Twisted SSE-to-CC50 bridge can do.

Each REQ_INFER becomes one streamed POST to llama-server's ``/completion``
through a plain ``Agent``; the body is split on blank lines, each ``data:``
event goes through ``json.loads``, its ``content`` out as one RESP_CHUNK,
and ``stop: true`` (or the body's end) sends RESP_DONE.  No limits, retries,
timeouts, credit, metrics or logging.  ``twistd cc50 --backend=llama_server``
set against this one, in the same run, shows what cc50tw costs per token
beyond Twisted itself.

    python benchmarks/floor_bridge.py tcp:9198:interface=127.0.0.1 http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import struct
import sys
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

HEADER = struct.Struct("<IHHQII")  # magic, version, type, req_id, flags, length
INFER = struct.Struct("<III")  # max_tokens, credit_bytes, prompt_len
MAGIC, REQ_INFER, RESP_CHUNK, RESP_DONE = 0x30354343, 1, 2, 3
DONE = struct.Struct("<IIQ")  # tokens, reserved, elapsed_us
HEADERS = Headers({b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]})


class Events(Protocol):
    """One answer's body: each event's text out as a frame, RESP_DONE once."""

    def __init__(self, bridge: Bridge, reqId: int) -> None:
        self.bridge, self.reqId, self.buffer, self.tokens, self.done = bridge, reqId, b"", 0, False

    def dataReceived(self, data: bytes) -> None:
        *events, self.buffer = (self.buffer + data).split(b"\n\n")
        for event in events:
            if self.done or not event.startswith(b"data: "):
                continue
            value = json.loads(event[6:])
            text = value.get("content", "").encode()
            if text:
                self.tokens += 1
                self.bridge.send(RESP_CHUNK, self.reqId, text)
            if value.get("stop"):
                self.finish()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.bridge.send(RESP_DONE, self.reqId, DONE.pack(self.tokens, 0, 0))


class Bridge(Protocol):
    buffer = b""
    transport: ITCPTransport

    def __init__(self, agent: Agent, url: bytes) -> None:
        self.agent, self.url = agent, url

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # as cc50tw's server does

    def send(self, kind: int, reqId: int, payload: bytes) -> None:
        self.transport.write(HEADER.pack(MAGIC, 1, kind, reqId, 0, len(payload)) + payload)

    def dataReceived(self, data: bytes) -> None:
        buffer, offset = self.buffer + data, 0
        while len(buffer) - offset >= HEADER.size:
            _magic, _version, kind, reqId, _flags, length = HEADER.unpack_from(buffer, offset)
            if len(buffer) - offset < HEADER.size + length:
                break
            payload = buffer[offset + HEADER.size : offset + HEADER.size + length]
            offset += HEADER.size + length
            if kind == REQ_INFER:
                maxTokens, _credit, promptLength = INFER.unpack_from(payload)
                prompt = payload[INFER.size : INFER.size + promptLength].decode()
                self.infer(reqId, prompt, maxTokens)
        self.buffer = buffer[offset:]

    def infer(self, reqId: int, prompt: str, maxTokens: int) -> None:
        body = json.dumps({"prompt": prompt, "n_predict": maxTokens, "stream": True, "cache_prompt": True}).encode()
        events = Events(self, reqId)
        posted = self.agent.request(b"POST", self.url, HEADERS, FileBodyProducer(BytesIO(body)))
        posted.addCallbacks(lambda response: response.deliverBody(events), lambda _: events.finish())


class BridgeFactory(Factory):
    def __init__(self, url: str) -> None:
        self.url, self.agent = (url.rstrip("/") + "/completion").encode(), Agent(reactor)

    def buildProtocol(self, addr: object) -> Bridge:
        return Bridge(self.agent, self.url)


if __name__ == "__main__":
    serverFromString(reactor, sys.argv[1]).listen(BridgeFactory(sys.argv[2]))
    print(f"floor bridge listening on {sys.argv[1]}, to {sys.argv[2]}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
