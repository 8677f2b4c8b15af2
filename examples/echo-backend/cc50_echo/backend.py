"""
The echo backend: the prompt back, one word per chunk.

It is deliberately small but complete: each request is an ``IPushProducer``
that the server pauses (credit or a full socket), resumes and cancels, and
it reports token counts in a ``GenerationResult``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from zope.interface import implementer

from cc50tw.backends import BackendSpec
from cc50tw.interfaces import GenerationResult, IBackend, InferenceRequest, ITokenSink


@implementer(IPushProducer)
class EchoStream:
    def __init__(self, reactor: Any, words: list[str], delay: float, sink: ITokenSink) -> None:
        self._reactor = reactor
        self._words = words
        self._delay = delay
        self._sink = sink
        self._sent = 0
        self._paused = False
        self._next: IDelayedCall | None = None
        self.done: Deferred[GenerationResult] = Deferred(lambda _: self.stopProducing())

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._next is None and not self._paused and not self.done.called:
            self._next = self._reactor.callLater(self._delay, self._emit)

    def _emit(self) -> None:
        self._next = None
        if self._sent == len(self._words):
            self._sink.unregisterProducer()
            self.done.callback(GenerationResult(len(self._words), self._sent))
            return
        word = self._words[self._sent]
        self._sent += 1
        self._sink.write(word if self._sent == 1 else " " + word)
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._paused = True
        if self._next is not None:
            self._next.cancel()
            self._next = None


@implementer(IBackend)
class EchoBackend:
    name = "echo"

    def __init__(self, reactor: Any, reverse: bool, delay: float) -> None:
        self._reactor = reactor
        self._reverse = reverse
        self._delay = delay

    def describe(self) -> str:
        return f"echo backend ({'reversed' if self._reverse else 'in order'}, {self._delay:g}s per word)"

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        words = request.prompt.split()
        if self._reverse:
            words.reverse()
        stream = EchoStream(self._reactor, words[: request.max_tokens], self._delay, sink)
        stream.start()
        return stream.done

    def checkHealth(self) -> Deferred[bool]:
        return succeed(True)

    def startBackend(self) -> None:
        return None

    def stopBackend(self) -> None:
        return None


def _yes_no(value: str) -> bool:
    """Coerces --echo-reverse's value (only a value given on the command line: never the default)."""
    if value.lower() not in ("yes", "no"):
        raise ValueError(f"must be yes or no, not {value!r}")
    return value.lower() == "yes"


def _delay(value: str) -> float:
    seconds = float(value)
    if seconds < 0:
        raise ValueError("must be >= 0")
    return seconds


def build(options: Mapping[str, Any], reactor: Any) -> EchoBackend:
    return EchoBackend(reactor, options["echo-reverse"], options["echo-delay"])


SPEC = BackendSpec(
    name="echo",
    description="streams the prompt back, one word per chunk (example third-party plugin)",
    options=[
        # twisted.python.usage never passes a default through the coerce
        # function, so each default is written as the value build expects:
        # False, not "no" (a non-empty string, which is true).
        ["echo-reverse", None, False, "yes: send the words in reverse order", _yes_no],
        ["echo-delay", None, 0.0, "seconds between words", _delay],
    ],
    build=build,
)
