"""
Adversarial review of generation options and model routing (unit level).

Tests that were named ``test_BUG_*`` each showed a real defect, since fixed (see
the docstring for what should happen instead).  The others are regression
tests for attacks that held.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import FailTest, SynchronousTestCase

from cc50tw.backends.http.dialects import CompletionDialect, OpenAICompletionsDialect
from cc50tw.backends.http.routes import UpstreamRoute
from cc50tw.backends.pool import AllBusy, Upstream, UpstreamPool
from cc50tw.client import generationOptions, parseHello
from cc50tw.codec import (
    INFER_PREFIX,
    ErrorCode,
    MessageType,
    decode_done,
    encode_frame,
    encode_infer,
)
from cc50tw.config import ConfigError, parseUpstreams
from cc50tw.generation import (
    MAX_OPTIONS_BYTES,
    GenerationOptions,
    OptionsError,
    decodeOptions,
    encodeOptions,
)
from cc50tw.interfaces import GenerationResult, InferenceRequest
from cc50tw.test.fakes import Connection, ManualBackend, error_code, make_factory


def block(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<I", len(data)) + data


def inferWith(reqId: int, optionsBytes: bytes, prompt: bytes = b"p") -> bytes:
    return encode_frame(MessageType.REQ_INFER, reqId, INFER_PREFIX.pack(1, 0, len(prompt)) + prompt + optionsBytes)


def refusal(options: str | bytes) -> str:
    """The OptionsError message for ``options``; fails the test if anything else happens."""
    try:
        decodeOptions(block(options))
    except OptionsError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - what the test is about
        raise FailTest(f"{type(e).__name__} ({e}) escaped decodeOptions for {options!r:.60}") from None
    raise FailTest(f"{options!r:.80} was accepted")


DEEP = '{"extra":{"a":' + "[" * 5000 + "]" * 5000 + "}}"
HUGE_INT = '{"temperature":' + "9" * 400 + "}"


def routedBackend() -> ManualBackend:
    backend = ManualBackend()
    backend.generationOptions = frozenset(  # type: ignore[attr-defined]
        {"model", "temperature", "extra", "stop"}
    )
    return backend


class HostileBlockTests(SynchronousTestCase):
    # --- bugs -------------------------------------------------------------

    def test_hugeIntegerWhereANumberIsExpected(self) -> None:
        """
        ``{"temperature": 999...9}`` (400 digits): ``math.isfinite`` raises
        OverflowError, which is neither OptionsError nor TypeError, so it
        escapes ``decodeOptions`` (generation._number).
        """
        self.assertIn("temperature", refusal(HUGE_INT))

    def test_deeplyNestedJSON(self) -> None:
        """10 KB of nested arrays: json.loads raises RecursionError, not ValueError."""
        self.assertIn("JSON", refusal(DEEP))

    def test_serverKeepsTheConnectionForTheseBlocks(self) -> None:
        """
        docs/protocol.md: bad bytes after the prompt get RESP_ERR BAD_REQUEST
        "for that req_id; the connection goes on".  Today the exception
        escapes dataReceived: Twisted logs "Unhandled Error" and drops the
        connection, with every other request on it, and no RESP_ERR at all.
        """
        for text in (HUGE_INT, DEEP):
            backend = routedBackend()
            factory, _ = make_factory(backend)
            connection = Connection(factory)
            connection.send(encode_infer(1, "in flight", 3))
            try:
                connection.send(inferWith(2, block(text)))
            except (OverflowError, RecursionError) as e:
                self.fail(f"{type(e).__name__} escaped the protocol for {text[:30]!r}: the connection is lost")
            [answer] = connection.received()
            self.assertEqual((answer.req_id, error_code(answer)), (2, ErrorCode.BAD_REQUEST))
            self.assertFalse(backend.streams[1].cancelled)

    def test_nonFiniteNumbersInExtraAreRefused(self) -> None:
        """
        NaN/Infinity are not JSON (RFC 8259); Python's json.loads takes them,
        and the dialect's body is written with json.dumps(allow_nan=True), so
        ``extra: {"x": NaN}`` reaches the upstream as the bare token NaN, which
        a strict parser (vLLM, OpenAI) rejects.  The sampling options already
        refuse NaN; extra should too (``json.loads(parse_constant=...)``).
        """
        for value in ("NaN", "Infinity", "-Infinity"):
            refusal('{"extra":{"mirostat_tau":' + value + "}}")

    def test_clientDoesNotSendNaN(self) -> None:
        """``cc50 infer --extra '{"a": NaN}'`` is sent as is (encodeOptions uses allow_nan=True)."""
        with self.assertRaises(OptionsError):
            generationOptions(extra={"a": math.nan})

    def test_duplicateKeysAreAmbiguous(self) -> None:
        """
        ``{"temperature":0.1,"temperature":99}``: Python keeps the last, other
        JSON parsers the first.  "No option is silently ignored" (protocol.md),
        yet one of the two is.  Refuse duplicates (object_pairs_hook).
        """
        self.assertIn("temperature", refusal('{"temperature":0.1,"temperature":99}'))

    # --- what held --------------------------------------------------------

    def test_numbersThatAreNotNumbers(self) -> None:
        for text, words in (
            ('{"temperature":NaN}', "must be a number"),
            ('{"temperature":Infinity}', "must be a number"),
            ('{"temperature":-Infinity}', "must be a number"),
            ('{"temperature":1e400}', "must be a number"),  # float('inf')
            ('{"temperature":true}', "must be a number"),
            ('{"top_k":true}', "must be an integer"),
            ('{"top_k":1.0}', "must be an integer"),
            ('{"seed":18446744073709551616}', "between"),
            ('{"seed":-9223372036854775809}', "between"),
            ('{"seed":' + "9" * 5000 + "}", "JSON"),  # past Python's 4300-digit limit: ValueError
            ('{"top_p":-0.0001}', "between"),
            ('{"stop":["a",1]}', "non-empty strings"),
            ('{"stop":' + json.dumps(["x"] * 17) + "}", "at most 16"),
            ('{"model":1}', "must be a string"),
            ('{"extra":null}', "JSON object"),
            ('{"Temperature":1}', "unknown option"),
            ("\ufeff{}", "JSON"),
            (b'{"model":"\xff"}', "UTF-8"),
            ("[]", "JSON object"),
            ("null", "JSON object"),
        ):
            self.assertIn(words, refusal(text), text[:40])

    def test_valuesAtTheEdgesAreAccepted(self) -> None:
        options = decodeOptions(block('{"temperature":-0.0,"top_p":1,"seed":18446744073709551615,"top_k":0}'))
        self.assertEqual((options.temperature, options.top_p, options.seed), (0.0, 1, (1 << 64) - 1))
        self.assertEqual(decodeOptions(block('{"seed":-9223372036854775808}')).seed, -(1 << 63))
        self.assertEqual(len(decodeOptions(block('{"stop":' + json.dumps(["x"] * 16) + "}")).stop), 16)

    def test_aBlockExactlyAtTheLimit(self) -> None:
        filler = MAX_OPTIONS_BYTES - len('{"system":""}')
        exact = '{"system":"' + "s" * filler + '"}'
        self.assertEqual(len(exact), MAX_OPTIONS_BYTES)
        self.assertEqual(len(decodeOptions(block(exact)).system or ""), filler)
        self.assertIn("at most", refusal('{"system":"' + "s" * (filler + 1) + '"}'))
        # and the client builds one exactly at the limit, refusing one byte more
        self.assertEqual(len(encodeOptions(GenerationOptions(system="s" * filler))), 4 + MAX_OPTIONS_BYTES)
        with self.assertRaises(OptionsError):
            encodeOptions(GenerationOptions(system="s" * (filler + 1)))

    def test_lengthPrefixLies(self) -> None:
        for data in (b"\x00\x00\x00", struct.pack("<I", 10) + b"{}", struct.pack("<I", 0xFFFFFFFF) + b"{}"):
            with self.assertRaises(OptionsError):
                decodeOptions(data)

    def test_modelWithOddCharactersIsRefusedByName(self) -> None:
        backend = routedBackend()
        backend.models = lambda: ["alpha"]  # type: ignore[attr-defined]
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        for reqId, model in enumerate(("", "alpha\x00", "ALPHA", "alpha ", "\u202ealpha", "a\nb"), 1):
            connection.send(encode_infer(reqId, "p", 1, 0, GenerationOptions(model=model)))
            [answer] = connection.received()
            self.assertEqual(error_code(answer), ErrorCode.BAD_REQUEST, repr(model))
            self.assertIn(b"unknown model", answer.payload)


class CompatibilityTests(SynchronousTestCase):
    def test_noOptionsIsTheCppFrameAndTheCppDone(self) -> None:
        frame = encode_infer(9, "Hi", 8, 0)
        self.assertEqual(frame[24:], INFER_PREFIX.pack(8, 0, 2) + b"Hi")
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(frame)
        backend.streams[9].finish()
        [done] = connection.received()
        self.assertEqual(len(done.payload), 32)  # 16 C++ + 16 cc50tw, no finish reason

    def test_aServerThatReadsOnlyPromptLenIgnoresTheBlock(self) -> None:
        """What a C++ server does: read prompt_len bytes, ignore the rest."""
        frame = encode_infer(9, "héllo", 8, 0, GenerationOptions(temperature=0, stop=("\n",), model="m"))
        payload = frame[24:]
        maxTokens, credit, promptLen = INFER_PREFIX.unpack_from(payload)
        self.assertEqual(payload[12 : 12 + promptLen].decode(), "héllo")
        self.assertEqual(struct.unpack_from("<I", frame, 20)[0], len(payload))

    def test_anEmptyOptionsBlockStillGetsTheFinishReason(self) -> None:
        """
        protocol.md: "The RESP_DONE of a request that carried an options block
        (so its client knows the field) has ... finish_reason".  A client that
        always sends a block (``{}``) gets the 32-byte form: stream.py decides
        by ``options.empty``, not by whether a block was carried.
        """
        backend = routedBackend()
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(inferWith(3, block("{}")))
        stream = backend.streams[3]
        stream.sink.unregisterProducer()
        stream.done.callback(GenerationResult(1, 1, "stop"))
        [done] = connection.received()
        self.assertEqual(decode_done(done).finish_reason, "stop")


class ExtraOverridesTests(SynchronousTestCase):
    """
    ``extra`` goes into the body last (dialects._withExtra), so it replaces
    anything the server set.  Nothing in protocol.md says so; the code's
    comment says "the client knows its upstream".  Some keys must not be the
    client's to set.
    """

    def request(self, **options: object) -> InferenceRequest:
        return InferenceRequest(1, "p", 4, GenerationOptions(**options))  # type: ignore[arg-type]

    def routed(self) -> OpenAICompletionsDialect:
        route = UpstreamRoute("http://h:1", "chat", "alpha", upstream_model="org/alpha-7b", api_key="k")
        dialect = route.makeDialect("x", False)
        assert isinstance(dialect, OpenAICompletionsDialect)
        return dialect

    def assertRefusedOrKept(self, body: dict[str, object] | None, key: str, expected: object) -> None:
        if body is not None:
            self.assertEqual(body[key], expected, f"extra overrode {key!r}")

    def bodyOrNone(self, dialect: object, **options: object) -> dict[str, object] | None:
        try:
            return dialect.requestBody(self.request(**options))  # type: ignore[attr-defined,no-any-return]
        except OptionsError:
            return None

    def test_extraCannotReplaceTheRoutedModel(self) -> None:
        """
        With ``[[upstreams]]`` the operator maps alpha -> org/alpha-7b and pays
        for that upstream's key; ``extra: {"model": "org/big-405b"}`` sends
        any model that provider has, on the operator's key, past routing.
        """
        body = self.bodyOrNone(self.routed(), model="alpha", extra={"model": "org/big-405b"})
        self.assertRefusedOrKept(body, "model", "org/alpha-7b")

    def test_extraCannotLiftMaxTokens(self) -> None:
        """
        ``--max-tokens-limit`` is checked on the frame's max_tokens only;
        ``extra: {"max_tokens": 1000000}`` (OpenAI) or ``{"n_predict": -1}``
        (llama) asks the upstream for unbounded generation.
        """
        body = self.bodyOrNone(self.routed(), extra={"max_tokens": 1_000_000})
        self.assertRefusedOrKept(body, "max_tokens", 4)
        body = self.bodyOrNone(CompletionDialect("u"), extra={"n_predict": -1})
        self.assertRefusedOrKept(body, "n_predict", 4)

    def test_extraCannotTurnStreamingOffOrReplaceThePrompt(self) -> None:
        """``stream: false`` breaks the SSE reader; ``prompt``/``messages`` replace the prompt sent in the frame."""
        for dialect, key, value in (
            (CompletionDialect("u"), "stream", True),
            (CompletionDialect("u"), "prompt", "p"),
            (self.routed(), "stream", True),
            (self.routed(), "stream_options", {"include_usage": True}),
        ):
            body = self.bodyOrNone(dialect, extra={key: {"stream": False, "prompt": "x"}.get(key, None)})
            self.assertRefusedOrKept(body, key, value)

    def test_extraStillReachesTheBodyForOrdinaryFields(self) -> None:
        body = CompletionDialect("u").requestBody(self.request(extra={"mirostat": 2, "nested": {"a": [1, {"b": None}]}}))
        self.assertEqual((body["mirostat"], body["nested"]), (2, {"a": [1, {"b": None}]}))


class HelloParsingTests(SynchronousTestCase):
    def test_parseHelloNeverRaises(self) -> None:
        """Its docstring says it never raises; a server's deeply nested JSON raises RecursionError."""
        try:
            capabilities = parseHello(b"odd/1\n" + b"[" * 100_000 + b"]" * 100_000)
        except RecursionError:
            self.fail("parseHello raised RecursionError")
        self.assertEqual(capabilities.options, ())

    def test_oddServers(self) -> None:
        for payload, expected in (
            (b"", ("", (), None)),
            (b"cpp-server", ("cpp-server", (), None)),
            (b"x\n", ("x", (), None)),
            (b"x\nnot json", ("x", (), None)),
            (b"x\n\xff\xfe", ("x", (), None)),
            (b"x\n[1,2]", ("x", (), None)),
            (b'x\n{"options":"model","models":[1]}', ("x", (), None)),
            (b'x\n{"options":["model",null],"models":[]}', ("x", (), ())),
            (b'x\n{"options":["model"],"models":["a"],"new":{"k":1}}', ("x", ("model",), ("a",))),
            (b'x\n{"options":["model"]}\ntrailing', ("x", (), None)),
            (b'x\n{"a":1e999,"options":["t"]}', ("x", ("t",), None)),
            (b"\xff\xfe\n{}", ("\ufffd\ufffd", (), None)),
            (b'x\n{"a":' + b"9" * 5000 + b"}", ("x", (), None)),
        ):
            capabilities = parseHello(payload)
            self.assertEqual((capabilities.name, capabilities.options, capabilities.models), expected, payload[:40])


