"""
Upstream faults with a real llama-server (issue 8).

``twistd cc50 --backend=llama_server`` in front of a real llama-server, and
the faults a real upstream has:

- killed (SIGKILL) with several requests streaming: each gets exactly one
  RESP_ERR UPSTREAM_UNAVAILABLE; once llama-server is back, requests work;
- stopped (SIGSTOP) mid-stream: ``--llama-idle-timeout`` fires and the
  request gets exactly one RESP_ERR TIMEOUT; after SIGCONT, requests work;
- answers HTTP 500, and sends a malformed event stream (an event that is not
  JSON, an event whose text is not a string, a stream that ends without its
  final event): these come from ``FaultProxy``, a small fault-injecting HTTP
  proxy written with Twisted that sits between the bridge and the real
  llama-server; each request gets exactly one RESP_ERR BACKEND_ERROR, the
  bridge closes the upstream request (llama-server frees its slot), and once
  the proxy passes traffic through again, requests work.

Every CC50 frame is checked by ``cc50tw.testing.CheckingClient`` (exactly one
terminal frame per request, nothing after it); each test waits a moment
after the error to catch a late frame.  The connection to the CC50 server
stays open throughout: an upstream fault ends requests, not connections.

These tests skip, saying why, only when llama-server is not installed and
``CI`` is not ``true``; in CI a missing llama-server fails them.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cc50tw.codec import ErrorCode
from cc50tw.testing import CheckingClient, RequestRecord
from tests.conftest import HOSTILE_SUMMARY, StartCC50
from tests.helpers import LOOPBACK, ServerProcess
from tests.llama_fixtures import require_llama_server, running_llama
from tests.llama_support import LlamaServer, generated_model

reactor: Any = _reactor

#: Long enough to still be streaming when the fault strikes (the small model
#: makes about 1,500 tokens/s on 2 cores; the context is 8,192).
LONG = 6000
#: --llama-idle-timeout for the SIGSTOP test.
IDLE_TIMEOUT = 1.0
#: After a terminal frame, how long to watch for a frame that must not come.
LATE_FRAME_WATCH = 0.5


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


# The fault-injecting proxy --------------------------------------------------------


class _Relay(Protocol):
    """Copies the upstream response body to the downstream request, injecting the proxy's fault."""

    def __init__(self, proxy: FaultProxy, request: Request, mode: str) -> None:
        self.proxy = proxy
        self.request = request
        self.mode = mode
        self.buffer = b""
        self.events = 0
        self.done = False  # nothing more goes downstream
        self.gone = False  # the downstream client closed its connection

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        if self.mode == "pass":
            self.request.write(data)
            return
        self.buffer += data
        while b"\n\n" in self.buffer and not self.done:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            if self.events < self.proxy.fault_after:
                self.events += 1
                self.request.write(event + b"\n\n")
                continue
            self.done = True
            if self.mode == "not_json":
                self.request.write(b"data: {this is not json\n\n")
            elif self.mode == "text_not_string":
                self.request.write(b'data: {"content": 42, "stop": false}\n\n')
            # no_final_event: end the body cleanly, without llama-server's "stop": true event.
            # In every mode the proxy then stops relaying: the upstream request is closed
            # if the bridge does not close its side first.
            self.request.finish()
            self.stopUpstream()

    def stopUpstream(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.proxy.upstreamClosed += 1
        if not self.done:
            self.done = True
            if not self.gone:
                self.request.finish()


class FaultProxy(Resource):
    """
    An HTTP proxy in front of llama-server that can break what passes through.

    ``mode``: ``pass`` (relay everything), ``http500`` (answer every POST with
    HTTP 500 and an OpenAI-style error body), or a malformed event stream
    after ``fault_after`` good events: ``not_json``, ``text_not_string``,
    ``no_final_event``.  GETs (the bridge's ``/health``) always pass.
    """

    isLeaf = True

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.mode = "pass"
        self.fault_after = 3
        self.posts = 0
        self.upstreamClosed = 0
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    def render(self, request: Request) -> bytes | int:
        mode = self.mode if request.method == b"POST" else "pass"
        if request.method == b"POST":
            self.posts += 1
        if mode == "http500":
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"application/json")
            error = {"error": {"code": 500, "message": "injected fault: the model crashed", "type": "server_error"}}
            return json.dumps(error).encode()
        assert request.content is not None
        body = request.content.read()
        producer = FileBodyProducer(BytesIO(body)) if body else None
        headers = Headers({b"Content-Type": [b"application/json"]})
        uri = (self.upstream + request.uri.decode()).encode()
        pending = self.agent.request(request.method, uri, headers, producer)
        relay = _Relay(self, request, mode)

        def answered(response: IResponse) -> None:
            request.setResponseCode(response.code)
            for name in (b"content-type",):
                for value in response.headers.getRawHeaders(name, []):
                    request.setHeader(name, value)
            response.deliverBody(relay)

        def failed(failure: Failure) -> None:
            if not relay.gone:
                request.setResponseCode(502)
                request.write(failure.getErrorMessage().encode())
                request.finish()

        def downstreamGone(failure: Failure) -> None:
            relay.done = relay.gone = True
            relay.stopUpstream()
            pending.cancel()

        pending.addCallbacks(answered, failed)
        request.notifyFinish().addErrback(downstreamGone)
        return NOT_DONE_YET


# Fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A llama-server for the proxy tests (which never kill or stop it)."""
    yield from running_llama(tmp_path_factory, "llama")


@pytest.fixture
def own_llama(tmp_path: Path) -> Iterator[LlamaServer]:
    """A llama-server for one test, which may kill or stop it."""
    binary = require_llama_server()
    server = LlamaServer(binary, generated_model("small"), tmp_path / "llama-server.log", parallel=4)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def proxy(llama: LlamaServer) -> Iterator[tuple[FaultProxy, str]]:
    resource = FaultProxy(llama.url)
    site = Site(resource)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface=LOOPBACK)
    yield resource, f"http://{LOOPBACK}:{port.getHost().port}"
    port.stopListening()


def bridge(cc50_server: StartCC50, url: str, *args: str) -> ServerProcess:
    return cc50_server("--backend=llama_server", f"--llama-url={url}", *args)


async def client_for(server: ServerProcess) -> CheckingClient:
    assert server.port is not None
    endpoint = TCP4ClientEndpoint(reactor, server.host, server.port)
    client: CheckingClient = await connectProtocol(endpoint, CheckingClient())
    return client


async def streaming(client: CheckingClient, records: list[RequestRecord], limit: float = 30.0) -> None:
    """Wait until every request in ``records`` has received some text."""
    deadline = time.monotonic() + limit
    while not all(r.chunk_bytes for r in records):
        assert time.monotonic() < deadline, "the requests never started streaming: the test would prove nothing"
        assert not any(r.finished for r in records), [(r.outcome, r.error_message) for r in records]
        await sleep(0.01)


async def errors(
    client: CheckingClient, records: list[RequestRecord], code: ErrorCode, fragment: str
) -> list[RequestRecord]:
    """Each request ended with exactly one RESP_ERR ``code`` mentioning ``fragment``, and nothing came after."""
    ended: list[RequestRecord] = await gatherResults([client.finished(r) for r in records])
    await sleep(LATE_FRAME_WATCH)
    assert client.closedBy is None, f"the CC50 connection was closed: {client.closedBy}"
    assert client.checker.problems == [], client.checker.problems
    for record in ended:
        assert record.outcome == code.name, (record.outcome, record.error_message)
        assert fragment in record.error_message, record.error_message
    return ended


async def works(client: CheckingClient, tokens: int = 5) -> None:
    """The bridge serves again: a request gets all its tokens and a DONE."""
    record = client.infer("back to normal", tokens)
    await client.finished(record)
    assert record.outcome == "done", (record.outcome, record.error_message)
    assert record.done is not None and record.done.tokens == tokens and record.chunk_bytes > 0
    assert client.checker.problems == [], client.checker.problems


