"""
Unit tests for the llama-server backend, without sockets or a real server.

Most tests run the real treq/Agent HTTP client against ``FakeUpstream``: each
connection the agent opens is a ``StringTransport``, the request bytes it
wrote can be read back, and the test writes a recorded HTTP response (status
line, headers, chunked SSE body) into the client protocol byte by byte if it
likes.  That exercises the real HTTP parsing and the real body transport, so
pause, resume and abort are checked on the transport the backend actually
gets.  Error responses are also checked through treq's in-memory HTTP stack
(``treq.testing.RequestTraversalAgent``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import MethodType
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from cc50tw.backends import installed_backends
from cc50tw.backends.http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FIRST_EVENT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    UpstreamEndpoints,
    UpstreamHTTPClient,
    makeHTTPClient,
    normalizeURL,
)
from cc50tw.backends.http.attempt import Attempt
from cc50tw.backends.llama_server import LlamaServerBackend
from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink

URL = "http://llama.test:8080"


# Doubles ---------------------------------------------------------------------


@implementer(ITokenSink)
class RecordingSink:
    """An ``ITokenSink`` that records writes and can pause its producer on demand."""

    def __init__(self, pauseOnWrite: bool = False) -> None:
        self.writes: list[str] = []
        self.producer: IPushProducer | None = None
        self.registrations = 0
        self.unregistrations = 0
        self.pauseOnWrite = pauseOnWrite

    def write(self, text: str) -> None:
        text.encode("utf-8")  # a lone surrogate, i.e. a broken character, raises here
        assert text, "empty writes are pointless"
        self.writes.append(text)
        if self.pauseOnWrite and self.producer is not None:
            self.producer.pauseProducing()

    def writeSequence(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.write(text)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        assert streaming
        self.producer = producer
        self.registrations += 1

    def unregisterProducer(self) -> None:
        self.unregistrations += 1

    @property
    def text(self) -> str:
        return "".join(self.writes)


class TCPLikeTransport(StringTransport):
    """``StringTransport`` whose ``stopProducing`` closes the connection, as a TCP transport's does."""

    def stopProducing(self) -> None:
        super().stopProducing()
        self.loseConnection()


class FakeUpstream:
    """
    Connections for a real ``Agent``, each a ``TCPLikeTransport`` the test drives.

    ``refuse`` makes the next connection attempts fail with that exception.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.connections: list[tuple[Any, TCPLikeTransport]] = []
        self.refuse: Exception | None = None
        self.pending: list[Deferred[Any]] = []
        self.holdConnects = False

    def endpointForURI(self, uri: Any) -> FakeUpstream:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse is not None:
            return fail(self.refuse)
        if self.holdConnects:
            held: Deferred[Any] = Deferred()
            self.pending.append(held)
            return held
        protocol = factory.buildProtocol(None)
        transport = TCPLikeTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def client(self) -> UpstreamHTTPClient:
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        return makeHTTPClient(Agent.usingEndpointFactory(self.reactor, self, pool=pool))

    def request(self, index: int = -1) -> tuple[str, str, dict[str, Any]]:
        """Method, path and JSON body of the request written on a connection."""
        raw = self.connections[index][1].value()
        head, _, body = raw.partition(b"\r\n\r\n")
        method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        return method, path, json.loads(body)

    def send(self, data: bytes, index: int = -1) -> None:
        self.connections[index][0].dataReceived(data)

    def transport(self, index: int = -1) -> TCPLikeTransport:
        return self.connections[index][1]

    def lose(self, reason: Exception, index: int = -1) -> None:
        self.connections[index][0].connectionLost(Failure(reason))


def sseHead(contentType: bytes = b"text/event-stream") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + contentType + b"\r\n"
        b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def event(**fields: Any) -> bytes:
    return b"data: " + json.dumps(fields).encode() + b"\n\n"


def completionEvents(pieces: list[str], prompt: int = 4, predicted: int | None = None) -> list[bytes]:
    """What llama-server's /completion streams for ``pieces``, then its final event."""
    events = [
        event(index=0, content=piece, tokens=[7], stop=False, tokens_predicted=i + 1, tokens_evaluated=prompt)
        for i, piece in enumerate(pieces)
    ]
    events.append(
        event(
            index=0,
            content="",
            tokens=[],
            stop=True,
            stop_type="limit",
            tokens_predicted=len(pieces) if predicted is None else predicted,
            tokens_evaluated=prompt,
            truncated=False,
            timings={"prompt_n": prompt, "predicted_n": len(pieces)},
        )
    )
    return events


def completionResponse(pieces: list[str], prompt: int = 4, predicted: int | None = None) -> bytes:
    return sseHead() + b"".join(chunk(e) for e in completionEvents(pieces, prompt, predicted)) + LAST_CHUNK


def errorResponse(code: int, phrase: bytes, body: bytes, contentType: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        code,
        phrase,
        contentType,
        len(body),
        body,
    )


class Harness:
    """A backend on a ``FakeUpstream`` with a ``MemoryReactorClock``."""

    def __init__(self, endpoint: str = "/completion", **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = FakeUpstream(self.reactor)
        self.backend = LlamaServerBackend(self.reactor, URL, endpoint, http=self.upstream.client(), **options)
        self.results: list[object] = []

    def generate(
        self, prompt: str = "Hello there", max_tokens: int = 16, sink: RecordingSink | None = None
    ) -> tuple[Deferred[GenerationResult], RecordingSink]:
        sink = sink or RecordingSink()
        d = self.backend.generate(InferenceRequest(1, prompt, max_tokens), sink)
        d.addBoth(self.results.append)
        return d, sink

    def result(self) -> GenerationResult:
        assert len(self.results) == 1, f"expected one result, got {self.results}"
        result = self.results[0]
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, GenerationResult)
        return result

    def error(self) -> BackendError:
        assert len(self.results) == 1, f"expected one result, got {self.results}"
        result = self.results[0]
        assert isinstance(result, Failure), f"expected a failure, got {result}"
        error = result.value
        assert isinstance(error, BackendError), f"expected BackendError, got {result}"
        return error


