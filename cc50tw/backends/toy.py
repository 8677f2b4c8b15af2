"""
The toy backend: a deterministic workload standing in for a model.

For each of ``max_tokens`` tokens it runs one unit of work on an engine (the
CPU fallback here, the CUDA kernel where PyCUDA and a GPU exist) and then
emits ``" token"``, as the C++ original does.  It exists to test and measure
the data plane, so every stream is a well-behaved ``IPushProducer``: pausing
stops new work between tokens, and cancelling stops it for good.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer, implementer_only

from cc50tw.backends import BackendSpec
from cc50tw.backends.batching import DEFAULT_SLOTS, DecodeReceiver, DecodeTicket
from cc50tw.codec import new_tuple
from cc50tw.errors import BackendError
from cc50tw.interfaces import (
    GenerationResult,
    IBackend,
    IImmediateBackend,
    ImmediateAnswer,
    InferenceRequest,
    ITokenSink,
)

TOKEN_TEXT = " token"
TOKEN_BYTES = len(TOKEN_TEXT.encode())

#: Tokens emitted per reactor turn when the work completes synchronously
#: (``--toy-iters 0`` on the CPU): enough to amortise the turn, small enough
#: that other connections get a turn soon.
BATCH_TOKENS = 64

#: Tokens emitted per reactor turn when the work costs nothing: large enough
#: that the turn's fixed cost (a poll, a send) is spread thin, small enough
#: (about 15 KB) to keep turns short for other connections.
SYNCHRONOUS_BATCH_TOKENS = 512

#: A stream's first batch: small, so that when many streams share a
#: connection each one's first token goes out in the first round rather than
#: after every other stream's full batch.  Batches then double up to the cap.
FIRST_BATCH_TOKENS = 16

log = Logger()


class ToyEngine(Protocol):
    """The seam between the toy's token loop and where its work runs."""

    description: str

    @property
    def launches(self) -> int:
        """Units of work started (kernel launches on a GPU)."""

    def spin(self, iters: int, seed: int = 0) -> Deferred[int]:
        """Run one token's work from ``seed`` (the last token's value); fire with thread 0's final LCG value."""

    def spinNow(self, iters: int, tokens: int = 1) -> int | None:
        """
        The last of ``tokens`` tokens' values at once, if this engine can
        compute them without blocking the reactor (the CPU engine at zero
        iterations); else None, having run nothing, and ``spin``.
        """


@runtime_checkable
class BatchingEngine(Protocol):
    """
    An engine that runs whole requests as members of its decode steps
    (``cc50tw.backends.batching``) rather than one ``spin`` per token.
    """

    description: str

    @property
    def launches(self) -> int:
        """Decode steps launched (one kernel launch each, whatever the requests in it)."""

    def admit(self, iters: int, tokens: int, receiver: DecodeReceiver) -> DecodeTicket:
        """Add a request of ``tokens`` tokens; its values go to ``receiver``."""


