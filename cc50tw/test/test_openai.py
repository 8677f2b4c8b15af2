"""
The openai backend: OpenAI's request shape, the API key, its options; the
streaming itself is the machinery ``test_llama_server`` covers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends import installed_backends
from cc50tw.backends.openai import OpenAIBackend
from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult, InferenceRequest
from cc50tw.test.test_llama_server import LAST_CHUNK, FakeUpstream, RecordingSink, chunk, errorResponse, event, sseHead

URL = "http://vllm.test:8000"


def head(raw: bytes) -> tuple[str, dict[str, str]]:
    """The request line and headers (lower-case names) of the first request in ``raw``."""
    lines = raw.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class Harness:
    def __init__(self, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = FakeUpstream(self.reactor)
        options.setdefault("health_interval", 0)
        self.backend = OpenAIBackend(self.reactor, [URL], http=self.upstream.client(), **options)
        self.results: list[object] = []

    def generate(self, prompt: str = "Hello", max_tokens: int = 5) -> RecordingSink:
        sink = RecordingSink()
        self.backend.generate(InferenceRequest(1, prompt, max_tokens), sink).addBoth(self.results.append)
        return sink


def completionStream(texts: list[str], usage: dict[str, int]) -> bytes:
    events = [event(choices=[{"text": text, "index": 0, "finish_reason": None}]) for text in texts]
    events.append(event(choices=[{"text": "", "index": 0, "finish_reason": "length"}]))
    events.append(event(choices=[], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK


class RequestTests(SynchronousTestCase):
    def test_completionsWithModelAndNoLlamaExtensions(self) -> None:
        h = Harness(model="meta-llama/Llama-3.1-8B")
        sink = h.generate("Once", 7)
        method, path, body = h.upstream.request()
        self.assertEqual((method, path), ("POST", "/v1/completions"))
        self.assertEqual(
            body,
            {
                "model": "meta-llama/Llama-3.1-8B",
                "prompt": "Once",
                "max_tokens": 7,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        _, headers = head(h.upstream.transport().value())
        self.assertNotIn("authorization", headers)
        h.upstream.send(completionStream([" upon", " a"], {"prompt_tokens": 2, "completion_tokens": 7}))
        self.assertEqual(sink.text, " upon a")
        self.assertEqual(h.results, [GenerationResult(2, 7, "length")])

    def test_chatSendsThePromptAsOneUserMessage(self) -> None:
        h = Harness(model="m", chat=True)
        sink = h.generate("Hi there")
        _, path, body = h.upstream.request()
        self.assertEqual(path, "/v1/chat/completions")
        self.assertEqual(body["messages"], [{"role": "user", "content": "Hi there"}])
        self.assertNotIn("prompt", body)
        events = [
            event(choices=[{"delta": {"role": "assistant", "content": None}, "index": 0, "finish_reason": None}]),
            event(choices=[{"delta": {"content": "Hey"}, "index": 0, "finish_reason": "stop"}]),
            event(choices=[], usage={"prompt_tokens": 9, "completion_tokens": 1}),
            b"data: [DONE]\n\n",
        ]
        h.upstream.send(sseHead() + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        self.assertEqual(sink.text, "Hey")
        self.assertEqual(h.results, [GenerationResult(9, 1, "stop")])

    def test_noModelOmitsIt(self) -> None:
        h = Harness()
        h.generate()
        self.assertNotIn("model", h.upstream.request()[2])

    def test_apiKeyIsSentAsBearerOnStreamsAndHealthChecks(self) -> None:
        h = Harness(api_key="sk-test-123")
        h.generate()
        _, headers = head(h.upstream.transport().value())
        self.assertEqual(headers["authorization"], "Bearer sk-test-123")
        self.assertEqual(headers["content-type"], "application/json")
        h.backend.probeHealth()
        line, headers = head(h.upstream.transport().value())
        self.assertEqual(line, "GET /health HTTP/1.1")
        self.assertEqual(headers["authorization"], "Bearer sk-test-123")

    def test_keyNeverAppearsInTheDescription(self) -> None:
        h = Harness(api_key="sk-secret", model="m")
        self.assertNotIn("sk-secret", h.backend.describe())
        self.assertIn("with an API key", h.backend.describe())

    def test_rejectedKeyIsABackendErrorAndNotAnUpstreamFault(self) -> None:
        h = Harness(api_key="wrong")
        h.generate()
        body = b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'
        h.upstream.send(errorResponse(401, b"Unauthorized", body))
        failure = h.results[0]
        assert isinstance(failure, Failure) and isinstance(failure.value, BackendError)
        self.assertEqual(failure.value.code, ErrorCode.BACKEND_ERROR)
        self.assertIn("HTTP 401: Invalid API Key", failure.value.message)
        self.assertIn(f"OpenAI-compatible server at {URL}", failure.value.message)
        self.assertTrue(h.backend.pool.isUp(h.backend.pool.members[0]))

    def test_404NamesTheOptions(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(errorResponse(404, b"Not Found", b'{"detail":"Not Found"}'))
        failure = h.results[0]
        assert isinstance(failure, Failure)
        self.assertIn("--openai-url", failure.value.message)
        self.assertIn("without /v1", failure.value.message)

    def test_messagesNameTheOpenAIOptions(self) -> None:
        h = Harness(first_event_timeout=3)
        h.generate()
        h.reactor.advance(4)
        failure = h.results[0]
        assert isinstance(failure, Failure)
        self.assertEqual(failure.value.code, ErrorCode.TIMEOUT)
        self.assertIn("--openai-first-event-timeout", failure.value.message)


class OptionsTests(SynchronousTestCase):
    def options(self, *argv: str) -> Any:
        from cc50tw.tap import Options

        options = Options()
        options.parseOptions(["--backend=openai", *argv])
        return options

    def keyFile(self, content: bytes) -> str:
        path = FilePath(self.mktemp())
        path.setContent(content)
        return path.path

    def test_registered(self) -> None:
        self.assertIn("openai", installed_backends())

    def test_allOptions(self) -> None:
        backend = self.options(
            "--openai-url=http://10.0.0.1:8000/",
            "--openai-url=http://10.0.0.2:8000",
            "--model=qwen",
            f"--api-key-file={self.keyFile(b'  sk-abc  ' + bytes([10]))}",
            "--openai-chat",
            "--openai-connect-timeout=1.5",
            "--openai-first-event-timeout=20",
            "--openai-idle-timeout=7",
            "--openai-health-interval=2",
            "--openai-health-path=/v1/models",
            "--openai-backoff=3",
        ).backend
        assert isinstance(backend, OpenAIBackend)
        self.assertEqual(backend.urls, ["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
        self.assertEqual((backend.model, backend.chat), ("qwen", True))
        self.assertEqual(dict(backend.settings.headers), {b"Authorization": (b"Bearer sk-abc",)})
        self.assertEqual((backend.connect_timeout, backend.first_event_timeout, backend.idle_timeout), (1.5, 20, 7))
        self.assertEqual((backend.health_interval, backend.health_path, backend.pool.backoff), (2, "/v1/models", 3))
        self.assertEqual(backend.dialect.path, "/v1/chat/completions")

    def test_defaults(self) -> None:
        backend = self.options("--openai-url=http://127.0.0.1:8000").backend
        assert isinstance(backend, OpenAIBackend)
        self.assertEqual((backend.model, backend.chat, backend.health_path), (None, False, "/health"))
        self.assertEqual(backend.dialect.path, "/v1/completions")
        self.assertEqual(dict(backend.settings.headers), {})

    def test_urlIsRequired(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--model=m")
        self.assertIn("--openai-url is required", str(caught.exception))

    def test_badURLNamesTheOption(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--openai-url=localhost:8000")
        self.assertIn("--openai-url", str(caught.exception))

    def test_missingOrEmptyKeyFile(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--openai-url=http://h:1", "--api-key-file=/nonexistent/key")
        self.assertIn("--api-key-file: cannot read", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--openai-url=http://h:1", f"--api-key-file={self.keyFile(b'   ')}")
        self.assertIn("is empty", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--openai-url=http://h:1", f"--api-key-file={self.keyFile(b'a' + bytes([10]) + b'b')}")
        self.assertIn("more than one line", str(caught.exception))

    def test_healthChecksOff(self) -> None:
        backend = self.options("--openai-url=http://h:1", "--openai-health-path=none").backend
        self.assertIsNone(backend.health_path)
        answers: list[object] = []
        backend.checkHealth().addCallback(answers.append)
        self.assertEqual(answers, [True])
        with self.assertRaises(usage.UsageError):
            self.options("--openai-url=http://h:1", "--openai-health-path=health")

    def test_helpListsTheOptions(self) -> None:
        from cc50tw.tap import Options

        text = Options().getUsage(width=200)
        for option in ("--openai-url", "--model", "--api-key-file", "--openai-chat", "--llama-backoff"):
            self.assertIn(option, text)
        self.assertIn("openai ", text)


class RequestBodyTests(SynchronousTestCase):
    def test_bodyIsJSON(self) -> None:
        h = Harness(model="m")
        h.generate("é 🙂", 3)
        raw = h.upstream.transport().value().partition(b"\r\n\r\n")[2]
        self.assertEqual(json.loads(raw)["prompt"], "é 🙂")