# Streaming -----------------------------------------------------------------


class CompletionStreamingTests(SynchronousTestCase):
    def test_requestBody(self) -> None:
        h = Harness()
        h.generate("Tell me", 32)
        method, path, body = h.upstream.request()
        self.assertEqual((method, path), ("POST", "/completion"))
        self.assertEqual(body, {"prompt": "Tell me", "n_predict": 32, "stream": True, "cache_prompt": True})

    def test_requestHeadersAreOnlyOurs(self) -> None:
        """The streaming POST skips treq's wrappers: no gzip negotiation, which would buffer events."""
        h = Harness()
        h.generate("Tell me", 32)
        head = h.upstream.transport().value().partition(b"\r\n\r\n")[0].decode().lower().split("\r\n")
        self.assertEqual(head[0], "post /completion http/1.1")
        names = sorted(line.split(":", 1)[0] for line in head[1:])
        self.assertEqual(names, ["accept", "content-length", "content-type", "host"])
        self.assertIn("accept: text/event-stream", head)
        self.assertIn("host: llama.test:8080", head)

    def test_redirectIsAnErrorNotFollowed(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere.test/\r\nContent-Length: 0\r\n\r\n")
        error = h.error()
        self.assertEqual(error.code, ErrorCode.BACKEND_ERROR)
        self.assertIn("HTTP 307", error.message)
        self.assertEqual(len(h.upstream.connections), 1)

    def test_nonASCIIURLIsSentInItsASCIIForm(self) -> None:
        self.assertEqual(normalizeURL("http://bücher.test:8080/llama/"), "http://xn--bcher-kva.test:8080/llama")

    def test_aURLTheAgentWouldRefuseIsRefusedAtStart(self) -> None:
        for url in ("http://llama.test:8080/a b", "http://llama.test:8080/\x7f"):
            error = self.assertRaises(ValueError, LlamaServerBackend, MemoryReactorClock(), url)
            self.assertIn("--llama-url must not contain spaces or control characters", str(error))

    def test_anAgentThatRaisesFailsTheRequestCleanly(self) -> None:
        """A request the agent refuses outright ends with BACKEND_ERROR, and leaves nothing behind."""

        @implementer(IAgent)
        class Refusing:
            def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
                raise ValueError("Invalid URI")

        reactor = MemoryReactorClock()
        backend = LlamaServerBackend(reactor, URL, http=makeHTTPClient(Refusing()))
        sink = RecordingSink()
        results: list[object] = []
        backend.generate(InferenceRequest(1, "hi", 4), sink).addBoth(results.append)
        self.assertEqual(len(results), 1)
        assert isinstance(results[0], Failure)
        error = results[0].value
        assert isinstance(error, BackendError)
        self.assertEqual(error.code, ErrorCode.BACKEND_ERROR)
        self.assertIn("Invalid URI", error.message)
        self.assertEqual((backend.active, reactor.getDelayedCalls()), (set(), []))
        self.assertEqual(backend.pool.members[0].outstanding, 0)

    def test_streamsEveryPieceAsItArrives(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead())
        for i, e in enumerate(completionEvents([" the", " café", " 日本"])[:3]):
            h.upstream.send(chunk(e))
            self.assertEqual(len(sink.writes), i + 1)
        self.assertEqual(sink.writes, [" the", " café", " 日本"])
        self.assertEqual(h.results, [])
        h.upstream.send(chunk(completionEvents([" the", " café", " 日本"])[-1]))
        self.assertEqual(h.result()[:2], (4, 3))
        self.assertEqual((sink.registrations, sink.unregistrations), (1, 1))

    def test_countsComeFromTheUpstreamNotFromEvents(self) -> None:
        """Two events that carried five tokens (e.g. held-back UTF-8) count as five."""
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(completionResponse(["ab", "cd"], prompt=9, predicted=5))
        self.assertEqual(h.result()[:2], (9, 5))
        self.assertEqual(sink.text, "abcd")

    def test_everyByteInItsOwnRead(self) -> None:
        h = Harness()
        _, sink = h.generate()
        for byte in completionResponse(["x", " é", "🙂", " end"]):
            h.upstream.send(bytes([byte]))
        self.assertEqual(sink.text, "x é🙂 end")
        self.assertEqual(h.result()[:2], (4, 4))

    def test_severalEventsInOneRead(self) -> None:
        h = Harness()
        _, sink = h.generate(max_tokens=20)
        h.upstream.send(completionResponse([str(i) for i in range(20)]))
        self.assertEqual(sink.writes, [str(i) for i in range(20)])
        self.assertEqual(h.result()[:2], (4, 20))

    def test_doneAtTheLastAllowedToken(self) -> None:
        """The answer is complete at max_tokens: the result does not wait for the final event."""
        h = Harness()
        _, sink = h.generate(max_tokens=3)
        events = completionEvents(["a", "b", "c"], prompt=5)
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events[:3]))
        self.assertEqual(h.result()[:2], (5, 3))
        self.assertEqual(sink.writes, ["a", "b", "c"])
        self.assertEqual((sink.registrations, sink.unregistrations), (1, 1))
        self.assertEqual(len(h.backend.draining), 1)
        h.upstream.send(chunk(events[3]) + LAST_CHUNK)  # the final event, read and ignored
        self.assertEqual(sink.writes, ["a", "b", "c"])
        self.assertEqual(len(h.results), 1)
        self.assertFalse(h.upstream.transport().disconnecting)  # drained, back to the pool
        self.assertEqual(h.backend.draining, set())
        h.reactor.advance(h.backend.idle_timeout)
        self.assertFalse(h.upstream.transport().disconnecting)  # no drain timer left to fire

    def test_anUpstreamThatStallsAfterTheAnswerIsCutOff(self) -> None:
        """The rest of the body is read for the idle timeout at most, then the connection is closed."""
        h = Harness()
        h.generate(max_tokens=2)
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in completionEvents(["a", "b"])[:2]))
        self.assertEqual(h.result()[:2], (4, 2))
        h.reactor.advance(h.backend.idle_timeout - 1)
        self.assertFalse(h.upstream.transport().disconnecting)
        h.reactor.advance(1)
        self.assertTrue(h.upstream.transport().disconnecting)
        self.assertEqual((h.backend.draining, h.reactor.getDelayedCalls()), (set(), []))

    def test_stoppingTheBackendClosesADrainingConnection(self) -> None:
        h = Harness()
        h.generate(max_tokens=1)
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]))
        self.assertEqual(h.result()[:2], (4, 1))
        h.backend.stopBackend()
        self.assertTrue(h.upstream.transport().disconnecting)
        self.assertEqual((h.backend.draining, h.reactor.getDelayedCalls()), (set(), []))

    def test_aSpeculativeBatchIsNotCutShort(self) -> None:
        """
        Builds that count a whole accepted draft batch in ``tokens_predicted``
        before sending its events: every event of the batch already says 4 of
        4.  All of them are still streamed; the limit counts tokens carried.
        """
        h = Harness()
        _, sink = h.generate(max_tokens=4)
        h.upstream.send(sseHead())
        for content, predicted in (("a", 1), ("b", 4), ("c", 4), ("d", 4)):
            h.upstream.send(chunk(event(content=content, tokens=[9], stop=False, tokens_predicted=predicted)))
        self.assertEqual(sink.writes, ["a", "b", "c", "d"])
        self.assertEqual(h.result().generated_tokens, 4)

    def test_eventsWithoutTokenListsWaitForTheFinalEvent(self) -> None:
        h = Harness()
        _, sink = h.generate(max_tokens=2)
        h.upstream.send(sseHead())
        for content, predicted in (("a", 1), ("b", 2)):
            h.upstream.send(chunk(event(content=content, stop=False, tokens_predicted=predicted)))
        self.assertEqual(h.results, [])
        h.upstream.send(chunk(event(content="", stop=True, stop_type="limit", tokens_predicted=2)))
        self.assertEqual(sink.writes, ["a", "b"])
        self.assertEqual(h.result().generated_tokens, 2)

    def test_anEarlierEndStillWaitsForTheFinalEvent(self) -> None:
        """Fewer tokens than allowed (end of sequence, a stop word): the final event says it is over."""
        h = Harness()
        _, sink = h.generate(max_tokens=16)
        events = completionEvents(["a", "b", "c"], prompt=5)
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events[:3]))
        self.assertEqual(h.results, [])
        h.upstream.send(chunk(events[3]))
        self.assertEqual(h.result()[:2], (5, 3))

    def test_surrogatePairSplitAcrossEvents(self) -> None:
        """A character escaped as a surrogate pair split over two events is written whole."""
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead())
        h.upstream.send(chunk(b'data: {"content":"a\\ud83d","stop":false}\n\n'))
        self.assertEqual(sink.writes, ["a"])
        h.upstream.send(chunk(b'data: {"content":"\\ude42b","stop":false}\n\n'))
        h.upstream.send(chunk(completionEvents([])[-1]) + LAST_CHUNK)
        self.assertEqual(sink.writes, ["a", "🙂b"])

    def test_pingCommentsAndCRLF(self) -> None:
        h = Harness()
        _, sink = h.generate()
        body = b':\r\n\r\ndata: {"content":"x","stop":false}\r\n\r\n:\n\ndata: {"content":"","stop":true,"tokens_predicted":1,"tokens_evaluated":2}\r\n\r\n'
        h.upstream.send(sseHead() + chunk(body) + LAST_CHUNK)
        self.assertEqual(sink.text, "x")
        self.assertEqual(h.result()[:2], (2, 1))

    def test_emptyContentIsNotWritten(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(completionResponse(["", "a", ""]))
        self.assertEqual(sink.writes, ["a"])

    def test_connectionIsReusedAfterACleanFinish(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(completionResponse(["a"]))
        self.assertFalse(h.upstream.transport().disconnecting)
        h.upstream.transport().clear()
        _, sink = h.generate()
        self.assertEqual(len(h.upstream.connections), 1)
        h.upstream.send(completionResponse(["b"]))
        self.assertEqual(sink.text, "b")


class OpenAIStreamingTests(SynchronousTestCase):
    def test_completionsRequestAndStream(self) -> None:
        h = Harness("/v1/completions")
        _, sink = h.generate("Once", 8)
        method, path, body = h.upstream.request()
        self.assertEqual((method, path), ("POST", "/v1/completions"))
        self.assertEqual(body["prompt"], "Once")
        self.assertEqual(body["max_tokens"], 8)
        self.assertTrue(body["stream"])
        self.assertEqual(body["stream_options"], {"include_usage": True})
        events = [
            event(choices=[{"text": " upon", "index": 0, "finish_reason": None}]),
            event(choices=[{"text": " a", "index": 0, "finish_reason": None}]),
            event(
                choices=[{"text": "", "index": 0, "finish_reason": "length"}],
                usage={"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9},
            ),
            b"data: [DONE]\n\n",
        ]
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        self.assertEqual(sink.text, " upon a")
        self.assertEqual(h.result()[:2], (2, 7))

    def test_usageInAChunkWithoutChoices(self) -> None:
        """OpenAI and vLLM send usage in a last chunk whose choices are empty."""
        h = Harness("/v1/completions")
        _, sink = h.generate()
        events = [
            event(choices=[{"text": "z", "index": 0, "finish_reason": "stop"}]),
            event(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 1}),
            b"data: [DONE]\n\n",
        ]
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        self.assertEqual(h.result()[:2], (3, 1))

    def test_chatCompletions(self) -> None:
        h = Harness("/v1/chat/completions")
        _, sink = h.generate("Hi", 4)
        _, path, body = h.upstream.request()
        self.assertEqual(path, "/v1/chat/completions")
        self.assertEqual(body["messages"], [{"role": "user", "content": "Hi"}])
        events = [
            event(choices=[{"delta": {"role": "assistant", "content": None}, "index": 0, "finish_reason": None}]),
            event(choices=[{"delta": {"content": "Hel"}, "index": 0, "finish_reason": None}]),
            event(choices=[{"delta": {"content": "lo"}, "index": 0, "finish_reason": None}]),
            event(choices=[{"delta": {}, "index": 0, "finish_reason": "stop"}]),
            event(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 2}),
            b"data: [DONE]\n\n",
        ]
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        self.assertEqual(sink.text, "Hello")
        self.assertEqual(h.result()[:2], (5, 2))

    def test_endWithoutDoneAfterFinishReasonIsAccepted(self) -> None:
        h = Harness("/v1/completions")
        _, sink = h.generate()
        events = [event(choices=[{"text": "q", "index": 0, "finish_reason": "length"}])]
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        self.assertEqual(sink.text, "q")
        self.assertEqual(h.result().generated_tokens, 1)

    def test_endWithoutDoneOrFinishReasonFails(self) -> None:
        h = Harness("/v1/completions")
        h.generate()
        events = [event(choices=[{"text": "q", "index": 0, "finish_reason": None}])]
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("without its final event", h.error().message)


# Errors --------------------------------------------------------------------


class RequestErrorTests(SynchronousTestCase):
    def test_connectionRefused(self) -> None:
        h = Harness()
        h.upstream.refuse = netError.ConnectionRefusedError("Connection refused")
        _, sink = h.generate()
        error = h.error()
        self.assertEqual(error.code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("not reachable", error.message)
        self.assertIn(URL, error.message)
        self.assertEqual(sink.writes, [])
        self.assertEqual(sink.unregistrations, 1)

    def test_dnsFailure(self) -> None:
        h = Harness()
        h.upstream.refuse = netError.DNSLookupError("no such host")
        h.generate()
        self.assertEqual(h.error().code, ErrorCode.UPSTREAM_UNAVAILABLE)

    def test_connectTimeout(self) -> None:
        h = Harness(connect_timeout=2.5)
        h.upstream.refuse = netError.TimeoutError("User timeout caused connection failure.")
        h.generate()
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)
        self.assertIn("2.5s", h.error().message)
        self.assertIn("--llama-connect-timeout", h.error().message)

    def test_contextOverflowIsTooLargeWithTheUpstreamMessage(self) -> None:
        """The client's request does not fit: TOO_LARGE, the upstream's words, and no mark against it."""
        h = Harness()
        h.generate()
        body = json.dumps(
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 5000,
                    "n_ctx": 2048,
                }
            }
        ).encode()
        h.upstream.send(errorResponse(400, b"Bad Request", body))
        error = h.error()
        self.assertEqual(error.code, ErrorCode.TOO_LARGE)
        self.assertIn("HTTP 400", error.message)
        self.assertTrue(h.backend.pool.isUp(h.backend.pool.members[0]))
        self.assertIn("exceeds the available context size", error.message)

    def test_loadingIs503Unavailable(self) -> None:
        h = Harness()
        h.generate()
        body = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
        h.upstream.send(errorResponse(503, b"Service Unavailable", body))
        error = h.error()
        self.assertEqual(error.code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("Loading model", error.message)

    def test_plainTextServerError(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(errorResponse(500, b"Internal Server Error", b"boom\n", b"text/plain"))
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("HTTP 500: boom", h.error().message)

    def test_hugeErrorBodyIsNotReadWhole(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(
            b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 70000
        )
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertTrue(h.upstream.transport().disconnecting)

    def test_notAnEventStream(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(errorResponse(200, b"OK", b'{"content":"all at once"}'))
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("instead of an event stream", h.error().message)

    def test_retriesOnceWhenTheConnectionDiesBeforeAnAnswer(self) -> None:
        """A keep-alive connection closed under us is retried on a fresh one, once."""
        h = Harness()
        _, sink = h.generate()
        h.upstream.lose(netError.ConnectionDone())
        self.assertEqual(h.results, [])
        self.assertEqual(len(h.upstream.connections), 2)
        h.upstream.send(completionResponse(["ok"]))
        self.assertEqual(sink.text, "ok")
        self.assertEqual(h.result()[:2], (4, 1))

    def test_retryUsesABrandNewConnection(self) -> None:
        """Not the pool, which may hold more connections the upstream has closed."""
        h = Harness()
        fresh = FakeUpstream(h.reactor)
        h.backend.freshHTTP = fresh.client()
        _, sink = h.generate()
        h.upstream.lose(netError.ConnectionDone())
        self.assertEqual((len(h.upstream.connections), len(fresh.connections)), (1, 1))
        fresh.send(completionResponse(["ok"]))
        self.assertEqual(sink.text, "ok")
        self.assertEqual(h.result()[:2], (4, 1))

    def test_connectionLostDuringTheHeaders(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/ev")
        h.upstream.lose(netError.ConnectionLost())
        self.assertEqual(h.error().code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("while sending its response headers", h.error().message)
        self.assertEqual(len(h.upstream.connections), 1)  # a half-sent answer is not retried

    def test_secondConnectionDeathFails(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.lose(netError.ConnectionDone())
        h.upstream.lose(netError.ConnectionDone())
        self.assertEqual(len(h.upstream.connections), 2)
        self.assertEqual(h.error().code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("before answering", h.error().message)


class StreamErrorTests(SynchronousTestCase):
    def test_malformedJSON(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["ok"])[0]) + chunk(b"data: {not json\n\n"))
        self.assertEqual(sink.writes, ["ok"])
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("not JSON", h.error().message)
        self.assertTrue(h.upstream.transport().disconnecting)

    def test_eventThatIsNotAnObject(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(sseHead() + chunk(b"data: [1, 2]\n\n"))
        self.assertIn("not a JSON object", h.error().message)

    def test_contentThatIsNotAString(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(sseHead() + chunk(b'data: {"content": 5}\n\n'))
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)

    def test_errorEventMidStream(self) -> None:
        h = Harness()
        _, sink = h.generate()
        error = event(error={"code": 500, "message": "slot crashed", "type": "server_error"})
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]) + chunk(error))
        self.assertEqual(sink.writes, ["a"])
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("slot crashed", h.error().message)

    def test_oversizedEvent(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(sseHead())
        with self.assertRaises(AssertionError):
            h.error()
        for _ in range(200):
            if h.results:
                break
            h.upstream.send(chunk(b"x" * 65536))
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("malformed event stream", h.error().message)

    def test_bodyEndsWithoutFinalEvent(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]) + LAST_CHUNK)
        self.assertEqual(sink.writes, ["a"])
        self.assertEqual(h.error().code, ErrorCode.BACKEND_ERROR)
        self.assertIn("without its final event", h.error().message)

    def test_connectionLostMidStream(self) -> None:
        """llama-server killed mid-stream: the request fails, saying where and what."""
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]))
        h.upstream.lose(netError.ConnectionLost())
        self.assertEqual(sink.writes, ["a"])
        error = h.error()
        self.assertEqual(error.code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("closed the connection mid-stream", error.message)
        self.assertEqual(sink.unregistrations, 1)

    def test_firstEventTimeout(self) -> None:
        h = Harness(first_event_timeout=30)
        h.generate()
        h.upstream.send(sseHead() + chunk(b":\n\n"))  # a ping is not an event
        h.reactor.advance(29.9)
        self.assertEqual(h.results, [])
        h.reactor.advance(0.2)
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)
        self.assertIn("--llama-first-event-timeout", h.error().message)
        self.assertTrue(h.upstream.transport().disconnecting)

    def test_firstEventTimeoutBeforeHeaders(self) -> None:
        """No response at all: the request is cancelled, which aborts its connection."""
        h = Harness(first_event_timeout=30)
        h.generate()
        h.reactor.advance(31)
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)
        self.assertTrue(h.upstream.transport().disconnected)

    def test_idleTimeout(self) -> None:
        h = Harness(idle_timeout=10)
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]))
        h.reactor.advance(9)
        h.upstream.send(chunk(completionEvents(["a", "b"])[1]))
        h.reactor.advance(9)
        # Keep-alive comments alone are not progress: they do not hold the clock.
        h.upstream.send(chunk(b":\n\n"))
        self.assertEqual(h.results, [])
        h.reactor.advance(1.1)
        self.assertEqual(sink.writes, ["a", "b"])
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)
        self.assertIn("--llama-idle-timeout", h.error().message)

    def test_noTimersLeftAfterFinishing(self) -> None:
        h = Harness()

        def ours() -> list[object]:
            functions = [getattr(call, "func", None) for call in h.reactor.getDelayedCalls()]
            return [f for f in functions if isinstance(f, MethodType) and isinstance(f.__self__, Attempt)]

        h.generate()
        self.assertEqual(len(ours()), 1)
        h.upstream.send(completionResponse(["a"]))
        h.result()
        self.assertEqual(ours(), [])

    def test_defaults(self) -> None:
        h = Harness()
        self.assertEqual(h.backend.connect_timeout, DEFAULT_CONNECT_TIMEOUT)
        self.assertEqual(h.backend.first_event_timeout, DEFAULT_FIRST_EVENT_TIMEOUT)
        self.assertEqual(h.backend.idle_timeout, DEFAULT_IDLE_TIMEOUT)
        self.assertIn(URL, h.backend.describe())