@implementer(IPushProducer)
class ToyStream:
    """One request's token loop: a push producer over an engine."""

    def __init__(self, backend: ToyBackend, engine: ToyEngine, request: InferenceRequest, sink: ITokenSink) -> None:
        self._backend = backend
        self._engine = engine
        self._sink = sink
        self._remaining = request.max_tokens
        self._batch = FIRST_BATCH_TOKENS
        self._tokens = 0
        self._paused = False
        self._stopped = False
        self._running = False
        self._work: Deferred[int] | None = None
        self._scheduled: IDelayedCall | None = None
        self.last_value: int | None = None
        self.prompt_tokens = len(request.prompt.split())
        self.done: Deferred[GenerationResult] = Deferred(lambda _: self.stopProducing())

    def start(self) -> None:
        self._sink.registerProducer(self, True)
        if self._remaining <= 0:
            self._finish()
        else:
            self._run()

    def _canRun(self) -> bool:
        return not (self._paused or self._stopped or self._work is not None) and self._remaining > 0

    def _run(self) -> None:
        """Launch work for as many tokens as finish synchronously, up to a batch."""
        self._scheduled = None
        if self._canRun() and self._engine.spinNow(self._backend.iters) is not None:
            self._runSynchronously()
            return
        self._running = True
        try:
            for _ in range(BATCH_TOKENS):
                if not self._canRun():
                    return
                work = self._engine.spin(self._backend.iters, self.last_value or 0)
                self._work = work
                work.addCallbacks(self._workDone, self._workFailed)
                if self._work is not None:
                    return  # finishes later; _workDone picks up from there
        finally:
            self._running = False
        if self._canRun():
            self._scheduled = self._backend.reactor.callLater(0, self._run)

    def _runSynchronously(self) -> None:
        """
        Zero-cost work: emit a batch of tokens in one ``writeSequence`` per
        reactor turn, then yield the reactor to other connections.
        """
        engine, iters = self._engine, self._backend.iters
        count = min(self._remaining, self._batch)
        self._batch = min(self._batch * 2, SYNCHRONOUS_BATCH_TOKENS)
        self.last_value = engine.spinNow(iters, count)
        self._remaining -= count
        self._tokens += count
        self._backend.tokens_emitted += count
        self._sink.writeSequence([TOKEN_TEXT] * count)
        if self._remaining == 0:
            self._finish()
        elif self._canRun():
            self._scheduled = self._backend.reactor.callLater(0, self._run)

    def _workDone(self, value: int) -> None:
        self._work = None
        if self._stopped:
            return
        self.last_value = value
        self._remaining -= 1
        self._tokens += 1
        self._backend.tokens_emitted += 1
        self._sink.write(TOKEN_TEXT)
        if self._remaining == 0:
            self._finish()
        elif not self._running:
            self._run()

    def _workFailed(self, failure: Failure) -> None:
        self._work = None
        if self._stopped:
            return
        self._stopped = True
        self._sink.unregisterProducer()
        self.done.errback(BackendError(f"toy engine failed: {failure.getErrorMessage()}"))

    def _finish(self) -> None:
        self._stopped = True
        self._sink.unregisterProducer()
        self.done.callback(GenerationResult(self.prompt_tokens, self._tokens, "length"))

    def pauseProducing(self) -> None:
        self._paused = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._scheduled is None and not self._running:
            self._scheduled = self._backend.reactor.callLater(0, self._run)

    def stopProducing(self) -> None:
        self._stopped = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None