class LogTests(SynchronousTestCase):
    def test_modelNameCannotForgeLogLines(self) -> None:
        """
        A backend that does not list its models (llama_server/openai without
        ``[[upstreams]]``) accepts any model name, and the request log line
        writes it raw (server.py ``model_text``): a newline forges a line.
        """
        backend = ManualBackend()
        backend.generationOptions = frozenset({"model"})  # type: ignore[attr-defined]
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        forged = "x\nrequest 99 from 10.0.0.1:1: done backend=manual tokens=1"
        with capturedLogs() as events:
            connection.send(encode_infer(1, "p", 1, 0, GenerationOptions(model=forged)))
            backend.streams[1].finish()
        lines = [formatEvent(event) for event in events if "request 1 from" in formatEvent(event)]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("\n", lines[0])


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.path = os.path.join(self.directory, "cc50.toml")

    def upstream(self, url: str = "http://127.0.0.1:8001", **fields: object) -> dict[str, object]:
        return {"url": url, "dialect": "openai", "model": "a", **fields}

    def refused(self, upstreams: object) -> str:
        try:
            parseUpstreams(upstreams, self.path)
        except ConfigError as e:
            return str(e)
        self.fail(f"accepted {upstreams!r}")

    def keyFile(self, name: str, content: bytes) -> str:
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(content)
        return name

    def test_badValuesAreRefusedByIndexAndKey(self) -> None:
        for fields, words in (
            ({"weight": 0}, "upstreams[0].weight"),
            ({"weight": -1}, "upstreams[0].weight"),
            ({"weight": math.inf}, "upstreams[0].weight"),
            ({"weight": math.nan}, "upstreams[0].weight"),
            ({"weight": True}, "upstreams[0].weight"),
            ({"weight": "2"}, "upstreams[0].weight"),
            ({"max_concurrency": 0}, "upstreams[0].max_concurrency"),
            ({"max_concurrency": 2.0}, "upstreams[0].max_concurrency"),
            ({"max_concurrency": True}, "upstreams[0].max_concurrency"),
            ({"model": ""}, "upstreams[0].model"),
            ({"model": "  "}, "upstreams[0].model"),
            ({"dialect": "vllm"}, "upstreams[0].dialect"),
            ({"upstream_model": ""}, "upstreams[0].upstream_model"),
            ({"typo": 1}, "unknown key 'typo'"),
            ({"api_key_file": "missing.key"}, "cannot read"),
            ({"api_key_file": self.keyFile("empty.key", b"\n\n")}, "is empty"),
            ({"api_key_file": self.keyFile("two.key", b"one\ntwo\n")}, "more than one line"),
            ({"api_key_file": self.keyFile("bin.key", b"\xffkey")}, "not ASCII"),
            ({"api_key_file": "."}, "cannot read"),
        ):
            self.assertIn(words, self.refused([self.upstream(**fields)]), fields)
        self.assertIn("non-empty list", self.refused([]))
        self.assertIn("non-empty list", self.refused({"url": "x"}))
        self.assertIn("must be a table", self.refused(["http://h:1"]))

    def test_keyFileRelativeToTheConfigAndTrimmed(self) -> None:
        name = self.keyFile("k.key", b"  secret-key\r\n")
        [route] = parseUpstreams([self.upstream(api_key_file=name)], self.path)
        self.assertEqual(route.api_key, "secret-key")
        self.assertNotIn("secret-key", repr(route))

    def test_duplicateURLsAreRefused(self) -> None:
        self.assertIn("list each upstream once", self.refused([self.upstream(), self.upstream("http://127.0.0.1:8001/")]))

    def test_duplicateURLsSpelledDifferently(self) -> None:
        """
        The duplicate check compares text after normalizeURL, which keeps the
        scheme's case and an explicit default port: the same upstream listed
        twice (for two models, say) gets twice the share and two health pollers.
        """
        for first, second in (
            ("http://h:8001", "HTTP://h:8001"),
            ("http://h:80", "http://h"),
            ("http://H:8001", "http://h:8001"),
        ):
            self.refused([self.upstream(first, model="a"), self.upstream(second, model="b")])

    def test_credentialsInTheURLAreRefused(self) -> None:
        """
        ``url = "http://user:secret@h:8001"`` is accepted; the Agent never
        sends them, yet the URL (secret included) is in the start-up log, every
        upstream log line and the ``url`` label of the cc50_upstream_* series.
        The way to send a key is ``api_key_file``: refuse userinfo (or strip it).
        """
        self.assertIn("url", self.refused([self.upstream("http://user:secret@h:8001")]))