class InMemoryHTTPErrorTests(SynchronousTestCase):
    """The same mapping through treq's own in-memory HTTP stack (a real ``twisted.web`` server)."""

    class Upstream(Resource):
        isLeaf = True

        def __init__(self, code: int, body: bytes, contentType: bytes = b"application/json") -> None:
            super().__init__()
            self.code, self.body, self.contentType = code, body, contentType
            self.requests: list[tuple[bytes, dict[str, Any]]] = []

        def render(self, request: Request) -> bytes:
            content = request.content.read() if request.content else b""
            self.requests.append((request.path, json.loads(content) if content else {}))
            request.setResponseCode(self.code)
            request.setHeader(b"content-type", self.contentType)
            return self.body

    def generate(self, resource: Resource, endpoint: str = "/completion") -> tuple[list[object], RecordingSink]:
        agent = RequestTraversalAgent(resource)
        backend = LlamaServerBackend(MemoryReactorClock(), URL, endpoint, http=makeHTTPClient(agent))
        sink = RecordingSink()
        results: list[object] = []
        backend.generate(InferenceRequest(3, "p", 4), sink).addBoth(results.append)
        agent.flush()
        return results, sink

    def failure(self, results: list[object]) -> BackendError:
        self.assertEqual(len(results), 1)
        result = results[0]
        assert isinstance(result, Failure)
        assert isinstance(result.value, BackendError)
        return result.value

    def test_400(self) -> None:
        resource = self.Upstream(
            400, b'{"error":{"code":400,"message":"prompt too long","type":"invalid_request_error"}}'
        )
        results, _ = self.generate(resource)
        error = self.failure(results)
        self.assertEqual((error.code, "prompt too long" in error.message), (ErrorCode.BAD_REQUEST, True))
        self.assertEqual(resource.requests[0][0], b"/completion")

    def test_503(self) -> None:
        resource = self.Upstream(503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
        error = self.failure(self.generate(resource)[0])
        self.assertEqual(error.code, ErrorCode.UPSTREAM_UNAVAILABLE)

    def test_404NamesTheEndpointOption(self) -> None:
        resource = self.Upstream(404, b'{"error":{"code":404,"message":"File Not Found"}}')
        error = self.failure(self.generate(resource, "/v1/completions")[0])
        self.assertEqual(error.code, ErrorCode.BACKEND_ERROR)
        self.assertIn("--llama-endpoint", error.message)

    def test_openAIStyleStringError(self) -> None:
        resource = self.Upstream(422, b'{"error": "bad max_tokens"}')
        error = self.failure(self.generate(resource, "/v1/completions")[0])
        self.assertIn("bad max_tokens", error.message)

    def test_streamThroughTheInMemoryStack(self) -> None:
        resource = self.Upstream(200, b"".join(completionEvents(["x", "y"])), b"text/event-stream")
        results, sink = self.generate(resource)
        self.assertEqual(sink.text, "xy")
        self.assertEqual(results, [GenerationResult(4, 2, "length")])


# Cancellation --------------------------------------------------------------


class CancellationTests(SynchronousTestCase):
    def test_cancelWhileConnecting(self) -> None:
        h = Harness()
        h.upstream.holdConnects = True
        d, sink = h.generate()
        d.cancel()
        self.assertIsInstance(h.results[0], Failure)
        assert isinstance(h.results[0], Failure)
        h.results[0].trap(CancelledError)
        self.assertTrue(h.upstream.pending[0].called)  # the connection attempt was cancelled too
        self.assertEqual(sink.unregistrations, 1)

    def test_cancelBeforeTheResponseAbortsTheConnection(self) -> None:
        h = Harness()
        d, _ = h.generate()
        d.cancel()
        self.assertTrue(h.upstream.transport().disconnected)  # abortConnection
        assert isinstance(h.results[0], Failure)
        h.results[0].trap(CancelledError)

    def test_cancelMidStreamClosesTheConnectionAtOnce(self) -> None:
        h = Harness()
        d, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a", "b"])[0]))
        self.assertFalse(h.upstream.transport().disconnecting)
        d.cancel()
        self.assertTrue(h.upstream.transport().disconnecting)
        assert isinstance(h.results[0], Failure)
        h.results[0].trap(CancelledError)
        # Whatever was already on its way is dropped.
        h.upstream.send(chunk(completionEvents(["a", "b"])[1]))
        self.assertEqual(sink.writes, ["a"])
        self.assertEqual(len(h.results), 1)
        self.assertEqual(h.backend.active, set())

    def test_cancelWhileReadingAnErrorBody(self) -> None:
        h = Harness()
        d, _ = h.generate()
        h.upstream.send(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\npartial")
        d.cancel()
        self.assertTrue(h.upstream.transport().disconnecting)
        assert isinstance(h.results[0], Failure)
        h.results[0].trap(CancelledError)

    def test_stopProducing(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]))
        assert sink.producer is not None
        sink.producer.stopProducing()
        self.assertTrue(h.upstream.transport().disconnecting)
        self.assertEqual(h.error().code, ErrorCode.CANCELLED)

    def test_stopBackendStopsEveryStream(self) -> None:
        h = Harness()
        h.generate()
        h.generate()
        self.assertEqual(len(h.backend.active), 2)
        h.backend.stopBackend()
        self.assertEqual(len(h.results), 2)
        self.assertTrue(all(t.disconnected for _, t in h.upstream.connections))