@implementer(IPushProducer)
class BatchedToyStream:
    """
    One request as a member of a batching engine's decode steps (the CUDA
    engine): the engine runs the token loop, this passes credit to it.

    Pausing takes the request out of the steps to come; tokens of steps
    already enqueued still arrive, and wait here until the client has credit
    again, so a paused sink gets nothing more.  Stopping takes the request
    out for good.
    """

    def __init__(self, backend: ToyBackend, engine: BatchingEngine, request: InferenceRequest, sink: ITokenSink) -> None:
        self._backend = backend
        self._engine = engine
        self._sink = sink
        self._maxTokens = request.max_tokens
        self._tokens = 0
        self._paused = False
        self._stopped = False
        #: Tokens that arrived while paused, written on resume.
        self._held = 0
        self._flushing: IDelayedCall | None = None
        self._ticket: DecodeTicket | None = None
        self.last_value: int | None = None
        self.prompt_tokens = len(request.prompt.split())
        self.done: Deferred[GenerationResult] = Deferred(lambda _: self.stopProducing())

    def start(self) -> None:
        # The sink may pause or stop this producer from inside registerProducer
        # (its connection is already blocked): both are honoured once admitted.
        self._sink.registerProducer(self, True)
        if self._maxTokens <= 0:
            self._finish()
        elif not self._stopped:
            self._ticket = self._engine.admit(self._backend.iters, self._maxTokens, self)
            if self._paused:
                self._ticket.pause()

    def tokensReady(self, values: list[int]) -> None:
        if self._stopped:
            return
        self.last_value = values[-1]
        if self._paused or self._held:
            self._held += len(values)
        else:
            self._emit(len(values))

    def _emit(self, count: int) -> None:
        self._tokens += count
        self._backend.tokens_emitted += count
        try:
            if count == 1:
                self._sink.write(TOKEN_TEXT)
            else:
                self._sink.writeSequence([TOKEN_TEXT] * count)
        except Exception as e:
            if not self._stopped:
                self.stopProducing()
                self.done.errback(BackendError(f"the sink refused the toy's tokens: {e}"))
            return
        if self._tokens >= self._maxTokens and not self._stopped:
            self._finish()

    def decodeFailed(self, reason: str) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._sink.unregisterProducer()
        self.done.errback(BackendError(f"toy engine failed: {reason}"))

    def _finish(self) -> None:
        self._stopped = True
        self._sink.unregisterProducer()
        self.done.callback(GenerationResult(self.prompt_tokens, self._tokens, "length"))

    def pauseProducing(self) -> None:
        if self._stopped or self._paused:
            return
        self._paused = True
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if self._ticket is not None:
            self._ticket.pause()

    def resumeProducing(self) -> None:
        if self._stopped or not self._paused:
            return
        self._paused = False
        if self._ticket is not None:
            self._ticket.resume()
        if self._held and self._flushing is None:
            # On a later turn: the sink is in the middle of granting credit.
            self._flushing = self._backend.reactor.callLater(0, self._flushHeld)

    def _flushHeld(self) -> None:
        self._flushing = None
        if self._stopped or self._paused or not self._held:
            return
        count, self._held = self._held, 0
        self._emit(count)

    def stopProducing(self) -> None:
        self._stopped = True
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if self._ticket is not None:
            self._ticket.cancel()


