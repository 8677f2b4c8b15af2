"""
Routing by model (``--config``'s ``[[upstreams]]``): which upstream a
request goes to (its model's, least loaded for its weight, none at its
max_concurrency, healthy first), retries only within the model, each
upstream's own dialect and API key, and what the server makes of models
(an unknown one refused, the model in the log line and in
``cc50_model_requests_total``).

The real HTTP client over fake connections, as in ``test_upstream_pool``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as netError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.http.routes import UpstreamRoute
from cc50tw.backends.llama_server import LlamaServerBackend
from cc50tw.backends.openai import OpenAIBackend
from cc50tw.backends.pool import AllBusy, Upstream, UpstreamPool
from cc50tw.codec import ErrorCode, MessageType, decode_error, encode_infer
from cc50tw.generation import GenerationOptions
from cc50tw.interfaces import InferenceRequest
from cc50tw.test.fakes import Connection, error_code, make_factory, terminal_frames
from cc50tw.test.test_llama_server import RecordingSink, completionResponse
from cc50tw.test.test_upstream_pool import FakeUpstreams, error, health

A, B, C = "http://a.test:8080", "http://b.test:8080", "http://c.test:8080"


class Routed:
    """A backend whose upstreams A and C serve alpha, B beta; every request body read back."""

    def __init__(
        self, routes: list[UpstreamRoute] | None = None, backend: type[Any] = LlamaServerBackend, **options: Any
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.routes = routes or [
            UpstreamRoute(A, "llama", "alpha"),
            UpstreamRoute(B, "llama", "beta"),
            UpstreamRoute(C, "llama", "alpha"),
        ]
        self.upstreams = FakeUpstreams(self.reactor, [route.url for route in self.routes])
        options.setdefault("health_interval", 0)
        self.backend = backend(self.reactor, (), routes=self.routes, http=self.upstreams.client(), **options)

    def member(self, url: str) -> Upstream:
        return next(upstream for upstream in self.backend.pool.members if upstream.url == url)

    def generate(self, model: str | None = None) -> tuple[list[object], RecordingSink]:
        sink = RecordingSink()
        results: list[object] = []
        request = InferenceRequest(1, "p", 8, GenerationOptions(model=model))
        self.backend.generate(request, sink).addBoth(results.append)
        return results, sink

    def outstanding(self) -> list[int]:
        return [self.member(route.url).outstanding for route in self.routes]

    def head(self, url: str, index: int = -1) -> bytes:
        """The request line and headers of a request sent to ``url``."""
        return bytes(self.upstreams[url].transport(index).value().partition(b"\r\n\r\n")[0])


class ChooseTests(SynchronousTestCase):
    """``UpstreamPool.choose`` alone."""

    def pool(self, *members: Upstream) -> UpstreamPool:
        return UpstreamPool(list(members), MemoryReactorClock())

    def test_onlyTheModelsUpstreams(self) -> None:
        pool = self.pool(Upstream(A, model="alpha"), Upstream(B, model="beta"), Upstream(C, model="alpha"))
        chosen = {pool.choose(model="alpha").url for _ in range(4)}  # type: ignore[union-attr]
        self.assertEqual(chosen, {A, C})
        self.assertEqual(pool.choose(model="beta").url, B)  # type: ignore[union-attr]
        self.assertIsNone(pool.choose(model="gamma"))
        self.assertEqual(pool.models(), ["alpha", "beta"])

    def test_weightsShareTheLoad(self) -> None:
        pool = self.pool(Upstream(A, model="m", weight=3), Upstream(B, model="m"))
        for _ in range(8):
            chosen = pool.choose(model="m")
            assert chosen is not None
            pool.acquire(chosen)
        self.assertEqual([upstream.outstanding for upstream in pool], [6, 2])

    def test_idleTheHeavierIsChosen(self) -> None:
        pool = self.pool(Upstream(A, model="m"), Upstream(B, model="m", weight=2))
        self.assertEqual(pool.choose(model="m").url, B)  # type: ignore[union-attr]

    def test_fullUpstreamsAreSkipped(self) -> None:
        a, b = Upstream(A, model="m", maxConcurrency=1), Upstream(B, model="m", maxConcurrency=2)
        pool = self.pool(a, b)
        order = []
        for _ in range(3):
            chosen = pool.choose(model="m")
            assert chosen is not None
            pool.acquire(chosen)
            order.append(chosen.url)
        self.assertEqual((a.outstanding, b.outstanding), (1, 2))
        with self.assertRaises(AllBusy) as caught:
            pool.choose(model="m")
        self.assertEqual(caught.exception.limit, 3)
        pool.release(a, "done")
        self.assertIs(pool.choose(model="m"), a)

    def test_unhealthyUpstreamOfTheModelIsSkipped(self) -> None:
        a, b, c = Upstream(A, model="alpha"), Upstream(B, model="beta"), Upstream(C, model="alpha")
        pool = self.pool(a, b, c)
        pool.healthChecked(a, False, "down")
        self.assertEqual({pool.choose(model="alpha").url for _ in range(3)}, {C})  # type: ignore[union-attr]

    def test_panicModeStaysWithinTheModel(self) -> None:
        """Every alpha upstream down: still alpha's (a fast failure), never beta's."""
        a, b = Upstream(A, model="alpha"), Upstream(B, model="beta")
        pool = self.pool(a, b)
        pool.healthChecked(a, False, "down")
        self.assertIs(pool.choose(model="alpha"), a)

    def test_noModelMeansAnyUpstream(self) -> None:
        """A pool without models (--llama-url) routes as it always did."""
        pool = UpstreamPool([A, B], MemoryReactorClock())
        self.assertEqual([pool.choose(model="whatever").url for _ in range(2)], [A, B])  # type: ignore[union-attr]


class BackendRoutingTests(SynchronousTestCase):
    def test_requestsGoToTheirModelsUpstreams(self) -> None:
        r = Routed()
        r.generate("beta")
        self.assertEqual(r.outstanding(), [0, 1, 0])
        r.generate("alpha")
        r.generate("alpha")
        self.assertEqual(r.outstanding(), [1, 1, 1])

    def test_noModelGoesToTheDefault(self) -> None:
        r = Routed(defaultModel="beta")
        r.generate()
        self.assertEqual(r.outstanding(), [0, 1, 0])
        self.assertEqual(r.backend.models(), ["beta", "alpha"])

    def test_withoutDefaultTheFirstUpstreamsModel(self) -> None:
        r = Routed()
        self.assertEqual(r.backend.defaultModel, "alpha")
        self.assertEqual(r.backend.models(), ["alpha", "beta"])
        r.generate()
        self.assertEqual(r.outstanding(), [1, 0, 0])

    def test_unknownDefaultModelIsRefused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            Routed(defaultModel="gamma")
        self.assertIn("default_model 'gamma'", str(caught.exception))

    def test_allAtMaxConcurrencyIsOverloadedAndNotSent(self) -> None:
        r = Routed([UpstreamRoute(A, "llama", "alpha", max_concurrency=1), UpstreamRoute(B, "llama", "beta")])
        r.generate("alpha")
        results, sink = r.generate("alpha")
        failure = error(results)
        self.assertEqual(failure.code, ErrorCode.OVERLOADED)
        self.assertIn("model 'alpha' is at its max_concurrency", failure.message)
        self.assertEqual(len(r.upstreams[A].connections), 1)
        self.assertEqual(r.upstreams[B].connections, [])
        self.assertEqual((sink.registrations, sink.unregistrations), (1, 1))
        self.assertEqual(r.outstanding(), [1, 0])

    def test_retryOnlyToAnUpstreamOfTheSameModel(self) -> None:
        r = Routed()
        r.upstreams[A].refuse = netError.ConnectionRefusedError("Connection refused")
        results, sink = r.generate("alpha")
        self.assertEqual(r.outstanding(), [0, 0, 1])
        self.assertEqual(r.upstreams[B].connections, [])

    def test_noRetryToAnotherModelsUpstream(self) -> None:
        r = Routed([UpstreamRoute(A, "llama", "alpha"), UpstreamRoute(B, "llama", "beta")])
        r.upstreams[A].refuse = netError.ConnectionRefusedError("Connection refused")
        results, sink = r.generate("alpha")
        self.assertEqual(error(results).code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertEqual(r.upstreams[B].connections, [])

    def test_eachUpstreamItsOwnDialectAndModelName(self) -> None:
        r = Routed(
            [
                UpstreamRoute(A, "openai", "alpha", upstream_model="org/alpha-7b"),
                UpstreamRoute(B, "chat", "beta"),
                UpstreamRoute(C, "llama", "gamma"),
            ],
            backend=OpenAIBackend,
        )
        for model in ("alpha", "beta", "gamma"):
            r.generate(model)
        method, path, body = r.upstreams[A].request()
        self.assertEqual((path, body["model"], "cache_prompt" in body), ("/v1/completions", "org/alpha-7b", False))
        method, path, body = r.upstreams[B].request()
        self.assertEqual((path, body["model"]), ("/v1/chat/completions", "beta"))
        method, path, body = r.upstreams[C].request()
        self.assertEqual(path, "/completion")
        self.assertNotIn("model", body)

    def test_eachKeyGoesOnlyToItsUpstream(self) -> None:
        r = Routed(
            [
                UpstreamRoute(A, "openai", "alpha", api_key="key-a"),
                UpstreamRoute(B, "openai", "beta"),
                UpstreamRoute(C, "openai", "alpha", api_key="key-c"),
            ],
            backend=OpenAIBackend,
        )
        for model in ("alpha", "beta", "alpha"):
            r.generate(model)
        self.assertIn(b"Authorization: Bearer key-a", r.head(A))
        self.assertNotIn(b"key-c", r.head(A))
        self.assertNotIn(b"Authorization", r.head(B))
        self.assertIn(b"Authorization: Bearer key-c", r.head(C))
        self.assertNotIn(b"key-a", r.head(C))

    def test_healthChecksCarryTheUpstreamsOwnKey(self) -> None:
        r = Routed(
            [UpstreamRoute(A, "openai", "alpha", api_key="key-a"), UpstreamRoute(B, "openai", "beta")],
            backend=OpenAIBackend,
            health_path="/v1/models",
        )
        probed: list[tuple[bool, str]] = []
        r.backend.probeHealth().addCallback(probed.append)
        self.assertIn(b"Authorization: Bearer key-a", r.head(A, 0))
        self.assertNotIn(b"Authorization", r.head(B, 0))
        for url in (A, B):
            r.upstreams[url].send(health(200))
        self.assertTrue(probed[0][0])

    def test_describeNamesEachRoute(self) -> None:
        description = Routed([UpstreamRoute(A, "openai", "alpha", api_key="secret", weight=2)]).backend.describe()
        self.assertIn(f"'alpha' at {A}", description)
        self.assertIn("weight 2", description)
        self.assertIn("with its API key", description)
        self.assertNotIn("secret", description)


class ServerTests(SynchronousTestCase):
    """What the server does with a routed backend's models."""

    def setUp(self) -> None:
        self.routed = Routed()
        self.factory, self.clock = make_factory(self.routed.backend)
        self.connection = Connection(self.factory)

    def infer(self, reqId: int, model: str | None) -> None:
        self.connection.send(encode_infer(reqId, "p", 8, 0, GenerationOptions(model=model)))

    def test_unknownModelListsTheServedOnes(self) -> None:
        self.infer(1, "gamma")
        [frame] = terminal_frames(self.connection.received(), 1)
        self.assertEqual(error_code(frame), ErrorCode.BAD_REQUEST)
        message = decode_error(frame).message
        self.assertIn("unknown model 'gamma'", message)
        self.assertIn("'alpha', 'beta'", message)

    def test_modelInTheLogLineAndTheCounter(self) -> None:
        with capturedLogs() as logged:
            self.infer(1, "beta")
            self.infer(3, None)
            self.clock.advance(0)
            self.routed.upstreams[B].send(completionResponse(["hi"]))
            [alpha] = [url for url in (A, C) if self.routed.member(url).outstanding]
            self.routed.upstreams[alpha].send(completionResponse(["hi"]))
            self.clock.advance(0)
        frames = self.connection.received()
        self.assertEqual(
            [f.type for f in terminal_frames(frames, 1) + terminal_frames(frames, 3)], [MessageType.RESP_DONE] * 2
        )
        lines = [formatEvent(e) for e in logged if "request " in formatEvent(e)]
        self.assertTrue(any("request 1 " in line and " model=beta " in line for line in lines), lines)
        self.assertTrue(any("request 3 " in line and " model=alpha " in line for line in lines), lines)
        sample = self.factory.metrics.registry.get_sample_value
        self.assertEqual(sample("cc50_model_requests_total", {"model": "beta", "outcome": "done"}), 1.0)
        self.assertEqual(sample("cc50_model_requests_total", {"model": "alpha", "outcome": "done"}), 1.0)

    def test_helloAdvertisesTheModels(self) -> None:
        self.assertIn(b'"models":["alpha","beta"]', self.factory.helloReply.replace(b" ", b""))


class UnroutedTests(SynchronousTestCase):
    def test_noRoutesNoModels(self) -> None:
        """Without [[upstreams]] the backends are as before: no models of their own, no default."""
        backend = LlamaServerBackend(MemoryReactorClock(), [A], health_interval=0)
        self.assertEqual(backend.models(), [])
        self.assertIsNone(backend.modelFor(GenerationOptions()))