# Backpressure --------------------------------------------------------------


class PauseResumeTests(SynchronousTestCase):
    def test_pauseStopsReadingTheBody(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a", "b", "c"])[0]))
        assert sink.producer is not None
        sink.producer.pauseProducing()
        self.assertEqual(h.upstream.transport().producerState, "paused")
        sink.producer.resumeProducing()
        self.assertEqual(h.upstream.transport().producerState, "producing")

    def test_pauseBeforeTheResponseStaysPaused(self) -> None:
        """The Agent resumes the transport when the body is delivered; we pause it again."""
        h = Harness()
        _, sink = h.generate()
        assert sink.producer is not None
        sink.producer.pauseProducing()
        h.upstream.send(sseHead())
        self.assertEqual(h.upstream.transport().producerState, "paused")
        sink.producer.resumeProducing()
        self.assertEqual(h.upstream.transport().producerState, "producing")

    def test_eventsReceivedWhilePausedWaitForResume(self) -> None:
        """A sink that pauses after each write gets one piece per resume, in order."""
        h = Harness()
        sink = RecordingSink(pauseOnWrite=True)
        h.generate(sink=sink)
        events = completionEvents(["a", "b", "c"])
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events))  # all in one read
        self.assertEqual(sink.writes, ["a"])
        self.assertEqual(h.upstream.transport().producerState, "paused")
        assert sink.producer is not None
        sink.producer.resumeProducing()
        self.assertEqual(sink.writes, ["a", "b"])
        sink.producer.resumeProducing()
        self.assertEqual(sink.writes, ["a", "b", "c"])
        self.assertEqual(h.results, [])  # the final event is still queued
        sink.producer.resumeProducing()
        self.assertEqual(h.result()[:2], (4, 3))
        h.upstream.send(LAST_CHUNK)
        self.assertEqual(len(h.results), 1)

    def test_bodyEndingWhilePausedDeliversEverythingFirst(self) -> None:
        h = Harness()
        sink = RecordingSink(pauseOnWrite=True)
        h.generate(sink=sink)
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in completionEvents(["a", "b"])[:2]) + LAST_CHUNK)
        self.assertEqual(sink.writes, ["a"])
        self.assertEqual(h.results, [])
        assert sink.producer is not None
        sink.producer.resumeProducing()
        self.assertEqual(sink.writes, ["a", "b"])
        self.assertEqual(h.error().message.count("without its final event"), 1)

    def test_timersDoNotRunWhilePaused(self) -> None:
        """A client that reads slowly is not the upstream's fault."""
        h = Harness(idle_timeout=10)
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]))
        assert sink.producer is not None
        sink.producer.pauseProducing()
        h.reactor.advance(1000)
        self.assertEqual(h.results, [])
        sink.producer.resumeProducing()
        h.reactor.advance(9)
        self.assertEqual(h.results, [])
        h.reactor.advance(2)
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)

    def test_finishingWhilePausedLetsTheBodyDrain(self) -> None:
        """After the final event the transport is resumed, so the connection can be reused."""
        h = Harness()
        sink = RecordingSink(pauseOnWrite=True)
        h.generate(sink=sink)
        events = completionEvents(["a"])
        h.upstream.send(sseHead() + chunk(events[0]) + chunk(events[1]))
        assert sink.producer is not None
        self.assertEqual(h.upstream.transport().producerState, "paused")
        sink.producer.resumeProducing()
        self.assertEqual(h.result()[:2], (4, 1))
        self.assertEqual(h.upstream.transport().producerState, "producing")

    def test_finalEventWithTextThatPausesStillReleasesTheConnection(self) -> None:
        """The last write may pause us; the finished stream must not leave its connection paused."""
        h = Harness()
        sink = RecordingSink(pauseOnWrite=True)
        h.generate(sink=sink)
        final = event(content="end", stop=True, tokens_predicted=1, tokens_evaluated=2)
        h.upstream.send(sseHead() + chunk(final))
        self.assertEqual(sink.writes, ["end"])
        self.assertEqual(h.result()[:2], (2, 1))
        self.assertEqual(h.upstream.transport().producerState, "producing")
        h.upstream.send(LAST_CHUNK)
        h.generate()
        self.assertEqual(len(h.upstream.connections), 1)  # back in the pool and reused

    def test_pauseAndResumeAfterTheEndAreHarmless(self) -> None:
        h = Harness()
        _, sink = h.generate()
        h.upstream.send(completionResponse(["a"]))
        assert sink.producer is not None
        sink.producer.pauseProducing()
        sink.producer.resumeProducing()
        sink.producer.stopProducing()
        self.assertEqual(h.result()[:2], (4, 1))


