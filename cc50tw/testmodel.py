"""
A tiny random-weight llama model, generated locally, for running llama-server.

No model hub is reachable from where cc50tw is developed and tested, and a
real model is hundreds of megabytes anyway; what the llama-server backend's
tests need is only a llama-server that loads *a* model and streams tokens at
a known pace.  This module writes one with the ``gguf`` package (llama.cpp's
own Python writer): the llama architecture with random weights, and an
SPM-style vocabulary of our own with byte-fallback tokens, so any prompt
tokenizes.  Its output is gibberish, which is fine.

Pace is set by size: the ``small`` preset (n_embd 64, 2 layers) runs at
roughly 1,500 tokens/s on two cores, for fast end-to-end tests; ``large``
(n_embd 1024, 12 layers) runs at tens of tokens/s, which is what tests of
cancellation and backpressure need: a stream that is still going when the
test acts on it.

The end-of-sequence and other control tokens get all-zero output weights, so
random logits practically never pick them: a stream runs to ``n_predict``,
which keeps token counts in tests predictable.  The file is deterministic
for a given shape and seed, so tests can cache it by name.

``cc50 make-test-model OUTPUT`` runs ``main``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

#: Bumped when the generated file changes for the same shape and seed, so
#: caches keyed by ``ModelShape.fileName`` are refreshed.
GENERATOR_VERSION = 2

SPACE = "\u2581"  # SentencePiece's visible space, "▁"

_WORDS = (
    "the of and to in is it that for on with as was at by be this from or an are not but have had they "
    "you we his her she he which one all their there been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people token model stream server "
    "twisted credit window chunk request answer llama"
).split()

_CHARACTERS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"-()[]/&%+=*#@$"
    # Multi-byte characters of every UTF-8 length, so answers exercise the
    # code that must never split a character between two chunks.
    "éüßñçøåæ€£¥°±×÷→←∑√∞≈≠日本語中文字한국어ñΩπλ🙂🚀🎉"
)

_BIGRAMS = "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de hi"


@attrs.frozen
class ModelShape:
    """The hyperparameters that decide a test model's size and speed."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx: int = 8192
    seed: int = 50

    def __attrs_post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head size n_embd/n_head ({self.n_embd // self.n_head}) must be even for RoPE")

    @property
    def fileName(self) -> str:
        """A name that changes whenever the file's content would."""
        return (
            f"cc50-test-e{self.n_embd}-l{self.n_layer}-h{self.n_head}x{self.n_head_kv}-f{self.n_ff}"
            f"-c{self.n_ctx}-s{self.seed}-v{GENERATOR_VERSION}.gguf"
        )

    @property
    def parameters(self) -> int:
        head = self.n_embd // self.n_head
        kv = head * self.n_head_kv
        vocab = len(build_vocab()[0])
        layer = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * kv + 3 * self.n_embd * self.n_ff
        return 2 * vocab * self.n_embd + self.n_layer * layer


PRESETS: dict[str, ModelShape] = {
    "small": ModelShape(),
    "large": ModelShape(n_embd=1024, n_layer=12, n_head=16, n_head_kv=16, n_ff=2816, n_ctx=8192),
}

#: Token ids fixed by the vocabulary's layout.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_FIRST_BYTE_ID = 3  # <0x00>; the 256 byte tokens follow the three control tokens


def build_vocab() -> tuple[list[bytes], list[float], list[int]]:
    """
    The vocabulary: pieces, SentencePiece scores, and token types.

    Layout: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens ``<0x00>`` to
    ``<0xFF>`` (llama.cpp's byte fallback for anything else), then single
    characters, then common bigrams and words with a leading ``▁`` (and the
    prefixes that let the merge-based tokenizer reach them).  Longer pieces
    score higher, as SentencePiece's do.
    """
    from gguf import TokenType

    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode("ascii"))
        types.append(TokenType.BYTE)
        scores.append(0.0)
    pieces: list[str] = [SPACE]
    seen = {SPACE}

    def add(piece: str) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)

    for character in _CHARACTERS:
        add(character)
    for bigram in _BIGRAMS.split():
        add(bigram)
    for word in _WORDS:
        spaced = SPACE + word
        for end in range(2, len(spaced) + 1):
            add(spaced[:end])
    for index, piece in enumerate(pieces):
        tokens.append(piece.encode("utf-8"))
        types.append(TokenType.NORMAL)
        scores.append(-float(index) / len(pieces) + len(piece))
    return tokens, scores, types


