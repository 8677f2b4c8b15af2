"""
Tests for the continuous-batching scheduler, on a fake device that computes
what ``step_kernel`` computes, in Python, on any machine.

The scheduler's loop runs on a real worker thread, as in the server; its
hand-overs to the reactor go through ``CallQueue``, which the test pumps, so
each test decides when the reactor side runs and can hold it back.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from cc50tw.backends.batching import COALESCE_STEPS, FRESH, DecodeScheduler, DecodeTicket
from cc50tw.backends.lcg import spin_chain, spin_lane
from cc50tw.backends.toy import TOKEN_TEXT, BatchedToyStream, ToyBackend
from cc50tw.errors import BackendError
from cc50tw.interfaces import InferenceRequest
from cc50tw.test.fakes import RecordingSink

reactor: Any = globalReactor

TIMEOUT = 10.0


class FakeStepDevice:
    """
    A ``StepDevice`` in Python: ``launchStep`` computes the step as the
    kernel would (lane 0 of each entry, from its slot's state or, for a
    ``FRESH`` entry, from its seed),
    and the step completes once ``release`` lets it (at once by default).
    """

    def __init__(self, depth: int = 4, slots: int = 8, held: bool = False) -> None:
        self.depth = depth
        self.slots = slots
        self.state = [0] * slots
        self.results: list[list[int]] = [[] for _ in range(depth)]
        self.steps: list[tuple[int, list[int]]] = []  # (iters, entries) of each launch
        self.failAt: int | None = None
        self._completed = threading.Semaphore(0)
        self._done = [True] * depth
        self._held = held
        self._lock = threading.Lock()
        self._pendingRings: list[int] = []

    def launchStep(self, ring: int, iters: int, entries: Sequence[int], seeds: Sequence[int] | None = None) -> None:
        if self.failAt is not None and len(self.steps) >= self.failAt:
            raise RuntimeError("the device fell over")
        assert self._done[ring], "a ring buffer was reused before its step was collected"
        values = []
        for n, entry in enumerate(entries):
            slot = entry & ~FRESH
            start = (seeds[n] if seeds is not None else 0) if entry & FRESH else self.state[slot]
            self.state[slot] = spin_lane(iters, 0, start)
            values.append(self.state[slot])
        self.results[ring] = values
        self.steps.append((iters, list(entries)))
        with self._lock:
            self._done[ring] = not self._held
            if self._held:
                self._pendingRings.append(ring)

    def release(self, steps: int = 1) -> None:
        """Complete the oldest ``steps`` held steps."""
        with self._lock:
            for _ in range(steps):
                if self._pendingRings:
                    self._done[self._pendingRings.pop(0)] = True
                    self._completed.release()

    def unhold(self) -> None:
        self._held = False
        self.release(self.depth)

    def stepDone(self, ring: int) -> bool:
        with self._lock:
            return self._done[ring]

    def waitStep(self, ring: int) -> None:
        while not self.stepDone(ring):
            self._completed.acquire(timeout=0.01)

    def stepResults(self, ring: int, count: int) -> list[int]:
        assert self._done[ring]
        return self.results[ring][:count]

    def inFlight(self) -> int:
        with self._lock:
            return len(self._pendingRings)


class CallQueue:
    """An ``IReactorFromThreads`` whose calls wait until the test runs them."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args))

    def pump(self, until: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            try:
                f, args = self.calls.get(timeout=0.01)
            except queue.Empty:
                continue
            f(*args)

    def pending(self) -> int:
        return self.calls.qsize()


class Receiver:
    """A ``DecodeReceiver`` that keeps what it hears, with the batch sizes."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.batches: list[int] = []
        self.failure: str | None = None

    def tokensReady(self, values: list[int]) -> None:
        assert values, "an empty hand-over"
        self.values.extend(values)
        self.batches.append(len(values))

    def decodeFailed(self, reason: str) -> None:
        assert self.failure is None, "failed twice"
        self.failure = reason


class SchedulerTests(unittest.TestCase):
    def start(self, device: FakeStepDevice) -> tuple[DecodeScheduler, CallQueue, threading.Thread]:
        calls = CallQueue()
        scheduler = DecodeScheduler(calls)  # type: ignore[arg-type]
        thread = threading.Thread(target=scheduler.serve, args=(device,), daemon=True)
        self.addCleanup(self.stopped, scheduler, calls, thread)
        return scheduler, calls, thread

    def stopped(self, scheduler: DecodeScheduler, calls: CallQueue, thread: threading.Thread) -> None:
        scheduler.stop()
        if thread.is_alive() or thread.ident is not None:
            calls.pump(lambda: not thread.is_alive())

    def test_valuesFollowTheChain(self) -> None:
        """Each token's value starts from the last one's, the first from 0: the CPU reference's chain."""
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device)
        thread.start()
        receiver = Receiver()
        scheduler.admit(7, 20, receiver)
        calls.pump(lambda: len(receiver.values) == 20)
        self.assertEqual(receiver.values, spin_chain(7, 20))
        self.assertIsNone(receiver.failure)

    def test_oneLaunchPerStepForEveryRequest(self) -> None:
        """Sixteen requests admitted together advance together: one launch per step, not per token."""
        device = FakeStepDevice(slots=16)
        scheduler, calls, thread = self.start(device)
        receivers = [Receiver() for _ in range(16)]
        for receiver in receivers:
            scheduler.admit(3, 10, receiver)
        thread.start()
        calls.pump(lambda: all(len(r.values) == 10 for r in receivers))
        self.assertEqual(len(device.steps), 10)
        self.assertEqual(scheduler.steps, 10)
        self.assertEqual([len(entries) for _, entries in device.steps], [16] * 10)
        for receiver in receivers:
            self.assertEqual(receiver.values, spin_chain(3, 10))

    def test_joinBetweenStepsAndSlotReuse(self) -> None:
        """
        A request that arrives while others run joins at the next step, in a
        slot a finished request left, and still starts its chain from 0.
        """
        device = FakeStepDevice(slots=1)
        scheduler, calls, thread = self.start(device)
        thread.start()
        first, second = Receiver(), Receiver()
        scheduler.admit(5, 3, first)
        calls.pump(lambda: len(first.values) == 3)
        scheduler.admit(5, 4, second)
        calls.pump(lambda: len(second.values) == 4)
        self.assertEqual(first.values, spin_chain(5, 3))
        self.assertEqual(second.values, spin_chain(5, 4))
        self.assertTrue(device.steps[3][1][0] & FRESH)

    def test_moreRequestsThanSlotsWaitTheirTurn(self) -> None:
        """Past the device's slots, requests wait in arrival order and all complete, correctly."""
        device = FakeStepDevice(slots=2)
        scheduler, calls, thread = self.start(device)
        receivers = [Receiver() for _ in range(5)]
        for n, receiver in enumerate(receivers):
            scheduler.admit(2, 3 + n, receiver)
        thread.start()
        calls.pump(lambda: all(len(r.values) == 3 + n for n, r in enumerate(receivers)))
        for n, receiver in enumerate(receivers):
            self.assertEqual(receiver.values, spin_chain(2, 3 + n))
        self.assertLessEqual(max(len(entries) for _, entries in device.steps), 2)

    def test_pausedRequestLeavesTheBatch(self) -> None:
        """
        A paused request joins no step launched after the pause is seen; at
        most ``depth`` tokens already enqueued still arrive; resumed, it goes
        on from where its chain was.
        """
        device = FakeStepDevice(depth=4, held=True)
        scheduler, calls, thread = self.start(device)
        paused, other = Receiver(), Receiver()
        pausedTicket = scheduler.admit(1, 30, paused)
        scheduler.admit(1, 30, other)
        thread.start()
        device.release(2)
        calls.pump(lambda: len(paused.values) >= 2)
        pausedTicket.pause()
        launchedAtPause = len(device.steps)
        device.unhold()
        calls.pump(lambda: len(other.values) == 30)
        self.assertLessEqual(len(paused.values), launchedAtPause + 1)
        slot = device.steps[0][1][0] & ~FRESH
        joined = [n for n, (_, entries) in enumerate(device.steps) if any(e & ~FRESH == slot for e in entries)]
        self.assertLess(len(joined), 30, "the paused request kept joining steps")
        pausedTicket.resume()
        calls.pump(lambda: len(paused.values) == 30)
        self.assertEqual(paused.values, spin_chain(1, 30))

    def test_cancelledRequestHearsNothingMore(self) -> None:
        """After cancel: no tokens, no failure, and its slot goes to a waiting request."""
        device = FakeStepDevice(depth=2, slots=1, held=True)
        scheduler, calls, thread = self.start(device)
        cancelled, waiting = Receiver(), Receiver()
        ticket = scheduler.admit(1, 1000, cancelled)
        scheduler.admit(1, 5, waiting)
        thread.start()
        device.release(1)
        calls.pump(lambda: len(cancelled.values) >= 1)
        ticket.cancel()
        heard = len(cancelled.values)
        device.unhold()
        calls.pump(lambda: len(waiting.values) == 5)
        self.assertEqual(len(cancelled.values), heard)
        self.assertIsNone(cancelled.failure)
        self.assertEqual(waiting.values, spin_chain(1, 5))
        self.assertLess(len(device.steps), 100)

    def test_busyReactorBoundsTheWork(self) -> None:
        """
        While the reactor has not taken a hand-over, the loop keeps at most
        ``depth`` steps in flight beyond it, then sleeps: memory stays
        bounded whatever the load.
        """
        device = FakeStepDevice(depth=4)
        scheduler, calls, thread = self.start(device)
        receiver = Receiver()
        scheduler.admit(1, 10_000, receiver)
        thread.start()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and len(device.steps) < 1000:
            time.sleep(0.01)
        self.assertLessEqual(len(device.steps), 1 + 2 * device.depth)
        self.assertEqual(calls.pending(), 1)
        calls.pump(lambda: len(receiver.values) == 10_000)
        self.assertEqual(receiver.values[-1], spin_chain(1, 10_000)[-1])
        self.assertLess(len(receiver.batches), 10_000, "no batching under load")

    def test_middleTokensAreGatheredFirstAndLastAreNot(self) -> None:
        """
        A request's first token is handed over as soon as its step completes;
        middle tokens wait until ``COALESCE_STEPS`` steps are gathered; the
        last goes at once.
        """
        device = FakeStepDevice(depth=2 * COALESCE_STEPS, held=True)
        scheduler, calls, thread = self.start(device)
        receiver = Receiver()
        tokens = 4 + COALESCE_STEPS
        scheduler.admit(1, tokens, receiver)
        thread.start()
        device.release(1)
        calls.pump(lambda: len(receiver.values) == 1)
        device.release(COALESCE_STEPS - 1)
        deadline = time.monotonic() + 0.2
        calls.pump(lambda: time.monotonic() > deadline)
        self.assertEqual(receiver.batches, [1], "middle tokens handed over one step at a time")
        device.release(1)
        calls.pump(lambda: len(receiver.values) == 1 + COALESCE_STEPS)
        device.unhold()
        calls.pump(lambda: len(receiver.values) == tokens)
        self.assertEqual(receiver.batches, [1, COALESCE_STEPS, tokens - 1 - COALESCE_STEPS])
        self.assertEqual(receiver.values, spin_chain(1, tokens))

    def test_firstTokenDoesNotWaitForTheQueueToFill(self) -> None:
        """
        A first token whose step has completed is handed over before the
        loop tops the GPU's queue up: alone, on a device that completes at
        once, a request's first hand-over is its first token, not ``depth``.
        """
        device = FakeStepDevice(depth=16)
        scheduler, calls, thread = self.start(device)
        receiver = Receiver()
        scheduler.admit(1, 40, receiver)
        thread.start()
        calls.pump(lambda: len(receiver.values) == 40)
        self.assertEqual(receiver.batches[0], 1)
        self.assertEqual(receiver.values, spin_chain(1, 40))

    def test_pausedRequestGivesItsSlotUpAndGoesOnLater(self) -> None:
        """
        With every slot held by paused requests, a newcomer takes a paused
        one's slot; resumed, the paused requests queue for slots again and
        each goes on from its own last value: every chain is the reference's.
        """
        device = FakeStepDevice(depth=2, slots=2)
        scheduler, calls, thread = self.start(device)
        thread.start()
        paused = [Receiver(), Receiver()]
        tickets = [scheduler.admit(3, 50, receiver) for receiver in paused]
        calls.pump(lambda: all(len(r.values) >= 3 for r in paused))
        for ticket in tickets:
            ticket.pause()
        newcomers = [Receiver() for _ in range(3)]
        for receiver in newcomers:
            scheduler.admit(3, 7, receiver)
        calls.pump(lambda: all(len(r.values) == 7 for r in newcomers))
        held = [len(r.values) for r in paused]
        self.assertTrue(all(n < 50 for n in held), held)
        for ticket in tickets:
            ticket.resume()
        calls.pump(lambda: all(len(r.values) == 50 for r in paused))
        for receiver in paused + newcomers:
            self.assertEqual(receiver.values, spin_chain(3, len(receiver.values)))
        self.assertIsNone(paused[0].failure)
        # Each request takes a slot afresh once, and a paused one again after
        # giving its slot up: at least one had to (the newcomers finished),
        # the other only if it was idle while newcomers still waited.
        fresh = sum(1 for _, entries in device.steps for entry in entries if entry & FRESH)
        self.assertIn(fresh, (2 + 3 + 1, 2 + 3 + 2))

    def test_deviceFailureFailsEveryRequestAndLaterOnes(self) -> None:
        """A step that cannot launch fails every request in the batch, once, and refuses later requests."""
        device = FakeStepDevice()
        device.failAt = 3
        scheduler, calls, thread = self.start(device)
        receivers = [Receiver(), Receiver()]
        for receiver in receivers:
            scheduler.admit(1, 10, receiver)
        thread.start()
        calls.pump(lambda: all(r.failure for r in receivers))
        self.assertIn("the device fell over", receivers[0].failure or "")
        self.assertEqual(receivers[0].values, spin_chain(1, 10)[: len(receivers[0].values)])
        late = Receiver()
        scheduler.admit(1, 10, late)
        calls.pump(lambda: late.failure is not None)
        self.assertEqual(late.values, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopFailsWhatRuns(self) -> None:
        """Stopping the loop fails the requests still in it; those finished are not touched."""
        device = FakeStepDevice(held=True)
        scheduler, calls, thread = self.start(device)
        running = Receiver()
        scheduler.admit(1, 100, running)
        thread.start()
        device.release(1)
        calls.pump(lambda: len(running.values) >= 1)
        scheduler.stop()
        device.unhold()
        calls.pump(lambda: running.failure is not None and not thread.is_alive())
        self.assertIn("stopped", running.failure or "")
        late = Receiver()
        scheduler.admit(1, 1, late)
        calls.pump(lambda: late.failure is not None)

    def test_refusedAdmissionFailsLater(self) -> None:
        """An engine's refusal reaches the receiver on a later turn, never inside ``admit``."""
        calls = CallQueue()
        scheduler = DecodeScheduler(calls)  # type: ignore[arg-type]
        receiver = Receiver()
        scheduler.admit(1, 1, receiver, "the CUDA engine has stopped")
        self.assertIsNone(receiver.failure)
        calls.pump(lambda: receiver.failure is not None)
        self.assertEqual(receiver.failure, "the CUDA engine has stopped")


# The toy backend's stream over a batching engine -------------------------------------------


class FakeBatchingEngine:
    """The CUDA engine's shape over ``FakeStepDevice``, on the real reactor."""

    description = "fake decode steps"

    def __init__(self, device: FakeStepDevice) -> None:
        self.device = device
        self.scheduler = DecodeScheduler(reactor)
        self.thread = threading.Thread(target=self.scheduler.serve, args=(device,), daemon=True)
        self.thread.start()

    @property
    def launches(self) -> int:
        return self.scheduler.steps

    @property
    def brokenReason(self) -> str | None:
        return self.scheduler.brokenReason

    def admit(self, iters: int, tokens: int, receiver: Any) -> DecodeTicket:
        return self.scheduler.admit(iters, tokens, receiver)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


class FakeEngineCase(unittest.TestCase):
    """A toy backend on ``FakeBatchingEngine``, its worker stopped after each test."""

    timeout = 30
    #: The backend's iterations per token.
    iters = 9

    def setUp(self) -> None:
        self.device = FakeStepDevice(depth=4, slots=8)
        self.engine = FakeBatchingEngine(self.device)
        self.addCleanup(self.engine.thread.join, 5)
        self.addCleanup(self.engine.scheduler.stop)
        self.backend = ToyBackend(reactor, self.engine, self.iters)


class BatchedToyStreamTests(FakeEngineCase):

    @inlineCallbacks
    def test_requestsShareSteps(self) -> Any:
        """Eight concurrent toy requests complete with their own tokens in far fewer launches than tokens."""
        sinks = [RecordingSink() for _ in range(8)]
        results = yield self._gather(sinks)
        for sink, result in zip(sinks, results, strict=True):
            self.assertEqual(sink.chunks, [TOKEN_TEXT] * 40)
            self.assertEqual(result.generated_tokens, 40)
            self.assertEqual(result.finish_reason, "length")
        self.assertLess(self.engine.launches, 8 * 40 / 2)

    def _gather(self, sinks: list[RecordingSink]) -> Deferred[list[Any]]:
        from twisted.internet.defer import gatherResults

        return gatherResults([self.backend.generate(InferenceRequest(req_id=1, prompt="a b", max_tokens=40), s) for s in sinks])

    @inlineCallbacks
    def test_lastValueIsTheChain(self) -> Any:
        sink = RecordingSink()
        request = InferenceRequest(req_id=1, prompt="x", max_tokens=12)
        stream = BatchedToyStream(self.backend, self.engine, request, sink)
        stream.start()
        yield stream.done
        self.assertEqual(stream.last_value, spin_chain(9, 12)[-1])

    @inlineCallbacks
    def test_pauseHoldsTokensBack(self) -> Any:
        """
        A sink that pauses after every 100 tokens gets at most the rest of
        the hand-over it was in (``depth`` tokens) and then nothing until it
        resumes; then the rest.
        """
        sink = RecordingSink(pauseEvery=100)
        done = self.backend.generate(InferenceRequest(req_id=1, prompt="x", max_tokens=1000), sink)
        for round in range(1, 6):
            yield sleep(0.05)
            held = len(sink.chunks)
            self.assertGreaterEqual(held, 100 * round)
            self.assertLessEqual(held, 100 * round + self.device.depth)
            yield sleep(0.05)
            self.assertEqual(len(sink.chunks), held, "tokens kept coming while paused")
            assert sink.producer is not None
            sink.producer.resumeProducing()
        for _ in range(200):
            if done.called:
                break
            if sink.producer is not None:
                sink.producer.resumeProducing()
            yield sleep(0.01)
        result = yield done
        self.assertEqual(result.generated_tokens, 1000)
        self.assertEqual(len(sink.chunks), 1000)

    @inlineCallbacks
    def test_cancelStopsTheRequest(self) -> Any:
        """Cancelled while running (not paused): no more steps past those enqueued, nothing more written."""
        sink = RecordingSink()
        done = self.backend.generate(InferenceRequest(req_id=1, prompt="x", max_tokens=10_000_000), sink)
        yield sleep(0.05)
        self.assertGreater(len(sink.chunks), 0)
        done.cancel()
        launches, written = self.engine.launches, len(sink.chunks)
        yield self.assertFailure(done, CancelledError)
        yield sleep(0.1)
        self.assertLessEqual(self.engine.launches, launches + self.device.depth)
        self.assertEqual(len(sink.chunks), written)

    @inlineCallbacks
    def test_engineFailureFailsTheRequest(self) -> Any:
        self.device.failAt = len(self.device.steps) + 2
        sink = RecordingSink()
        done = self.backend.generate(InferenceRequest(req_id=1, prompt="x", max_tokens=50), sink)
        failure = yield self.assertFailure(done, BackendError)
        self.assertIn("the device fell over", str(failure))
        self.assertIsNone(sink.producer)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        healthy = yield self.backend.checkHealth()
        self.assertFalse(healthy, "a backend whose device failed still says it is healthy")

    @inlineCallbacks
    def test_zeroTokens(self) -> Any:
        sink = RecordingSink()
        result = yield self.backend.generate(InferenceRequest(req_id=1, prompt="x", max_tokens=0), sink)
        self.assertEqual(result.generated_tokens, 0)
        self.assertEqual(self.engine.launches, 0)
