"""
Tests for the random test-model generator.

Whether llama-server accepts the file is tested where a llama-server runs
(``tests/test_llama_server_real.py``); here the file is read back with the
``gguf`` package's own reader to check what llama.cpp will find in it.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from cc50tw import testmodel
from cc50tw.test.optional import GGUF, NUMPY
from cc50tw.testmodel import BOS_ID, EOS_ID, PRESETS, SPACE, UNK_ID, ModelShape, build_vocab, ensure_model, write_model

if GGUF.available and NUMPY.available:
    import gguf
    import numpy as np


def requireGGUF() -> None:
    """
    Skip, naming the ``test`` extra that installs gguf and numpy, when they
    are missing; under CI (``CI=true``) fail instead, where a skip would hide
    that these tests stopped running (cc50tw.test.optional says why).
    """
    GGUF.require()
    NUMPY.require()


TINY = ModelShape(n_embd=16, n_layer=2, n_head=2, n_head_kv=1, n_ff=32, n_ctx=256, seed=7)


class VocabularyTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireGGUF()
        self.tokens, self.scores, self.types = build_vocab()

    def test_specialTokens(self) -> None:
        self.assertEqual(
            [self.tokens[i] for i in (UNK_ID, BOS_ID, EOS_ID)],
            [b"<unk>", b"<s>", b"</s>"],
        )
        self.assertEqual(self.types[UNK_ID], gguf.TokenType.UNKNOWN)
        self.assertEqual(self.types[BOS_ID], gguf.TokenType.CONTROL)

    def test_byteFallbackCoversEveryByte(self) -> None:
        byteTokens = [t for t, kind in zip(self.tokens, self.types, strict=True) if kind == gguf.TokenType.BYTE]
        self.assertEqual(byteTokens, [f"<0x{b:02X}>".encode() for b in range(256)])

    def test_piecesAreUniqueAndReachable(self) -> None:
        """Every word's prefixes are pieces too, so SPM merges can build it."""
        self.assertEqual(len(set(self.tokens)), len(self.tokens))
        pieces = {t.decode() for t, kind in zip(self.tokens, self.types, strict=True) if kind == gguf.TokenType.NORMAL}
        self.assertIn(SPACE + "the", pieces)
        for piece in pieces:
            if piece.startswith(SPACE) and len(piece) > 2:
                self.assertIn(piece[:-1], pieces)

    def test_multiByteCharacters(self) -> None:
        lengths = {
            len(t)
            for t, kind in zip(self.tokens, self.types, strict=True)
            if kind == gguf.TokenType.NORMAL and len(t.decode()) == 1
        }
        self.assertTrue({1, 2, 3, 4} <= lengths, lengths)

    def test_lengthsAndScoresMatch(self) -> None:
        self.assertEqual(len(self.tokens), len(self.scores))
        self.assertEqual(len(self.tokens), len(self.types))


class ModelFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireGGUF()
        self.directory = Path(self.mktemp())
        self.directory.mkdir()

    def read(self, path: Path) -> gguf.GGUFReader:
        return gguf.GGUFReader(path)

    def test_llamaArchitectureAndHyperparameters(self) -> None:
        reader = self.read(write_model(self.directory / "m.gguf", TINY))

        def value(key: str) -> object:
            field = reader.get_field(key)
            assert field is not None, key
            return field.contents()

        self.assertEqual(value("general.architecture"), "llama")
        self.assertEqual(value("llama.embedding_length"), 16)
        self.assertEqual(value("llama.block_count"), 2)
        self.assertEqual(value("llama.attention.head_count"), 2)
        self.assertEqual(value("llama.attention.head_count_kv"), 1)
        self.assertEqual(value("llama.feed_forward_length"), 32)
        self.assertEqual(value("llama.context_length"), 256)
        self.assertEqual(value("llama.rope.dimension_count"), 8)
        self.assertEqual(value("tokenizer.ggml.model"), "llama")
        self.assertEqual(value("tokenizer.ggml.eos_token_id"), EOS_ID)
        self.assertEqual(len(value("tokenizer.ggml.tokens")), len(build_vocab()[0]))  # type: ignore[arg-type]

    def test_tensors(self) -> None:
        reader = self.read(write_model(self.directory / "m.gguf", TINY))
        tensors = {t.name: t for t in reader.tensors}
        vocab = len(build_vocab()[0])
        expected = {"token_embd.weight": (16, vocab), "output.weight": (16, vocab), "output_norm.weight": (16,)}
        for layer in range(2):
            p = f"blk.{layer}."
            expected |= {
                p + "attn_norm.weight": (16,),
                p + "attn_q.weight": (16, 16),
                p + "attn_k.weight": (16, 8),
                p + "attn_v.weight": (16, 8),
                p + "attn_output.weight": (16, 16),
                p + "ffn_norm.weight": (16,),
                p + "ffn_gate.weight": (16, 32),
                p + "ffn_up.weight": (16, 32),
                p + "ffn_down.weight": (32, 16),
            }
        self.assertEqual({name: tuple(int(d) for d in t.shape) for name, t in tensors.items()}, expected)
        for name, tensor in tensors.items():
            wanted = gguf.GGMLQuantizationType.F32 if name.endswith("norm.weight") else gguf.GGMLQuantizationType.F16
            self.assertEqual(tensor.tensor_type, wanted, name)

    def test_controlTokensAreNeverLikely(self) -> None:
        """Their output rows are zero, so end-of-sequence never cuts a test's stream short."""
        reader = self.read(write_model(self.directory / "m.gguf", TINY))
        output = next(t for t in reader.tensors if t.name == "output.weight").data
        for token in (UNK_ID, BOS_ID, EOS_ID):
            self.assertTrue(np.all(output[token] == 0), token)
        self.assertGreater(float(np.abs(output[BOS_ID + 100]).sum()), 0.0)

    def test_deterministicPerSeed(self) -> None:
        a = write_model(self.directory / "a.gguf", TINY).read_bytes()
        b = write_model(self.directory / "b.gguf", TINY).read_bytes()
        c = write_model(self.directory / "c.gguf", attrs.evolve(TINY, seed=8)).read_bytes()
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_ensureModelCachesByShape(self) -> None:
        first = ensure_model(self.directory, TINY)
        mtime = first.stat().st_mtime_ns
        self.assertEqual(ensure_model(self.directory, TINY), first)
        self.assertEqual(first.stat().st_mtime_ns, mtime)
        other = ensure_model(self.directory, attrs.evolve(TINY, n_layer=1))
        self.assertNotEqual(other, first)
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), sorted([first.name, other.name]))


class ShapeTests(SynchronousTestCase):
    def test_invalidShapes(self) -> None:
        for bad in (
            {"n_embd": 10, "n_head": 4},
            {"n_head": 4, "n_head_kv": 3},
            {"n_embd": 0},
            {"n_embd": 6, "n_head": 2},
        ):
            with self.assertRaises(ValueError, msg=str(bad)):
                ModelShape(**bad)

    def test_presets(self) -> None:
        requireGGUF()
        self.assertEqual((PRESETS["small"].n_embd, PRESETS["small"].n_layer), (64, 2))
        self.assertGreater(PRESETS["large"].parameters, 100 * PRESETS["small"].parameters)


class MainTests(SynchronousTestCase):
    def runMain(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = testmodel.main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def test_writesTheModel(self) -> None:
        requireGGUF()
        path = Path(self.mktemp())
        status, out, _ = self.runMain(str(path), "--n-embd=32", "--n-head=2", "--n-layer=1", "--seed=3")
        self.assertEqual(status, 0)
        self.assertIn("n_embd 32", out)
        reader = gguf.GGUFReader(path)
        field = reader.get_field("llama.embedding_length")
        assert field is not None
        self.assertEqual(field.contents(), 32)

    def test_badShapeIsAUsageError(self) -> None:
        path = Path(self.mktemp())
        status, _, err = self.runMain(str(path), "--n-embd=30", "--n-head=4")
        self.assertEqual(status, 2)
        self.assertIn("multiple of n_head", err)
        self.assertFalse(path.exists())
