"""
The error taxonomy of docs/backends.md, row by row, in memory: what each
upstream failure becomes (code, retried or not, held against the upstream
or not), and every in-stream error shape in each dialect, which must end a
request as an error and never as a finished answer.
"""

from __future__ import annotations

import json

from twisted.internet import error as netError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from cc50tw.backends.http.dialects import CompletionDialect, Dialect, OpenAICompletionsDialect, Progress
from cc50tw.backends.http.faults import Fault, connectionFault, httpFault, retryAfter
from cc50tw.codec import ErrorCode
from cc50tw.sse import SSEEvent, SSEParser

WHERE = "llama-server at http://u.test"


def http(status: int, body: object, retry: list[bytes] | None = None) -> Fault:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpFault(status, data, WHERE, "/completion", "--llama-endpoint", retry)


def row(fault: Fault) -> tuple[ErrorCode, bool, bool]:
    return fault.code, fault.retry, fault.unhealthy


class HTTPStatusTests(SynchronousTestCase):
    def test_credentialsRefused(self) -> None:
        for status in (401, 403):
            fault = http(status, {"error": {"message": "invalid api key MARK"}})
            self.assertEqual(row(fault), (ErrorCode.BACKEND_ERROR, False, False))
            self.assertIn("MARK", fault.message)
            self.assertIn("credentials", fault.message)

    def test_unknownModelIsTheRequestsFault(self) -> None:
        fault = http(404, {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}})
        self.assertEqual(row(fault), (ErrorCode.BAD_REQUEST, False, False))
        self.assertIn("does not exist", fault.message)

    def test_noSuchAPI(self) -> None:
        fault = http(404, b"File Not Found")
        self.assertEqual(row(fault), (ErrorCode.BACKEND_ERROR, False, False))
        self.assertIn("--llama-endpoint", fault.message)

    def test_badRequest(self) -> None:
        for status in (400, 422):
            fault = http(status, {"error": {"message": "temperature MARK"}})
            self.assertEqual(row(fault), (ErrorCode.BAD_REQUEST, False, False))
            self.assertIn("MARK", fault.message)

    def test_contextOverflowIsTooLarge(self) -> None:
        llama = {"error": {"code": 400, "message": "the request exceeds the available context size", "type": "exceed_context_size_error"}}
        openai = {"error": {"message": "maximum context length is 4096 tokens", "code": "context_length_exceeded"}}
        for status, body in ((400, llama), (400, openai), (422, openai), (413, b"Payload Too Large")):
            self.assertEqual(row(http(status, body)), (ErrorCode.TOO_LARGE, False, False), (status, body))

    def test_overloaded(self) -> None:
        fault = http(429, {"error": {"message": "busy MARK"}}, [b"30"])
        self.assertEqual(row(fault), (ErrorCode.OVERLOADED, True, False))
        self.assertEqual((fault.overloaded, fault.holdOff), (True, 30.0))
        self.assertIn("MARK", fault.message)
        self.assertIsNone(http(429, b"").holdOff)

    def test_retryAfterForms(self) -> None:
        self.assertEqual(retryAfter([b"12"]), 12.0)
        self.assertEqual(retryAfter([b"999999"]), 300.0)
        self.assertIsNone(retryAfter([b"soon"]))
        self.assertIsNone(retryAfter(None))
        self.assertEqual(retryAfter([b"Wed, 21 Oct 2015 07:28:00 GMT"], now=1445412460.0), 20.0)

    def test_fiveHundredIsRetriedButNotHeldAgainstTheUpstream(self) -> None:
        self.assertEqual(row(http(500, {"error": {"message": "tokenizer crashed"}})), (ErrorCode.BACKEND_ERROR, True, False))

    def test_gatewayAndUnavailable(self) -> None:
        self.assertEqual(row(http(502, b"bad gateway")), (ErrorCode.UPSTREAM_UNAVAILABLE, True, True))
        self.assertEqual(row(http(503, {"error": {"message": "Loading model"}})), (ErrorCode.UPSTREAM_UNAVAILABLE, True, True))
        self.assertEqual(row(http(504, b"gateway timeout")), (ErrorCode.TIMEOUT, True, True))
        self.assertEqual(row(http(507, b"insufficient storage")), (ErrorCode.BACKEND_ERROR, True, True))


