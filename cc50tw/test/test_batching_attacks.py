"""
Adversarial tests for continuous batching (``cc50tw.backends.batching`` and
the toy's ``BatchedToyStream``), on the fake step device of
``test_batching``: odd orders of cancel, pause, resume and stop, receivers
and sinks that misbehave, and random interleavings from the reactor side
while the worker runs, checking the scheduler's promises:

* every admitted, uncancelled request hears exactly all its tokens, in
  chain order, or exactly one ``decodeFailed``, never both;
* nothing after ``cancel``;
* the loop neither dies nor hangs, and keeps nothing once requests are over.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.trial import unittest

from cc50tw.backends.batching import DecodeScheduler, DecodeTicket
from cc50tw.backends.lcg import spin_chain
from cc50tw.backends.toy import TOKEN_TEXT, ToyBackend
from cc50tw.errors import BackendError
from cc50tw.interfaces import InferenceRequest, ITokenSink
from cc50tw.test.fakes import RecordingSink
from cc50tw.test.test_batching import (
    TIMEOUT,
    CallQueue,
    FakeBatchingEngine,
    FakeEngineCase,
    FakeStepDevice,
    Receiver,
    reactor,
    sleep,
)


def pumpCatching(
    calls: CallQueue, until: Callable[[], bool], errors: list[BaseException], timeout: float = TIMEOUT
) -> bool:
    """
    Run the queued reactor calls as a reactor does: an exception is logged
    (here: kept in ``errors``) and the next call runs.  Whether ``until``
    came true in time.
    """
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            return False
        try:
            f, args = calls.calls.get(timeout=0.01)
        except queue.Empty:
            continue
        try:
            f(*args)
        except Exception as e:
            errors.append(e)
    return True


def pumpFor(calls: CallQueue, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    calls.pump(lambda: time.monotonic() > deadline)


class Tracked(Receiver):
    """A receiver that knows its request and refuses tokens after its cancel."""

    def __init__(self, iters: int, tokens: int) -> None:
        super().__init__()
        self.iters = iters
        self.tokens = tokens
        self.ticket: DecodeTicket | None = None
        self.cancelledAt: int | None = None
        self.paused = False
        self.late: list[int] = []

    def tokensReady(self, values: list[int]) -> None:
        if self.cancelledAt is not None:
            self.late.extend(values)
            return
        assert self.failure is None, "tokens after a failure"
        super().tokensReady(values)
        assert len(self.values) <= self.tokens, "more tokens than asked for"

    def decodeFailed(self, reason: str) -> None:
        assert self.cancelledAt is None, "a failure after cancel"
        super().decodeFailed(reason)

    def cancel(self) -> None:
        assert self.ticket is not None
        if self.cancelledAt is None:
            self.cancelledAt = len(self.values)
        self.ticket.cancel()

    @property
    def over(self) -> bool:
        return self.cancelledAt is not None or self.failure is not None or len(self.values) == self.tokens


class RaisingReceiver(Receiver):
    """A receiver whose ``tokensReady`` (or ``decodeFailed``) raises, as a buggy sink would."""

    def __init__(self, onTokens: bool = True, onFailure: bool = False) -> None:
        super().__init__()
        self.onTokens = onTokens
        self.onFailure = onFailure

    def tokensReady(self, values: list[int]) -> None:
        super().tokensReady(values)
        if self.onTokens:
            raise RuntimeError("the receiver fell over")

    def decodeFailed(self, reason: str) -> None:
        super().decodeFailed(reason)
        if self.onFailure:
            raise RuntimeError("the receiver fell over on failure")


class SchedulerAttackBase(unittest.TestCase):
    def start(self, device: FakeStepDevice, run: bool = True) -> tuple[DecodeScheduler, CallQueue, threading.Thread]:
        calls = CallQueue()
        scheduler = DecodeScheduler(calls)  # type: ignore[arg-type]
        thread = threading.Thread(target=scheduler.serve, args=(device,), daemon=True)
        self.addCleanup(self.stopped, scheduler, calls, thread)
        if run:
            thread.start()
        return scheduler, calls, thread

    def stopped(self, scheduler: DecodeScheduler, calls: CallQueue, thread: threading.Thread) -> None:
        scheduler.stop()
        if thread.ident is not None:
            errors: list[BaseException] = []
            self.assertTrue(
                pumpCatching(calls, lambda: not thread.is_alive(), errors), "the loop did not end on stop()"
            )

    def assertLoopIdle(self, scheduler: DecodeScheduler, thread: threading.Thread) -> None:
        """The loop is alive and keeps no request, step or token."""
        self.assertTrue(thread.is_alive(), "the decode loop died")
        self.assertIsNone(scheduler.brokenReason)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if not (scheduler._running or scheduler._waiting or scheduler._inFlight or scheduler._outbox):
                return
            time.sleep(0.01)
        self.fail(
            f"the loop kept state: running={len(scheduler._running)} waiting={len(scheduler._waiting)} "
            f"inFlight={len(scheduler._inFlight)} outbox={len(scheduler._outbox)}"
        )


class CancelAttacks(SchedulerAttackBase):
    def test_cancelBeforeTheWorkerStarts(self) -> None:
        """A request cancelled before the loop ever ran joins no step and hears nothing."""
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device, run=False)
        cancelled, other = Receiver(), Receiver()
        ticket = scheduler.admit(1, 50, cancelled)
        ticket.cancel()
        scheduler.admit(1, 5, other)
        thread.start()
        calls.pump(lambda: len(other.values) == 5)
        pumpFor(calls, 0.05)
        self.assertEqual(cancelled.values, [])
        self.assertIsNone(cancelled.failure)
        self.assertEqual(other.values, spin_chain(1, 5))
        self.assertEqual([len(entries) for _, entries in device.steps], [1] * 5)
        self.assertLoopIdle(scheduler, thread)

    def test_cancelTwiceAndAfterFinishing(self) -> None:
        """Cancelling a finished request, twice, changes nothing; the loop serves the next one."""
        device = FakeStepDevice(slots=1)
        scheduler, calls, thread = self.start(device)
        first = Receiver()
        ticket = scheduler.admit(2, 4, first)
        calls.pump(lambda: len(first.values) == 4)
        ticket.cancel()
        ticket.cancel()
        ticket.pause()
        ticket.resume()
        second = Receiver()
        scheduler.admit(2, 6, second)
        calls.pump(lambda: len(second.values) == 6)
        self.assertEqual(first.values, spin_chain(2, 4))
        self.assertIsNone(first.failure)
        self.assertEqual(second.values, spin_chain(2, 6))
        self.assertLoopIdle(scheduler, thread)

    def test_cancelWhileStepsAreInFlightThenSlotReuse(self) -> None:
        """
        A request cancelled with steps still on the device gives its slot at
        once; the newcomer in that slot starts its chain from 0 all the same.
        """
        device = FakeStepDevice(depth=4, slots=1, held=True)
        scheduler, calls, thread = self.start(device)
        cancelled, newcomer = Receiver(), Receiver()
        ticket = scheduler.admit(3, 100, cancelled)
        deadline = time.monotonic() + TIMEOUT
        while device.inFlight() < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        ticket.cancel()
        scheduler.admit(3, 7, newcomer)
        device.unhold()
        calls.pump(lambda: len(newcomer.values) == 7)
        self.assertEqual(newcomer.values, spin_chain(3, 7))
        self.assertEqual(cancelled.values, [])
        self.assertIsNone(cancelled.failure)
        self.assertLoopIdle(scheduler, thread)

    def test_cancelWaitingRequests(self) -> None:
        """More requests than slots, every other one cancelled while it waits: the rest complete, in order."""
        device = FakeStepDevice(depth=2, slots=2)
        scheduler, calls, thread = self.start(device, run=False)
        receivers = [Receiver() for _ in range(10)]
        tickets = [scheduler.admit(1, 20, receiver) for receiver in receivers]
        thread.start()
        for ticket in tickets[3::2]:
            ticket.cancel()
        kept = [r for n, r in enumerate(receivers) if n < 3 or n % 2 == 0]
        calls.pump(lambda: all(len(r.values) == 20 for r in kept))
        pumpFor(calls, 0.05)
        for receiver in kept:
            self.assertEqual(receiver.values, spin_chain(1, 20))
        for n, receiver in enumerate(receivers):
            if n >= 3 and n % 2:
                self.assertEqual(receiver.values, [], f"waiting request {n} ran after its cancel")
            self.assertIsNone(receiver.failure)
        self.assertLoopIdle(scheduler, thread)

    def test_cancelInsideAnotherRequestsTokensReady(self) -> None:
        """A receiver that cancels another request of the same hand-over: that one hears nothing more."""
        device = FakeStepDevice(slots=2)
        scheduler, calls, thread = self.start(device, run=False)
        victim = Tracked(1, 50)

        class Killer(Receiver):
            def tokensReady(self, values: list[int]) -> None:
                super().tokensReady(values)
                victim.cancel()

        killer = Killer()
        scheduler.admit(1, 50, killer)
        victim.ticket = scheduler.admit(1, 50, victim)
        thread.start()
        calls.pump(lambda: len(killer.values) == 50)
        pumpFor(calls, 0.05)
        self.assertEqual(victim.values, [])
        self.assertEqual(victim.late, [])
        self.assertEqual(killer.values, spin_chain(1, 50))
        self.assertLoopIdle(scheduler, thread)


class FlowAttacks(SchedulerAttackBase):
    def test_pauseResumeStorm(self) -> None:
        """Hundreds of pause/resume pairs while the loop runs: the chain comes out whole, in order."""
        device = FakeStepDevice(depth=3, slots=4)
        scheduler, calls, thread = self.start(device)
        receivers = [Receiver() for _ in range(4)]
        tickets = [scheduler.admit(1, 300, receiver) for receiver in receivers]
        rng = random.Random(7)
        for _ in range(500):
            ticket = rng.choice(tickets)
            ticket.pause()
            if rng.random() < 0.5:
                calls.pump(lambda: True)
                try:
                    f, args = calls.calls.get_nowait()
                    f(*args)
                except queue.Empty:
                    pass
            ticket.resume()
        calls.pump(lambda: all(len(r.values) == 300 for r in receivers))
        for receiver in receivers:
            self.assertEqual(receiver.values, spin_chain(1, 300))
            self.assertIsNone(receiver.failure)
        self.assertLoopIdle(scheduler, thread)

    def test_pauseThenCancel(self) -> None:
        """A paused request that is cancelled gives its slot up: a waiting one runs, the cancelled one hears nothing."""
        device = FakeStepDevice(depth=2, slots=1)
        scheduler, calls, thread = self.start(device)
        first = Tracked(1, 1000)
        first.ticket = scheduler.admit(1, 1000, first)
        calls.pump(lambda: len(first.values) >= 1)
        first.ticket.pause()
        second = Receiver()
        scheduler.admit(1, 5, second)
        first.cancel()
        calls.pump(lambda: len(second.values) == 5)
        self.assertEqual(second.values, spin_chain(1, 5))
        self.assertEqual(first.late, [])
        self.assertIsNone(first.failure)
        self.assertLoopIdle(scheduler, thread)

    def test_pausedBeforeItsFirstStep(self) -> None:
        """A request paused before the loop saw it never runs until resumed, then runs whole."""
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device, run=False)
        receiver = Receiver()
        ticket = scheduler.admit(1, 10, receiver)
        ticket.pause()
        thread.start()
        pumpFor(calls, 0.1)
        self.assertEqual(receiver.values, [])
        self.assertEqual(device.steps, [])
        ticket.resume()
        calls.pump(lambda: len(receiver.values) == 10)
        self.assertEqual(receiver.values, spin_chain(1, 10))

    def test_pausedRequestsDoNotStarveWaitingOnes(self) -> None:
        """
        Requests whose clients stopped granting credit must not keep the
        requests behind them from ever starting: with every slot held by a
        paused request, a newcomer should still get its tokens.
        """
        device = FakeStepDevice(depth=2, slots=2)
        scheduler, calls, thread = self.start(device)
        paused = [Receiver(), Receiver()]
        tickets = [scheduler.admit(1, 10_000, receiver) for receiver in paused]
        calls.pump(lambda: all(r.values for r in paused))
        for ticket in tickets:
            ticket.pause()
        newcomer = Receiver()
        scheduler.admit(1, 3, newcomer)
        pumpFor(calls, 1.0)
        try:
            self.assertEqual(
                newcomer.values,
                spin_chain(1, 3),
                "every slot is held by a paused request: the newcomer waits as long as they stay paused",
            )
        finally:
            for ticket in tickets:
                ticket.cancel()


    def test_resumeWithoutPauseAndAfterFinish(self) -> None:
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device)
        receiver = Receiver()
        ticket = scheduler.admit(1, 10, receiver)
        for _ in range(20):
            ticket.resume()
        calls.pump(lambda: len(receiver.values) == 10)
        ticket.resume()
        ticket.pause()
        ticket.resume()
        pumpFor(calls, 0.05)
        self.assertEqual(receiver.values, spin_chain(1, 10))
        self.assertIsNone(receiver.failure)
        self.assertLoopIdle(scheduler, thread)

    def test_commandsWhileAHandOverIsHeldBackStayBounded(self) -> None:
        """
        A reactor that does not take its hand-over while it pauses and
        resumes requests in a loop: the device still runs at most a bounded
        number of steps.
        """
        device = FakeStepDevice(depth=4, slots=4)
        scheduler, calls, thread = self.start(device)
        receivers = [Receiver() for _ in range(4)]
        tickets = [scheduler.admit(1, 100_000, receiver) for receiver in receivers]
        for _ in range(2000):
            for ticket in tickets:
                ticket.pause()
                ticket.resume()
        time.sleep(0.2)
        self.assertLessEqual(len(device.steps), 1 + 2 * device.depth)
        self.assertEqual(calls.pending(), 1)
        for ticket in tickets:
            ticket.cancel()


class EdgeAttacks(SchedulerAttackBase):
    def test_zeroAndNegativeTokensThroughAdmit(self) -> None:
        """Requests of 0 or fewer tokens launch nothing, hear nothing, and leave the loop serving."""
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device)
        empty = [Receiver() for _ in range(3)]
        for receiver, tokens in zip(empty, (0, -1, -(2**40)), strict=True):
            ticket = scheduler.admit(1, tokens, receiver)
            ticket.pause()
            ticket.resume()
            ticket.cancel()
        other = Receiver()
        scheduler.admit(1, 3, other)
        calls.pump(lambda: len(other.values) == 3)
        pumpFor(calls, 0.05)
        self.assertEqual([len(entries) for _, entries in device.steps], [1, 1, 1])
        for receiver in empty:
            self.assertEqual(receiver.values, [])
            self.assertIsNone(receiver.failure)
        self.assertLoopIdle(scheduler, thread)

    def test_stopTwiceAndAdmitAfterStop(self) -> None:
        """stop() twice ends the loop once; requests admitted after it are refused, once each, on a later turn."""
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device)
        running = Receiver()
        ticket = scheduler.admit(1, 1_000_000, running)
        calls.pump(lambda: bool(running.values))
        scheduler.stop()
        scheduler.stop()
        late = [Receiver() for _ in range(3)]
        for receiver in late:
            lateTicket = scheduler.admit(1, 5, receiver)
            self.assertIsNone(receiver.failure, "refused from inside admit")
            lateTicket.pause()
        calls.pump(lambda: not thread.is_alive() and running.failure is not None and all(r.failure for r in late))
        pumpFor(calls, 0.05)
        ticket.cancel()
        ticket.resume()
        for receiver in [running, *late]:
            self.assertIn("stopped", receiver.failure or "")
            self.assertEqual(receiver.values, spin_chain(1, len(receiver.values)))
        scheduler.stop()
        self.assertFalse(thread.is_alive())

    def test_stopBeforeTheLoopStarts(self) -> None:
        """A loop stopped before it ran still fails what was admitted to it, once."""
        device = FakeStepDevice()
        scheduler, calls, thread = self.start(device, run=False)
        receivers = [Receiver() for _ in range(3)]
        for receiver in receivers:
            scheduler.admit(1, 5, receiver)
        scheduler.stop()
        thread.start()
        calls.pump(lambda: all(r.failure for r in receivers) and not thread.is_alive())
        self.assertEqual(device.steps, [])
        for receiver in receivers:
            self.assertEqual(receiver.values, [])

    def test_deviceFailureWhilePausedAndWaiting(self) -> None:
        """
        The device fails while one request is paused (its slot given up), two
        run and one waits for a slot: each hears one failure, after a prefix
        of its chain.
        """
        device = FakeStepDevice(depth=2, slots=2)
        scheduler, calls, thread = self.start(device)
        paused, running, second, waiting = (Tracked(1, 10_000) for _ in range(4))
        paused.ticket = scheduler.admit(1, 10_000, paused)
        calls.pump(lambda: bool(paused.values))
        paused.ticket.pause()
        running.ticket = scheduler.admit(1, 10_000, running)
        second.ticket = scheduler.admit(1, 10_000, second)
        calls.pump(lambda: len(second.values) >= 20)
        waiting.ticket = scheduler.admit(1, 10, waiting)
        device.failAt = len(device.steps) + 3
        calls.pump(lambda: all(r.failure for r in (paused, running, second, waiting)))
        pumpFor(calls, 0.05)
        for receiver in (paused, running, second, waiting):
            self.assertIn("the device fell over", receiver.failure or "")
            self.assertEqual(receiver.values, spin_chain(1, len(receiver.values)))
        self.assertEqual(waiting.values, [])
        self.assertFalse(thread.is_alive())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_raisingReceiverDoesNotStarveItsNeighbours(self) -> None:
        """
        One receiver that raises in ``tokensReady`` (a buggy sink) must not
        cost the other requests of the same hand-over their tokens: the
        reactor logs the exception and goes on, but the rest of that batch
        was never delivered.
        """
        device = FakeStepDevice(slots=4)
        scheduler, calls, thread = self.start(device, run=False)
        bad = RaisingReceiver()
        scheduler.admit(1, 5, bad)
        good = [Receiver() for _ in range(3)]
        for receiver in good:
            scheduler.admit(1, 5, receiver)
        thread.start()
        errors: list[BaseException] = []
        finished = pumpCatching(calls, lambda: all(len(r.values) == 5 for r in good), errors, timeout=2.0)
        self.flushLoggedErrors(RuntimeError)  # wherever the scheduler reports it
        self.assertTrue(bad.values, "the bad receiver was never called")
        self.assertTrue(
            finished,
            f"requests sharing a hand-over with a raising receiver lost tokens: got {[len(r.values) for r in good]} of 5",
        )
        for receiver in good:
            self.assertEqual(receiver.values, spin_chain(1, 5))

    def test_raisingReceiverOnFailureDoesNotSilenceTheOthers(self) -> None:
        """When the loop fails everyone, one receiver raising in ``decodeFailed`` must not keep the others from hearing."""
        device = FakeStepDevice(slots=4, held=True)
        scheduler, calls, thread = self.start(device, run=False)
        bad = RaisingReceiver(onTokens=False, onFailure=True)
        scheduler.admit(1, 100, bad)
        others = [Receiver() for _ in range(3)]
        for receiver in others:
            scheduler.admit(1, 100, receiver)
        thread.start()
        scheduler.stop()
        device.unhold()
        errors: list[BaseException] = []
        finished = pumpCatching(calls, lambda: all(r.failure for r in others), errors, timeout=2.0)
        self.flushLoggedErrors(RuntimeError)  # wherever the scheduler reports it
        self.assertIsNotNone(bad.failure, "the bad receiver was never told")
        self.assertTrue(finished, f"failures heard: {[r.failure is not None for r in others]}")


class RandomInterleavings(SchedulerAttackBase):
    """Random admit/pause/resume/cancel from the reactor side while the worker runs."""

    timeout = 120

    def runOne(self, seed: int) -> None:
        rng = random.Random(seed)
        device = FakeStepDevice(depth=rng.randint(1, 5), slots=rng.randint(1, 6), held=rng.random() < 0.5)
        scheduler, calls, thread = self.start(device)
        receivers: list[Tracked] = []
        releasing = threading.Event()
        self.addCleanup(device.unhold)
        releaseRng = random.Random(seed + 1000)

        def releaser() -> None:
            while not releasing.is_set():
                device.release(releaseRng.randint(0, 3))
                time.sleep(releaseRng.random() * 0.002)

        if device._held:
            helper = threading.Thread(target=releaser, daemon=True)
            helper.start()
            self.addCleanup(helper.join, 5)
            self.addCleanup(releasing.set)

        for _ in range(rng.randint(50, 300)):
            action = rng.random()
            live = [r for r in receivers if r.cancelledAt is None]
            if action < 0.2 or not live:
                iters, tokens = rng.randint(0, 2), rng.randint(1, 40)
                receiver = Tracked(iters, tokens)
                receiver.ticket = scheduler.admit(iters, tokens, receiver)
                receivers.append(receiver)
            elif action < 0.45:
                target = rng.choice(live)
                assert target.ticket is not None
                target.paused = True
                target.ticket.pause()
            elif action < 0.7:
                target = rng.choice(live)
                assert target.ticket is not None
                target.paused = False
                target.ticket.resume()
            elif action < 0.78:
                rng.choice(live).cancel()
            elif action < 0.95:
                for _ in range(rng.randint(0, 3)):
                    try:
                        f, args = calls.calls.get_nowait()
                    except queue.Empty:
                        break
                    f(*args)
            else:
                time.sleep(rng.random() * 0.003)
        for receiver in receivers:
            if receiver.paused and receiver.cancelledAt is None:
                assert receiver.ticket is not None
                receiver.ticket.resume()
        calls.pump(lambda: all(r.over for r in receivers), timeout=20)
        pumpFor(calls, 0.02)
        for n, receiver in enumerate(receivers):
            where = f"seed {seed}, request {n} ({receiver.iters} iters, {receiver.tokens} tokens)"
            self.assertIsNone(receiver.failure, where)
            self.assertEqual(receiver.late, [], f"{where}: tokens after cancel")
            if receiver.cancelledAt is None:
                self.assertEqual(receiver.values, spin_chain(receiver.iters, receiver.tokens), where)
            else:
                self.assertEqual(len(receiver.values), receiver.cancelledAt, where)
                self.assertEqual(receiver.values, spin_chain(receiver.iters, len(receiver.values)), where)
        releasing.set()
        device.unhold()
        self.assertLoopIdle(scheduler, thread)

    def test_randomInterleavings(self) -> None:
        for seed in range(40):
            self.runOne(seed)


# The toy's stream --------------------------------------------------------------------------


class BatchedToyStreamAttacks(FakeEngineCase):
    iters = 3

    def generate(self, sink: ITokenSink, tokens: int) -> Deferred[Any]:
        return self.backend.generate(InferenceRequest(req_id=1, prompt="x", max_tokens=tokens), sink)

    @inlineCallbacks
    def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            yield sleep(0.005)
        return condition()

    @inlineCallbacks
    def test_stopProducingInsideWrite(self) -> Any:
        """A sink that stops its producer from inside ``write``: nothing more is written, nothing fails."""
        sink = RecordingSink()

        def stopAtFive(s: RecordingSink) -> None:
            if len(s.chunks) == 5 and s.producer is not None:
                s.producer.stopProducing()

        sink.onWrite = stopAtFive
        done = self.generate(sink, 10_000)
        yield self.until(lambda: len(sink.chunks) >= 5)
        launches = self.engine.launches
        yield sleep(0.1)
        self.assertLessEqual(len(sink.chunks), 5 + self.device.depth * 2)
        written = len(sink.chunks)
        yield sleep(0.05)
        self.assertEqual(len(sink.chunks), written)
        self.assertLessEqual(self.engine.launches, launches + 2 * self.device.depth)
        done.cancel()
        yield self.assertFailure(done, CancelledError)

    @inlineCallbacks
    def test_stopProducingOnTheLastToken(self) -> Any:
        """Stopping from inside the write of the last token: the stream neither finishes twice nor raises."""
        sink = RecordingSink()

        def stopAtLast(s: RecordingSink) -> None:
            if len(s.chunks) == 8 and s.producer is not None:
                s.producer.stopProducing()

        sink.onWrite = stopAtLast
        done = self.generate(sink, 8)
        yield self.until(lambda: len(sink.chunks) == 8)
        yield sleep(0.05)
        if not done.called:
            done.cancel()
        yield done.addErrback(lambda f: f.trap(CancelledError))
        self.assertEqual(len(sink.chunks), 8)

    @inlineCallbacks
    def test_doneCancelledThenTokensArrive(self) -> Any:
        """Cancelling ``done`` while steps are in flight: late tokens and failures are dropped, no AlreadyCalledError."""
        sinks = [RecordingSink() for _ in range(4)]
        dones = [self.generate(sink, 5000) for sink in sinks]
        yield self.until(lambda: all(s.chunks for s in sinks))
        for done in dones:
            done.cancel()
            done.cancel()
        counts = [len(s.chunks) for s in sinks]
        yield sleep(0.1)
        self.engine.scheduler.stop()
        yield self.until(lambda: not self.engine.thread.is_alive())
        yield sleep(0.02)
        self.assertEqual([len(s.chunks) for s in sinks], counts)
        for done in dones:
            yield self.assertFailure(done, CancelledError)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_pauseResumeStormInOneTurn(self) -> Any:
        """Many pause/resume pairs in one reactor turn, many turns: every token arrives once."""
        sink = RecordingSink()
        done = self.generate(sink, 2000)
        for _ in range(50):
            producer = sink.producer
            if producer is None:
                break
            for _ in range(20):
                producer.pauseProducing()
                producer.resumeProducing()
            producer.pauseProducing()
            yield sleep(0.002)
            producer.resumeProducing()
            producer.resumeProducing()
        result = yield done
        self.assertEqual(result.generated_tokens, 2000)
        self.assertEqual(sink.chunks, [TOKEN_TEXT] * 2000)
        self.assertEqual(self.backend.tokens_emitted, 2000)

    @inlineCallbacks
    def test_resumeAndPauseAfterFinish(self) -> Any:
        sink = RecordingSink()
        done = self.generate(sink, 20)
        yield self.until(lambda: sink.producer is not None)
        producer = sink.producer
        assert producer is not None
        result = yield done
        producer.pauseProducing()
        producer.resumeProducing()
        producer.stopProducing()
        producer.resumeProducing()
        yield sleep(0.02)
        self.assertEqual(result.generated_tokens, 20)
        self.assertEqual(len(sink.chunks), 20)
        self.assertEqual(sink.unregistered, 1)

    @inlineCallbacks
    def test_engineFailsWhileTheStreamIsPausedWithHeldTokens(self) -> Any:
        """The engine fails while a stream is paused and holds tokens: its Deferred fails once, nothing more is written."""
        sink = RecordingSink(pauseEvery=10)
        done = self.generate(sink, 10_000)
        yield self.until(lambda: sink.paused)
        written = len(sink.chunks)
        self.device.failAt = len(self.device.steps)
        other = RecordingSink()
        otherDone = self.generate(other, 100)
        yield self.assertFailure(done, BackendError)
        yield self.assertFailure(otherDone, BackendError)
        assert sink.producer is None
        self.assertEqual(len(sink.chunks), written)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_engineStopsWhileStreamsPauseAndWait(self) -> Any:
        """Stopping the engine while streams are paused and waiting for slots fails every one of them."""
        sinks = [RecordingSink(pauseEvery=5) for _ in range(12)]
        dones = [self.generate(sink, 1000) for sink in sinks]
        yield self.until(lambda: sum(s.paused for s in sinks) >= 8)
        self.engine.scheduler.stop()
        for done in dones:
            failure = yield self.assertFailure(done, BackendError)
            self.assertIn("stopped", str(failure))
        late = self.generate(RecordingSink(), 10)
        yield self.assertFailure(late, BackendError)

    @inlineCallbacks
    def test_raisingSinkDoesNotHangOtherStreams(self) -> Any:
        """
        A sink whose ``write`` raises (a bug in one connection's code) must
        not leave the streams that shared its hand-over waiting forever.
        """
        device = FakeStepDevice(depth=4, slots=8, held=True)
        engine = FakeBatchingEngine(device)
        self.addCleanup(engine.thread.join, 5)
        self.addCleanup(engine.scheduler.stop)
        backend = ToyBackend(reactor, engine, 3)
        bad = RecordingSink()

        def explode(s: RecordingSink) -> None:
            raise RuntimeError("the sink fell over")

        bad.onWrite = explode
        badDone = backend.generate(InferenceRequest(req_id=1, prompt="x", max_tokens=20), bad)
        goods = [RecordingSink() for _ in range(3)]
        goodDones = [backend.generate(InferenceRequest(req_id=2, prompt="x", max_tokens=20), s) for s in goods]
        device.unhold()
        finished = yield self.until(lambda: all(d.called for d in goodDones), timeout=2.0)
        self.flushLoggedErrors(RuntimeError)
        for done in [badDone, *goodDones]:
            if not done.called:
                done.cancel()
            done.addErrback(lambda f: None)
        self.assertTrue(
            finished,
            f"streams sharing a hand-over with a raising sink hung at {[len(s.chunks) for s in goods]} of 20 tokens",
        )

    @inlineCallbacks
    def test_pausedAtRegistrationRunsNoWork(self) -> Any:
        """
        The server's sink pauses a producer from inside ``registerProducer``
        when the connection is already blocked (no credit, or the transport
        paused).  That request must not run on: only steps already enqueued
        may complete, as for any other pause.
        """
        sink = RecordingSink()
        sink.onRegister = lambda producer: producer.pauseProducing()
        done = self.generate(sink, 100_000)
        yield sleep(0.2)
        launches = self.engine.launches
        producer = sink.producer
        assert producer is not None
        producer.stopProducing()
        done.cancel()
        yield self.assertFailure(done, CancelledError)
        self.assertEqual(sink.chunks, [])
        self.assertLessEqual(
            launches, 2 * self.device.depth, "a request paused at registration ran on the device regardless"
        )

    @inlineCallbacks
    def test_stoppedAtRegistrationRunsNoWork(self) -> Any:
        """A producer stopped from inside ``registerProducer`` must not be admitted to the engine at all."""
        sink = RecordingSink()
        sink.onRegister = lambda producer: producer.stopProducing()
        done = self.generate(sink, 100_000)
        yield sleep(0.1)
        launches = self.engine.launches
        done.cancel()
        yield done.addErrback(lambda f: f.trap(CancelledError))
        self.assertEqual(sink.chunks, [])
        self.assertEqual(launches, 0, "a request stopped at registration ran on the device regardless")