@implementer(IBackend, IImmediateBackend)
class ToyBackend:
    name = "toy"
    #: Its answer is fixed: the only option it honours is its own model name.
    generationOptions = frozenset({"model"})

    def __init__(self, reactor: IReactorTime, engine: ToyEngine | BatchingEngine, iters: int) -> None:
        self.reactor = reactor
        self.engine = engine
        self.iters = iters
        # Asked once: an isinstance check against a runtime-checkable
        # Protocol costs microseconds, and generate() is the per-request path.
        self._batching: BatchingEngine | None = None
        self._perToken: ToyEngine | None = None
        if isinstance(engine, BatchingEngine):
            self._batching = engine
        else:
            self._perToken = engine
        #: Tokens whose work completed; tests watch it stop growing on cancel.
        self.tokens_emitted = 0

    def describe(self) -> str:
        return f"toy backend, {self.iters} LCG iterations per token on {self.engine.description}"

    def models(self) -> list[str]:
        return ["toy"]

    def generate(self, request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:
        stream: ToyStream | BatchedToyStream
        if self._batching is not None:
            stream = BatchedToyStream(self, self._batching, request, sink)
        else:
            assert self._perToken is not None
            stream = ToyStream(self, self._perToken, request, sink)
        stream.start()
        return stream.done

    def answerNow(self, request: InferenceRequest, budget: int) -> ImmediateAnswer | None:
        """
        The whole answer, when its work costs nothing (the CPU engine at zero
        iterations) and it is no longer than one synchronous batch: what a
        ``ToyStream`` would write in its first reactor turns anyway, without
        the stream.
        """
        engine = self._perToken
        count = request.max_tokens
        if engine is None or count > SYNCHRONOUS_BATCH_TOKENS or count * TOKEN_BYTES > budget:
            return None
        if engine.spinNow(self.iters, count) is None:
            return None  # the engine has work to do after all: stream it
        self.tokens_emitted += count
        # Built as the bare tuples they are: a NamedTuple's generated __new__ is a Python call.
        result = new_tuple(GenerationResult, (len(request.prompt.split()), count, "length"))
        return new_tuple(ImmediateAnswer, ([TOKEN_TEXT] * count, result))  # type: ignore[no-any-return]

    def checkHealth(self) -> Deferred[bool]:
        # A CUDA engine whose device failed refuses every request until a restart.
        return succeed(getattr(self.engine, "brokenReason", None) is None)

    def startBackend(self) -> Any:
        # The CUDA engine starts its worker (and so the driver) here rather
        # than in build(): twistd daemonises in between, and CUDA does not
        # survive fork().
        start = getattr(self.engine, "start", None)
        return start() if start is not None else None

    def stopBackend(self) -> Any:
        stop = getattr(self.engine, "stop", None)
        return stop() if stop is not None else None


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be >= 0, got {number}")
    return number


TOY_DEVICES = ("auto", "cuda", "cpu")


def _device(value: str) -> str:
    device = value.strip().lower()
    if device not in TOY_DEVICES:
        raise ValueError(f"must be one of {', '.join(TOY_DEVICES)}, got {value!r}")
    return device


def _count_up_to(limit: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not 1 <= number <= limit:
            raise ValueError(f"must be between 1 and {limit}, got {number}")
        return number

    return parse


def build(options: Mapping[str, Any], reactor: Any) -> ToyBackend:
    # Imported here so that listing backends does not import the CUDA code.
    from cc50tw.backends.cuda import DEFAULT_BLOCK, DEFAULT_GRID, select_engine

    device = options.get("toy-device", "auto")
    if device == "auto" and options["toy-iters"] == 0:
        # No work to offload: the CUDA engine would run a decode step per token,
        # a thread hop each way, and a transport benchmark would measure that.
        device = "cpu"
        log.info("toy backend: --toy-iters=0 leaves no work for a GPU, so --toy-device=auto uses the CPU")
    engine = select_engine(
        device,
        reactor,
        options.get("toy-grid", DEFAULT_GRID),
        options.get("toy-block", DEFAULT_BLOCK),
    )
    iters = options["toy-iters"]
    if options.get("toy-streamed") or iters != 0 or isinstance(engine, BatchingEngine):
        # Only zero-cost work on the CPU is ever answered at once: the server
        # need not ask (a slot taken and given back per request) otherwise.
        return StreamedToyBackend(reactor, engine, iters)
    return ToyBackend(reactor, engine, iters)


@implementer_only(IBackend)
class StreamedToyBackend(ToyBackend):
    """
    The toy without answers at once: every request streams, as it would from
    a backend that only has ``generate``.  ``--toy-streamed`` asks for it at
    ``--toy-iters=0`` (to measure the streaming path); with work per token,
    or on the GPU, the toy never has an answer ready anyway.
    """


SPEC = BackendSpec(
    name="toy",
    description="deterministic synthetic work per token (the C++ CC50 toy); emits ' token'",
    options=[
        ["toy-iters", None, 20000, "LCG iterations per token (0 = no work, for transport benchmarks)", _positive_int],
        [
            "toy-device",
            None,
            "auto",
            "Where the work runs: auto (CUDA when PyCUDA and a GPU are there and --toy-iters is not 0, "
            "else CPU), cuda, or cpu.",
            _device,
        ],
        [
            "toy-grid",
            None,
            8,
            "CUDA blocks per request in each decode step.",
            # A step's grid is this times the requests in it, and must stay a valid grid size.
            _count_up_to((2**31 - 1) // DEFAULT_SLOTS),
        ],
        ["toy-block", None, 256, "CUDA threads per block (at most 1024).", _count_up_to(1024)],
    ],
    flags=[
        [
            "toy-streamed",
            None,
            "Stream every answer, never answer at once (at --toy-iters=0 the toy answers up to 512 tokens "
            "in one write): to measure the streaming path.",
        ],
    ],
    build=build,
)