class ConnectionTests(SynchronousTestCase):
    def fault(self, error: BaseException) -> Fault:
        return connectionFault(Failure(error), WHERE, 2.5, "llama")

    def test_refused(self) -> None:
        self.assertEqual(row(self.fault(netError.ConnectionRefusedError())), (ErrorCode.UPSTREAM_UNAVAILABLE, True, True))

    def test_connectTimeout(self) -> None:
        fault = self.fault(netError.TimeoutError())
        self.assertEqual(row(fault), (ErrorCode.TIMEOUT, True, True))
        self.assertIn("--llama-connect-timeout", fault.message)

    def test_closedBeforeAnsweringSaysWhy(self) -> None:
        fault = self.fault(ResponseNeverReceived([Failure(netError.ConnectionLost("peer reset MARK"))]))
        self.assertEqual(row(fault), (ErrorCode.UPSTREAM_UNAVAILABLE, True, True))
        self.assertIn("ConnectionLost", fault.message)
        self.assertIn("MARK", fault.message)

    def test_tlsFailureGivesTheVerifiersReason(self) -> None:
        from OpenSSL.SSL import Error as SSLError

        tls = SSLError([("SSL routines", "", "certificate verify failed")])
        fault = self.fault(ResponseNeverReceived([Failure(tls)]))
        self.assertEqual(row(fault), (ErrorCode.UPSTREAM_UNAVAILABLE, True, True))
        self.assertIn("TLS", fault.message)
        self.assertIn("certificate verify failed", fault.message)


def events(raw: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    found = parser.feed(raw)
    last = parser.finish()
    return found + ([last] if last is not None else [])


DIALECTS: list[Dialect] = [
    CompletionDialect(WHERE),
    OpenAICompletionsDialect(WHERE),
    OpenAICompletionsDialect(WHERE, chat=True),
]


class InStreamErrorTests(SynchronousTestCase):
    """Every shape an upstream uses to report a failure mid-stream, in every dialect."""

    SHAPES = [
        b'event: error\ndata: {"error": {"message": "MARK crashed"}}\n\n',
        b'data: {"error": {"message": "MARK crashed", "type": "server_error"}}\n\n',
        b'data: {"object": "error", "message": "MARK crashed", "type": "BadRequestError", "code": 400}\n\n',
        b'error: {"code": 500, "message": "MARK crashed", "type": "server_error"}\n\n',
        b'error: {"code": 500, "message": "MARK crashed"}',  # no blank line before the body ended
        b"event: error\ndata: MARK crashed\n\n",
    ]

    def test_everyShapeIsAnErrorWithTheUpstreamsMessage(self) -> None:
        for dialect in DIALECTS:
            for shape in self.SHAPES:
                [event] = events(shape)
                delta = dialect.interpret(event, Progress())
                self.assertIsNotNone(delta.error, (dialect, shape))
                assert delta.error is not None
                self.assertEqual(delta.error.code, ErrorCode.BACKEND_ERROR)
                self.assertIn("MARK crashed", delta.error.message)
                self.assertFalse(delta.finished)

    def test_contextOverflowMidStreamIsTooLarge(self) -> None:
        [event] = events(b'data: {"error": {"message": "context size exceeded", "type": "exceed_context_size_error"}}\n\n')
        for dialect in DIALECTS:
            delta = dialect.interpret(event, Progress())
            assert delta.error is not None
            self.assertEqual(delta.error.code, ErrorCode.TOO_LARGE)

    def test_malformedEventsAreErrors(self) -> None:
        for dialect in DIALECTS:
            for raw in (b"data: not json\n\n", b"data: [1, 2]\n\n", b'data: {"content": 5, "choices": 7}\n\n'):
                [event] = events(raw)
                self.assertIsNotNone(dialect.interpret(event, Progress()).error, (dialect, raw))


class ReasoningTests(SynchronousTestCase):
    def test_chatReasoningIsKeptApart(self) -> None:
        [event] = events(b'data: {"choices": [{"index": 0, "delta": {"reasoning_content": "think", "content": "say"}}]}\n\n')
        delta = OpenAICompletionsDialect(WHERE, chat=True).interpret(event, Progress())
        self.assertEqual((delta.reasoning, delta.text), ("think", "say"))

    def test_finishReasonIsKept(self) -> None:
        [event] = events(b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}\n\n')
        self.assertEqual(OpenAICompletionsDialect(WHERE).interpret(event, Progress()).finishReason, "length")
        [final] = events(b'data: {"content": "", "stop": true, "stop_type": "eos", "tokens_predicted": 3}\n\n')
        delta = CompletionDialect(WHERE).interpret(final, Progress())
        self.assertEqual((delta.finished, delta.finishReason, delta.generatedTokens), (True, "stop", 3))