# Start-up check and options ------------------------------------------------


class HealthCheckTests(SynchronousTestCase):
    class Health(Resource):
        isLeaf = True

        def __init__(self, code: int, body: bytes) -> None:
            super().__init__()
            self.code, self.body = code, body

        def render_GET(self, request: Request) -> bytes:
            assert request.path == b"/health", request.path
            request.setResponseCode(self.code)
            return self.body

    @implementer(IAgent)
    class Refusing:
        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return fail(netError.ConnectionRefusedError())

    def check(self, agent: Any) -> tuple[bool, str]:
        backend = LlamaServerBackend(MemoryReactorClock(), URL, http=makeHTTPClient(agent))
        probes: list[tuple[bool, str]] = []
        healthy: list[bool] = []
        backend.probeHealth().addCallback(probes.append)
        backend.checkHealth().addCallback(healthy.append)
        if isinstance(agent, RequestTraversalAgent):
            agent.flush()
        self.assertEqual(len(probes), 1)
        self.assertEqual(healthy, [probes[0][0]])
        return probes[0]

    def test_healthy(self) -> None:
        ok, message = self.check(RequestTraversalAgent(self.Health(200, b'{"status":"ok"}')))
        self.assertTrue(ok)
        self.assertIn("is healthy", message)

    def test_loading(self) -> None:
        ok, message = self.check(
            RequestTraversalAgent(self.Health(503, b'{"error":{"code":503,"message":"Loading model"}}'))
        )
        self.assertFalse(ok)
        self.assertIn("not ready", message)
        self.assertIn("Loading model", message)

    def test_unreachable(self) -> None:
        ok, message = self.check(self.Refusing())
        self.assertFalse(ok)
        self.assertIn("not reachable", message)
        self.assertIn(URL, message)

    def test_startBackendNeverFails(self) -> None:
        backend = LlamaServerBackend(MemoryReactorClock(), URL, http=makeHTTPClient(self.Refusing()))
        results: list[object] = []
        backend.startBackend().addBoth(results.append)
        self.assertEqual(results, [None])