def write_model(path: str | os.PathLike[str], shape: ModelShape) -> Path:
    """Write a random-weight llama GGUF of ``shape`` to ``path`` (atomically) and return the path."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    path = Path(path)
    tokens, scores, types = build_vocab()
    vocab = len(tokens)
    head = shape.n_embd // shape.n_head
    kv = head * shape.n_head_kv
    rng = np.random.default_rng(shape.seed)

    def matrix(rows: int, columns: int, std: float) -> Any:
        # numpy's shape is (rows, columns); GGML reads it as ne = [columns, rows].
        return (rng.standard_normal((rows, columns), dtype=np.float32) * std).astype(np.float16)

    def ones(size: int) -> Any:
        return np.ones(size, dtype=np.float32)

    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    writer = GGUFWriter(temporary, "llama")
    writer.add_name("cc50 random test model")
    writer.add_description(
        f"random weights for testing only (cc50tw.testmodel v{GENERATOR_VERSION}, seed {shape.seed}); output is gibberish"
    )
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)

    writer.add_tensor("token_embd.weight", matrix(vocab, shape.n_embd, 1.0))
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}."
        std = 0.02
        writer.add_tensor(prefix + "attn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(prefix + "attn_q.weight", matrix(shape.n_embd, shape.n_embd, std))
        writer.add_tensor(prefix + "attn_k.weight", matrix(kv, shape.n_embd, std))
        writer.add_tensor(prefix + "attn_v.weight", matrix(kv, shape.n_embd, std))
        writer.add_tensor(prefix + "attn_output.weight", matrix(shape.n_embd, shape.n_embd, std))
        writer.add_tensor(prefix + "ffn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(prefix + "ffn_gate.weight", matrix(shape.n_ff, shape.n_embd, std))
        writer.add_tensor(prefix + "ffn_up.weight", matrix(shape.n_ff, shape.n_embd, std))
        writer.add_tensor(prefix + "ffn_down.weight", matrix(shape.n_embd, shape.n_ff, std))
    writer.add_tensor("output_norm.weight", ones(shape.n_embd))
    # Logits with a spread of a few units, so sampling has favourites; the
    # control tokens' rows are zero, so their logit is 0 among hundreds of
    # random ones and top-k/min-p sampling never reaches them.
    output = matrix(vocab, shape.n_embd, 3.0 / np.sqrt(shape.n_embd))
    output[[UNK_ID, BOS_ID, EOS_ID]] = 0
    # Bytes 0x80-0xFF alone are never valid UTF-8; damped, they still turn up
    # (llama-server must cope) without turning every answer into U+FFFD.
    output[_FIRST_BYTE_ID + 0x80 : _FIRST_BYTE_ID + 0x100] *= 0.5
    writer.add_tensor("output.weight", output)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(temporary, path)
    return path


def ensure_model(directory: str | os.PathLike[str], shape: ModelShape) -> Path:
    """The model for ``shape`` in ``directory``, written first if it is not there yet."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shape.fileName
    if not path.exists():
        write_model(path, shape)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cc50 make-test-model",
        description=(
            "Write a tiny random-weight llama GGUF model (gibberish output) so llama-server and the "
            "llama_server backend can be tried without downloading anything."
        ),
    )
    parser.add_argument("output", help="file to write (e.g. test-model.gguf)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="small: n_embd 64, 2 layers (~1,500 tokens/s on 2 cores); large: n_embd 1024, 12 layers (~35 tokens/s)",
    )
    for name, help in (
        ("n-embd", "embedding size"),
        ("n-layer", "transformer blocks"),
        ("n-head", "attention heads"),
        ("n-head-kv", "key/value heads (grouped-query attention when fewer than --n-head)"),
        ("n-ff", "feed-forward size"),
        ("n-ctx", "training context length written into the model"),
        ("seed", "random seed for the weights"),
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help} (overrides the preset)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``cc50 make-test-model``: write a test model; return the exit status."""
    args = _parser().parse_args(argv)
    overrides = {
        field: getattr(args, field)
        for field in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx", "seed")
        if getattr(args, field) is not None
    }
    if "n_head" in overrides and "n_head_kv" not in overrides:
        overrides["n_head_kv"] = overrides["n_head"]  # plain multi-head attention unless asked
    try:
        shape = attrs.evolve(PRESETS[args.preset], **overrides)
    except ValueError as e:
        sys.stderr.write(f"cc50 make-test-model: {e}\n")
        return 2
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.stderr.write("cc50 make-test-model: needs the 'gguf' package (pip install gguf)\n")
        return 1
    path = write_model(args.output, shape)
    size = path.stat().st_size
    sys.stdout.write(
        f"wrote {path} ({size / 1e6:.1f} MB, {shape.parameters / 1e6:.1f}M parameters, "
        f"n_embd {shape.n_embd}, {shape.n_layer} layers, n_ctx {shape.n_ctx}, seed {shape.seed})\n"
        f"try: llama-server -m {path} --port 8080, then twistd -n cc50 --backend=llama_server\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