class RouteHeaderTests(SynchronousTestCase):
    def test_eachUpstreamGetsOnlyItsOwnKey(self) -> None:
        base = {b"Authorization": [b"Bearer global"], b"authorization": [b"Bearer global2"], b"Accept": [b"x"]}
        keyed = UpstreamRoute("http://a:1", "openai", "a", api_key="key-a").headers(base)
        plain = UpstreamRoute("http://b:1", "openai", "b").headers(base)
        self.assertEqual(keyed[b"Authorization"], [b"Bearer key-a"])
        self.assertNotIn(b"authorization", keyed)
        self.assertFalse([name for name in plain if name.lower() == b"authorization"])
        self.assertEqual(plain[b"Accept"], [b"x"])
        self.assertNotIn("key-a", repr(UpstreamRoute("http://a:1", "openai", "a", api_key="key-a")))


class RoutingTests(SynchronousTestCase):
    def pool(self, *members: Upstream) -> tuple[UpstreamPool, Clock]:
        clock = Clock()
        return UpstreamPool(list(members), clock, backoff=2.0), clock

    def test_routingNeverLeavesTheModel(self) -> None:
        a, b = Upstream("http://a", model="alpha"), Upstream("http://b", model="beta")
        pool, _ = self.pool(a, b)
        pool.failed(a, "refused")
        self.assertIs(pool.choose(model="alpha"), a)  # panic mode, within the model
        self.assertIsNone(pool.choose(exclude=a, model="alpha"))  # no retry on beta
        self.assertIsNone(pool.choose(model="gamma"))

    def test_allAtTheirLimitIsAllBusy(self) -> None:
        a, b = Upstream("http://a", model="m", maxConcurrency=1), Upstream("http://b", model="m", maxConcurrency=2)
        pool, _ = self.pool(a, b)
        for _ in range(3):
            pool.acquire(pool.choose(model="m"))  # type: ignore[arg-type]
        with self.assertRaises(AllBusy) as caught:
            pool.choose(model="m")
        self.assertEqual(caught.exception.limit, 3)
        pool.release(b, "done")
        self.assertIs(pool.choose(model="m"), b)

    def test_weightsUnderLoad(self) -> None:
        a, b = Upstream("http://a", model="m", weight=3), Upstream("http://b", model="m", weight=1)
        pool, _ = self.pool(a, b)
        for _ in range(400):
            pool.acquire(pool.choose(model="m"))  # type: ignore[arg-type]
        self.assertEqual((a.outstanding, b.outstanding), (300, 100))

    def test_weightsIgnoredForSequentialTraffic(self) -> None:
        """
        operations.md: weight is "the upstream's share of its model's load".
        With one request at a time (each ends before the next), (0+1)/w
        always picks the heavier: weights 2 and 1 give 100% / 0%, and so do
        1.01 and 1.  A share should hold however busy the pool is (smooth
        weighted round-robin for ties of outstanding would do it).
        """
        a, b = Upstream("http://a", model="m", weight=2), Upstream("http://b", model="m", weight=1)
        pool, _ = self.pool(a, b)
        counts = {"http://a": 0, "http://b": 0}
        for _ in range(300):
            chosen = pool.choose(model="m")
            assert chosen is not None
            counts[chosen.url] += 1
            pool.acquire(chosen)
            pool.release(chosen, "done")
        self.assertGreater(counts["http://b"], 50, counts)

    def test_aFullUpstreamDoesNotSendWorkToADownOne(self) -> None:
        """
        a is up and at its max_concurrency, b (same model) is backing off.
        choose() drops a as full, finds no candidate up, and falls into panic
        mode: the request goes to b, known down, fails (UPSTREAM_UNAVAILABLE)
        and is not retried on a (full).  Panic mode is documented for "every
        upstream of a model is down"; here one is up, so the answer is
        OVERLOADED (AllBusy), which the client may retry.
        """
        a, b = Upstream("http://a", model="m", maxConcurrency=1), Upstream("http://b", model="m")
        pool, _ = self.pool(a, b)
        pool.acquire(a)
        pool.failed(b, "connection refused")
        with self.assertRaises(AllBusy):
            pool.choose(model="m")