class DirectHealthCheckTests(SynchronousTestCase):
    """Health checks through the agent, as the backend makes them (not through treq's URL handling)."""

    def probe(self, url: str) -> tuple[FakeUpstream, MemoryReactorClock, list[tuple[bool, str]]]:
        reactor = MemoryReactorClock()
        upstream = FakeUpstream(reactor)
        backend = LlamaServerBackend(reactor, url, http=upstream.client())
        probes: list[tuple[bool, str]] = []
        backend.probeHealth().addCallback(probes.append)
        return upstream, reactor, probes

    def test_ipv6LiteralUpstream(self) -> None:
        """treq cannot even make this request (hyperlink's IDNA refuses '::1'); the agent can."""
        upstream, _, probes = self.probe("http://[::1]:8080")
        head = upstream.transport().value().decode()
        self.assertTrue(head.startswith("GET /health HTTP/1.1\r\n"), head)
        self.assertIn("Host: [::1]:8080", head)
        upstream.send(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"status":"ok"}')
        self.assertEqual(len(probes), 1)
        self.assertTrue(probes[0][0], probes[0][1])

    def test_noAnswerInTime(self) -> None:
        upstream, reactor, probes = self.probe(URL)
        reactor.advance(DEFAULT_CONNECT_TIMEOUT + 5)
        self.assertEqual(len(probes), 1)
        self.assertFalse(probes[0][0])
        self.assertIn("no answer in time", probes[0][1])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_anAnswerStopsTheClock(self) -> None:
        upstream, reactor, probes = self.probe(URL)
        upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(probes[0][0])
        # Left: only the pool's timer for the kept-alive connection (240 s by default).
        self.assertEqual([call.getTime() for call in reactor.getDelayedCalls()], [240.0])


