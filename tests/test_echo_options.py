"""
The example plugin's options, parsed and built as ``twistd cc50`` does
(issue 16, item 6): ``--echo-reverse`` defaulted to the string "no", which
``twisted.python.usage`` never passes through the coerce function, and a
non-empty string is true, so the echo backend always reversed.

No pip install and no server here (``tests/test_plugins_real.py`` does
those): ``cc50tw.tap.Options`` gets the echo backend's options as if plugin
discovery had found it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import pytest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.python import usage
from zope.interface import implementer

from cc50tw.backends import repeatableOptions
from cc50tw.interfaces import GenerationResult, InferenceRequest, ITokenSink
from cc50tw.tap import Options
from tests.helpers import REPO_ROOT


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "examples" / "echo-backend"))
    import cc50_echo.backend  # type: ignore[import-not-found]  # on sys.path only from here

    yield cc50_echo.backend


def parse(echo: ModuleType, *args: str) -> Options:
    """``twistd cc50 --backend=echo ARGS``'s options, with the echo plugin installed."""
    spec = echo.SPEC

    class WithEcho(Options):
        backends = {**Options.backends, spec.name: spec}
        optParameters = Options.optParameters + spec.options
        optFlags = Options.optFlags + spec.flags
        repeatable = repeatableOptions(optParameters)

    options = WithEcho()
    options.parseOptions(["--backend=echo", *args])
    return options


@implementer(ITokenSink)
class Sink:
    def __init__(self) -> None:
        self.written: list[str] = []

    def write(self, text: str) -> None:
        self.written.append(text)

    def writeSequence(self, texts: Sequence[str]) -> None:
        self.written.extend(texts)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def answer(echo: ModuleType, options: Any, prompt: str) -> str:
    clock = Clock()
    backend = echo.build(options, clock)
    sink = Sink()
    done = backend.generate(InferenceRequest(1, prompt, 10), sink)
    clock.advance(1)
    results: list[GenerationResult] = []
    done.addCallback(results.append)
    assert results == [GenerationResult(3, 3)]
    return "".join(sink.written)


def test_defaultIsInOrder(echo: ModuleType) -> None:
    options = parse(echo)
    assert options["echo-reverse"] is False
    assert "in order" in options.backend.describe()
    assert answer(echo, options, "one two three") == "one two three"


@pytest.mark.parametrize(
    ("given", "expected"), [("yes", "three two one"), ("no", "one two three"), ("YES", "three two one")]
)
def test_explicit(echo: ModuleType, given: str, expected: str) -> None:
    options = parse(echo, f"--echo-reverse={given}")
    assert answer(echo, options, "one two three") == expected


def test_badValueNamesTheOption(echo: ModuleType) -> None:
    with pytest.raises(usage.UsageError, match="--echo-reverse=maybe: must be yes or no"):
        parse(echo, "--echo-reverse=maybe")


def test_everyDefaultIsWhatBuildExpects(echo: ModuleType) -> None:
    """A default is handed to build as written: never a string where the coerce function returns something else."""
    for name, _short, default, _doc, coerce in echo.SPEC.options:
        if default is not None and isinstance(default, str):
            assert coerce(default) == default, name