def summarize(category: str, cases: int, server: ServerProcess) -> None:
    HOSTILE_SUMMARY.append(
        {"suite": "upstream faults", "category": category, "cases": cases, "crashes": 0 if server.alive() else 1}
    )


# Tests --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_killed_mid_stream(own_llama: LlamaServer, cc50_server: StartCC50) -> None:
    server = bridge(cc50_server, own_llama.url)
    client = await client_for(server)
    try:
        records = [client.infer(f"Story number {i}", LONG) for i in range(3)]
        await streaming(client, records)
        own_llama.kill()
        ended = await errors(client, records, ErrorCode.UPSTREAM_UNAVAILABLE, "mid-stream")
        print(f"\nkilled mid-stream: {[r.error_message for r in ended][0]}")
        own_llama.start()  # the same port
        await works(client)
    finally:
        client.transport.loseConnection()
    summarize("killed mid-stream", len(records), server)
    assert server.alive()


@pytest_twisted.ensureDeferred
async def test_stopped_mid_stream_idle_timeout(own_llama: LlamaServer, cc50_server: StartCC50) -> None:
    server = bridge(cc50_server, own_llama.url, f"--llama-idle-timeout={IDLE_TIMEOUT}")
    assert own_llama.process is not None
    client = await client_for(server)
    try:
        records = [client.infer(f"Tale number {i}", LONG) for i in range(2)]
        await streaming(client, records)
        own_llama.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            ended = await errors(client, records, ErrorCode.TIMEOUT, f"sent nothing for {IDLE_TIMEOUT:g}s mid-stream")
            waited = max(r.ended_at or 0 for r in ended) - stopped
        finally:
            own_llama.process.send_signal(signal.SIGCONT)
        print(f"\nSIGSTOP: TIMEOUT {waited:.2f}s after the stop (--llama-idle-timeout={IDLE_TIMEOUT:g})")
        assert IDLE_TIMEOUT - 0.2 <= waited <= IDLE_TIMEOUT + 5
        await works(client)
    finally:
        client.transport.loseConnection()
    summarize("SIGSTOP mid-stream", len(records), server)


@pytest_twisted.ensureDeferred
async def test_http_500(proxy: tuple[FaultProxy, str], cc50_server: StartCC50) -> None:
    fault, url = proxy
    server = bridge(cc50_server, url)
    client = await client_for(server)
    try:
        fault.mode = "http500"
        records = [client.infer(f"Doomed request {i}", 50) for i in range(3)]
        await errors(client, records, ErrorCode.BACKEND_ERROR, "HTTP 500: injected fault: the model crashed")
        assert fault.posts >= 3  # one POST each (a retry on a stale pooled connection would add one)
        fault.mode = "pass"
        await works(client)
    finally:
        client.transport.loseConnection()
    summarize("HTTP 500", len(records), server)


@pytest.mark.parametrize(
    "mode, fragment",
    [
        ("not_json", "not JSON"),
        ("text_not_string", "content that is not a string"),
        ("no_final_event", "ended the stream without its final event"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_event_stream(
    proxy: tuple[FaultProxy, str], llama: LlamaServer, cc50_server: StartCC50, mode: str, fragment: str
) -> None:
    fault, url = proxy
    server = bridge(cc50_server, url)
    client = await client_for(server)
    try:
        fault.mode = mode
        records = [client.infer(f"Garbled request {i}", LONG) for i in range(2)]
        ended = await errors(client, records, ErrorCode.BACKEND_ERROR, fragment)
        assert all(r.chunk_bytes > 0 for r in ended), "the good events before the fault should have been relayed"
        # The upstream requests were closed, so llama-server stops generating and frees its slots.
        deadline = time.monotonic() + 5
        while llama.busy_slots():
            assert time.monotonic() < deadline, "llama-server is still generating the broken requests"
            await sleep(0.05)
        fault.mode = "pass"
        await works(client)
    finally:
        client.transport.loseConnection()
    summarize(f"malformed SSE: {mode}", len(records), server)