class ProbeLifetimeTests(SynchronousTestCase):
    """A health check always ends: a stalled body, a stopping backend."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = FakeUpstream(self.reactor)
        self.backend = LlamaServerBackend(self.reactor, URL, http=self.upstream.client())
        self.probes: list[tuple[bool, str]] = []
        self.backend.probeHealth().addCallback(self.probes.append)

    def test_aBodyThatStallsIsCutOffByTheSameClock(self) -> None:
        self.upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"status\"")
        self.assertEqual(self.probes, [])
        self.reactor.advance(DEFAULT_CONNECT_TIMEOUT + 5)
        self.assertEqual(len(self.probes), 1)
        self.assertFalse(self.probes[0][0])
        self.assertIn("no answer in time", self.probes[0][1])
        self.assertTrue(self.upstream.transport().disconnecting)  # hung up
        self.assertFalse(self.backend.pool.members[0].probing)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stoppingTheBackendEndsAProbeUnderWay(self) -> None:
        self.backend.stopBackend()
        self.assertEqual(len(self.probes), 1)
        self.assertIn("the backend is stopping", self.probes[0][1])
        self.assertFalse(self.backend.pool.members[0].probing)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        after: list[tuple[bool, str]] = []
        self.backend.probeHealth().addCallback(after.append)
        self.assertEqual(len(after), 1)  # answered at once, nothing sent
        self.assertEqual(len(self.upstream.connections), 1)

    def test_whatCountsAsCancelled(self) -> None:
        from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

        from cc50tw.backends.http.faults import wasCancelled as _wasCancelled

        cancelled = Failure(CancelledError())
        self.assertTrue(_wasCancelled(cancelled))
        self.assertTrue(_wasCancelled(Failure(netError.ConnectingCancelledError(None))))
        self.assertTrue(_wasCancelled(Failure(ResponseNeverReceived([cancelled]))))
        self.assertTrue(_wasCancelled(Failure(RequestTransmissionFailed([cancelled]))))
        self.assertFalse(_wasCancelled(Failure(ResponseNeverReceived([Failure(netError.ConnectionDone())]))))
        self.assertFalse(_wasCancelled(Failure(netError.ConnectionRefusedError())))


class UpstreamEndpointsTests(SynchronousTestCase):
    """IP literals are connected to directly; only host names are resolved."""

    def endpoint(self, url: bytes) -> Any:
        return UpstreamEndpoints(MemoryReactorClock(), 2.5).endpointForURI(URI.fromBytes(url))

    def test_ipv4LiteralIsNotResolved(self) -> None:
        endpoint = self.endpoint(b"http://127.0.0.1:8080/completion")
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertEqual((endpoint._host, endpoint._port, endpoint._timeout), ("127.0.0.1", 8080, 2.5))

    def test_ipv6Literal(self) -> None:
        endpoint = self.endpoint(b"http://[::1]:8080/completion")
        self.assertIsInstance(endpoint, TCP6ClientEndpoint)
        self.assertEqual(endpoint._host, "::1")

    def test_hostName(self) -> None:
        self.assertIsInstance(self.endpoint(b"http://llama.internal:8080/"), HostnameEndpoint)

    def test_httpsIsWrappedInTLS(self) -> None:
        endpoint = self.endpoint(b"https://10.0.0.1:8443/")
        self.assertNotIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertIsInstance(endpoint._wrappedEndpoint, TCP4ClientEndpoint)

    def test_refusedConnectionThroughTheRealAgent(self) -> None:
        """The backend's own agent maps a refused connection like any other."""
        reactor = MemoryReactorClock()
        backend = LlamaServerBackend(reactor, "http://127.0.0.1:9")
        results: list[object] = []
        backend.generate(InferenceRequest(1, "p", 1), RecordingSink()).addBoth(results.append)
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, DEFAULT_CONNECT_TIMEOUT))
        factory.clientConnectionFailed(None, Failure(netError.ConnectionRefusedError()))  # type: ignore[arg-type]
        assert isinstance(results[0], Failure)
        self.assertEqual(results[0].value.code, ErrorCode.UPSTREAM_UNAVAILABLE)


