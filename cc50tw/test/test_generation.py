"""
Generation options: their wire form (the block after REQ_INFER's prompt,
RESP_DONE's finish reason, HELLO's capabilities), the server refusing what
its backend cannot honour, and each HTTP dialect's mapping of them.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.http.dialects import CompletionDialect, OpenAICompletionsDialect
from cc50tw.codec import (
    INFER_PREFIX,
    DoneStats,
    ErrorCode,
    Frame,
    MessageType,
    ProtocolError,
    decode_done,
    decode_infer,
    encode_done,
    encode_frame,
    encode_hello,
    encode_infer,
)
from cc50tw.generation import NO_OPTIONS, GenerationOptions, OptionsError, decodeOptions, encodeOptions
from cc50tw.interfaces import InferenceRequest
from cc50tw.test.fakes import Connection, ManualBackend, error_code, make_factory


def optionsBlock(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def infer(payload: bytes) -> Frame:
    return Frame(MessageType.REQ_INFER, 7, 0, payload)


class WireTests(SynchronousTestCase):
    def test_noOptionsIsTheCppClientsBytes(self) -> None:
        plain = encode_infer(7, "hi", 5, 100)
        self.assertEqual(encode_infer(7, "hi", 5, 100, NO_OPTIONS), plain)
        self.assertEqual(encode_infer(7, "hi", 5, 100, GenerationOptions()), plain)
        self.assertEqual(len(plain), 24 + 12 + 2)

    def test_roundTrip(self) -> None:
        options = GenerationOptions(
            model="m", temperature=0.0, top_p=0.9, top_k=40, min_p=0.05, seed=42, stop=("\n\n", "END"),
            repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, system="be brief", extra={"mirostat": 2},
        )
        frame = encode_infer(7, "héllo", 5, 100, options)
        decoded = decode_infer(Frame(MessageType.REQ_INFER, 7, 0, frame[24:]))
        self.assertEqual((decoded.prompt, decoded.max_tokens, decoded.credit_bytes), ("héllo", 5, 100))
        self.assertEqual(decoded.options, options)

    def test_theBlockIsALengthThenJSON(self) -> None:
        block = encodeOptions(GenerationOptions(temperature=0.5, stop=["x"]))
        self.assertEqual(block, b"\x20\x00\x00\x00" + b'{"temperature":0.5,"stop":["x"]}')
        self.assertEqual(json.loads(block[4:]), {"temperature": 0.5, "stop": ["x"]})

    def test_badBlocksAreBadRequests(self) -> None:
        prompt = INFER_PREFIX.pack(1, 0, 2) + b"hi"
        for block, words in (
            (b"\x01", "4-byte length"),
            (b"\x05\x00\x00\x00{}", "options_len is 5"),
            (b"\x02\x00\x00\x00[]", "JSON object"),
            (b"\x03\x00\x00\x00{x}", "JSON"),
            (optionsBlock(b'{"topk": 40}'), "unknown option 'topk'"),
            (optionsBlock(b'{"temperature":"0"}'), "must be a number"),
            (optionsBlock(b'{"top_p":1.5}'), "between 0 and 1"),
            (optionsBlock(b'{"stop":[""]}'), "non-empty strings"),
            (optionsBlock(b'{"stop":"x"}'), "list of non-empty strings"),
            (optionsBlock(b'{"extra":[1]}'), "JSON object"),
        ):
            with self.assertRaises(ProtocolError, msg=block) as caught:
                decode_infer(infer(prompt + block))
            self.assertEqual(caught.exception.code, ErrorCode.BAD_REQUEST)
            self.assertIn(words, caught.exception.message, block)

    def test_validationNamesTheOption(self) -> None:
        with self.assertRaises(OptionsError) as caught:
            GenerationOptions(seed=1.5)  # type: ignore[arg-type]
        self.assertIn("'seed'", str(caught.exception))
        with self.assertRaises(OptionsError):
            decodeOptions(b"\x0e\x00\x00\x00" + b'{"stop":["a"]}' + b"x")

    def test_theDocumentedExamples(self) -> None:
        """The hex of docs/protocol.md, "Generation options"."""
        request = encode_infer(9, "Hi", 8, 0, GenerationOptions(temperature=0, stop=["\n"]))
        self.assertEqual(
            request.hex(" "),
            "43 43 35 30 01 00 01 00 09 00 00 00 00 00 00 00 00 00 00 00 31 00 00 00 08 00 00 00 00 00 00 00 "
            "02 00 00 00 48 69 1f 00 00 00 7b 22 74 65 6d 70 65 72 61 74 75 72 65 22 3a 30 2c 22 73 74 6f 70 "
            "22 3a 5b 22 5c 6e 22 5d 7d",
        )
        done = encode_done(9, DoneStats(8, 1500, 2, 8, 700, "length"))
        self.assertEqual(
            done.hex(" "),
            "43 43 35 30 01 00 03 00 09 00 00 00 00 00 00 00 00 00 00 00 28 00 00 00 08 00 00 00 00 00 00 00 "
            "dc 05 00 00 00 00 00 00 02 00 00 00 08 00 00 00 bc 02 00 00 00 00 00 00 06 00 6c 65 6e 67 74 68",
        )

    def test_finishReasonFollowsTheCc50twFields(self) -> None:
        frame = encode_done(7, DoneStats(3, 10, 1, 3, 5, "stop"))
        payload = frame[24:]
        self.assertEqual(payload[32:], b"\x04\x00stop")
        self.assertEqual(decode_done(Frame(MessageType.RESP_DONE, 7, 0, payload)).finish_reason, "stop")
        # A reader of the 32-byte form (an older cc50tw client) sees the same fields.
        self.assertEqual(decode_done(Frame(MessageType.RESP_DONE, 7, 0, payload[:32]))[:5], (3, 10, 1, 3, 5))


class ServerTests(SynchronousTestCase):
    def test_optionsTheBackendCannotHonourAreRefused(self) -> None:
        backend = ManualBackend()
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 3, 0, GenerationOptions(temperature=0.1)))
        [refusal] = connection.received()
        self.assertEqual(error_code(refusal), ErrorCode.BAD_REQUEST)
        self.assertIn(b"'temperature'", refusal.payload)
        self.assertEqual(backend.streams, {})

    def test_unknownModelListsTheModelsServed(self) -> None:
        backend = ManualBackend()
        backend.generationOptions = frozenset({"model"})  # type: ignore[attr-defined]
        backend.models = lambda: ["alpha", "beta"]  # type: ignore[attr-defined]
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p", 3, 0, GenerationOptions(model="gamma")))
        [refusal] = connection.received()
        self.assertEqual(error_code(refusal), ErrorCode.BAD_REQUEST)
        self.assertIn(b"'alpha', 'beta'", refusal.payload)
        connection.send(encode_infer(2, "p", 3, 0, GenerationOptions(model="beta")))
        self.assertEqual(backend.streams[2].request.options.model, "beta")

    def test_doneCarriesTheFinishReasonOnlyForRequestsWithOptions(self) -> None:
        backend = ManualBackend()
        backend.generationOptions = frozenset({"model"})  # type: ignore[attr-defined]
        factory, _ = make_factory(backend)
        connection = Connection(factory)
        connection.send(encode_infer(1, "p") + encode_infer(2, "p", 3, 0, GenerationOptions(model="x")))
        for reqId in (1, 2):
            stream = backend.streams[reqId]
            stream.sink.unregisterProducer()
            stream.done.callback(__import__("cc50tw.interfaces").interfaces.GenerationResult(1, 1, "stop"))
        done1, done2 = connection.received()
        self.assertEqual(len(done1.payload), 32)
        self.assertEqual(decode_done(done2).finish_reason, "stop")

    def test_helloAdvertisesOptionsAndModels(self) -> None:
        from cc50tw.backends.lcg import CPUEngine
        from cc50tw.backends.toy import ToyBackend

        factory, clock = make_factory(ManualBackend())
        factory.backend = ToyBackend(clock, CPUEngine(clock, None), 0)  # type: ignore[arg-type]
        from cc50tw.server import helloReply

        factory.helloReply = helloReply(factory.backend)
        connection = Connection(factory)
        connection.send(encode_hello())
        [hello] = connection.received()
        name, capabilities = hello.payload.split(b"\n", 1)
        self.assertTrue(name.startswith(b"cc50tw/"))
        self.assertEqual(json.loads(capabilities), {"options": ["model"], "models": ["toy"]})

    def test_trailingBytesWithoutAValidBlockAreStillRefused(self) -> None:
        factory, _ = make_factory(ManualBackend())
        connection = Connection(factory)
        connection.send(encode_frame(MessageType.REQ_INFER, 1, INFER_PREFIX.pack(1, 0, 1) + b"px"))
        [refusal] = connection.received()
        self.assertEqual(error_code(refusal), ErrorCode.BAD_REQUEST)


class DialectTests(SynchronousTestCase):
    def request(self, **options: object) -> InferenceRequest:
        return InferenceRequest(1, "p", 4, GenerationOptions(**options))  # type: ignore[arg-type]

    def test_completionTakesLlamaSamplingNames(self) -> None:
        body = CompletionDialect("u").requestBody(
            self.request(temperature=0, top_k=1, seed=5, stop=["\n"], repeat_penalty=1.2, extra={"mirostat": 2})
        )
        self.assertEqual(
            {k: body[k] for k in ("temperature", "top_k", "seed", "stop", "repeat_penalty", "mirostat")},
            {"temperature": 0, "top_k": 1, "seed": 5, "stop": ["\n"], "repeat_penalty": 1.2, "mirostat": 2},
        )

    def test_systemNeedsChat(self) -> None:
        with self.assertRaises(OptionsError):
            CompletionDialect("u").requestBody(self.request(system="s"))
        with self.assertRaises(OptionsError):
            OpenAICompletionsDialect("u").requestBody(self.request(system="s"))
        body = OpenAICompletionsDialect("u", chat=True).requestBody(self.request(system="s"))
        self.assertEqual(body["messages"], [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}])

    def test_strictOpenAIRefusesLlamaOnlyOptions(self) -> None:
        strict = OpenAICompletionsDialect("u", llamaExtensions=False, model="m")
        for name, value in (("top_k", 5), ("min_p", 0.1), ("repeat_penalty", 1.1)):
            with self.assertRaises(OptionsError) as caught:
                strict.requestBody(self.request(**{name: value}))
            self.assertIn(repr(name), str(caught.exception))
        body = strict.requestBody(self.request(temperature=0.3, model="other", extra={"top_k": 5}))
        self.assertEqual((body["temperature"], body["model"], body["top_k"]), (0.3, "other", 5))