class OptionsTests(SynchronousTestCase):
    def options(self, *argv: str) -> Any:
        from cc50tw.tap import Options

        options = Options()
        options.parseOptions(["--backend=llama_server", *argv])
        return options

    def test_registered(self) -> None:
        self.assertIn("llama_server", installed_backends())

    def test_defaults(self) -> None:
        options = self.options()
        backend = installed_backends()["llama_server"].build(options, MemoryReactorClock())
        assert isinstance(backend, LlamaServerBackend)
        self.assertEqual((backend.url, backend.endpoint), ("http://127.0.0.1:8080", "/completion"))

    def test_allOptions(self) -> None:
        options = self.options(
            "--llama-url=http://10.0.0.5:9000/",
            "--llama-endpoint=/v1/chat/completions",
            "--llama-connect-timeout=1.5",
            "--llama-first-event-timeout=20",
            "--llama-idle-timeout=7",
        )
        backend = installed_backends()["llama_server"].build(options, MemoryReactorClock())
        assert isinstance(backend, LlamaServerBackend)
        self.assertEqual(backend.url, "http://10.0.0.5:9000")
        self.assertEqual(backend.endpoint, "/v1/chat/completions")
        self.assertEqual((backend.connect_timeout, backend.first_event_timeout, backend.idle_timeout), (1.5, 20.0, 7.0))

    def test_badEndpoint(self) -> None:
        with self.assertRaises(usage.UsageError):
            self.options("--llama-endpoint=/generate")

    def test_badTimeout(self) -> None:
        with self.assertRaises(usage.UsageError):
            self.options("--llama-idle-timeout=0")

    def test_badURL(self) -> None:
        from cc50tw.tap import makeService

        with self.assertRaises(usage.UsageError) as caught:
            makeService(self.options("--llama-url=llama:8080"))
        self.assertIn("--llama-url", str(caught.exception))
