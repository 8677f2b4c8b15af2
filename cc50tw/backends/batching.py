"""
Continuous batching: one kernel launch per decode step for every running request.

A GPU runs one small kernel in tens of microseconds, but Python launches only
a few tens of thousands a second, so a kernel per token per request makes
Python's launch rate, not the GPU, the limit as soon as a few requests run at
once.  Inference engines answer this with decode steps: each step is one
launch that advances every running request by one token, requests join and
leave between steps, and the host enqueues a bounded number of steps ahead so
that the GPU never waits for Python.  This module is that scheduler, apart
from the GPU itself (``StepDevice``): the CUDA engine gives it a device, and
the tests give it a fake one that behaves the same way on any machine.

Threads.  The scheduler's loop runs on one worker thread, which owns the
device (a CUDA context is current on one thread at a time) and is the only
thread that waits on it.  The reactor thread talks to the loop through a
queue of commands (admit, pause, resume, cancel) and gets tokens back through
``callFromThread``, in order, in batches: a request's tokens of every step
that completed since the last hand-over arrive in one call.

At most one hand-over is outstanding.  Until the reactor has taken it, the
loop only tops the GPU's queue up to ``depth`` steps, then sleeps on a
condition: it does not wait on the GPU meanwhile.  Two things follow.  The
reactor gets the GIL at once (a thread that spins on the GPU and retakes the
GIL after every step can starve the reactor for Python's whole switch
interval, 5 ms, long enough to hold a request's first token until its last);
and a busy reactor gets fewer, larger hand-overs, so a stream's tokens of
several steps go out in one write and one send, which is what lets many
streams through a reactor that costs microseconds per write.  With ``depth``
steps queued, the GPU keeps working while the reactor writes.  Memory stays
bounded whatever the load: ``depth`` steps on the device, one hand-over of at
most ``depth`` steps with the reactor.

Flow control.  A paused request (its client has no credit) leaves the batch
until it is resumed: it joins no new step.  Steps already enqueued for it
still complete and deliver (at most ``2 * depth`` tokens: the queue and the
hand-over in the reactor's hands), and the toy's stream holds those until
the client has credit again.  A paused request also gives its device slot
up when another request waits for one (once nothing of it is in flight or
unsent): its chain's last value goes with it, and on resume it queues for a
slot again and goes on from that value.  So clients that stop reading can
hold no slots, only their place in the queue.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: A step's entry for a request: its state slot, with this bit set on its
#: first step in that slot, so the kernel starts its chain from the step's
#: seed (0 for a new request, the last value for one that gave a slot up)
#: rather than from whatever the slot's last owner left there.
FRESH = 1 << 31

#: Steps enqueued ahead of the one the host waits for: enough that the GPU
#: still has work while the reactor writes a hand-over out (32 steps of
#: about 20 µs at the toy's default work), few enough that a paused or
#: cancelled request runs on only briefly.
DEFAULT_DEPTH = 32

#: Steps a stream's middle tokens may wait for before they are handed to
#: the reactor (first and last tokens never wait): each wake-up of the
#: reactor, and each switch of the GIL between the two threads, then carries
#: up to this many tokens per stream.  About 0.3 ms at the toy's default work.
COALESCE_STEPS = 16

#: Most requests in one step (each has a state slot on the device).  Past
#: this, requests wait their turn in arrival order.
DEFAULT_SLOTS = 256


class StepDevice(Protocol):
    """
    What the scheduler needs of a GPU.  Every method is called on the worker
    thread only; ``ring`` names one of ``depth`` buffers, reused once the
    step launched on it has been collected.
    """

    #: Most steps in flight at once (the number of ring buffers).
    depth: int
    #: Most entries in one step (the number of state slots).
    slots: int

    def launchStep(self, ring: int, iters: int, entries: Sequence[int], seeds: Sequence[int] | None = None) -> None:
        """
        Enqueue one step over ``entries`` (slot numbers, ``FRESH`` or'd in)
        and return at once.  A ``FRESH`` entry starts from its ``seeds``
        value (from 0 when ``seeds`` is None).
        """

    def stepDone(self, ring: int) -> bool:
        """Whether the step on ``ring`` has completed, without waiting."""

    def waitStep(self, ring: int) -> None:
        """Block this thread until the step on ``ring`` completes."""

    def stepResults(self, ring: int, count: int) -> list[int]:
        """The completed step's values, one per entry, in the entries' order."""


class DecodeReceiver(Protocol):
    """Where a request's tokens go, on the reactor thread."""

    def tokensReady(self, values: list[int]) -> None:
        """The values of the request's next tokens, in order (at least one)."""

    def decodeFailed(self, reason: str) -> None:
        """The request's work cannot go on; no more tokens will come."""


class DecodeTicket:
    """
    One request's place in the scheduler.

    The reactor thread calls ``pause``, ``resume`` and ``cancel``; the fields
    after ``receiver`` belong to the worker thread alone.
    """

    __slots__ = (
        "_scheduler",
        "receiver",
        "cancelled",
        "iters",
        "toLaunch",
        "paused",
        "slot",
        "fresh",
        "gone",
        "seed",
        "parked",
    )

    def __init__(self, scheduler: DecodeScheduler, receiver: DecodeReceiver, iters: int, tokens: int) -> None:
        self._scheduler = scheduler
        self.receiver = receiver
        #: Reactor side: set by ``cancel``; tokens that arrive after it are dropped.
        self.cancelled = False
        # Worker side.
        self.iters = iters
        #: Steps still to launch for it, less those of the current batch
        #: (``DecodeScheduler._charge`` settles the difference).
        self.toLaunch = tokens
        self.paused = False
        self.slot = -1
        #: Its first step is still to launch (it starts its chain from 0).
        self.fresh = True
        #: Cancelled: steps still in flight for it deliver nothing.
        self.gone = False
        #: The last value handed over: where its chain goes on after it gave its slot up.
        self.seed = 0
        #: Paused, with its slot given up to a waiting request.
        self.parked = False

    def pause(self) -> None:
        self._scheduler._command(self._paused, self)

    def resume(self) -> None:
        self._scheduler._command(self._resumed, self)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._scheduler._command(self._cancelled, self)

    # On the worker thread, as commands.

    @staticmethod
    def _paused(scheduler: DecodeScheduler, ticket: DecodeTicket) -> None:
        if not ticket.paused:
            scheduler._charge()
            ticket.paused = True
            scheduler._fillSlots()  # requests waiting for a slot may take this one

    @staticmethod
    def _resumed(scheduler: DecodeScheduler, ticket: DecodeTicket) -> None:
        if ticket.paused:
            scheduler._charge()
            ticket.paused = False
            if ticket.parked:
                scheduler._unpark(ticket)

    @staticmethod
    def _cancelled(scheduler: DecodeScheduler, ticket: DecodeTicket) -> None:
        scheduler._leave(ticket)


Command = Callable[["DecodeScheduler", DecodeTicket], None]


class _Step:
    """
    A launched step: its ring buffer, the requests it advances in entry
    order (one list shared by every step of a batch), its values once
    collected, whether it carries a first or last token (``urgent``) and the
    requests whose last step it is.
    """

    __slots__ = ("ring", "tickets", "values", "urgent", "finishing")

    def __init__(self, ring: int, tickets: list[DecodeTicket], urgent: bool, finishing: list[DecodeTicket]) -> None:
        self.ring = ring
        self.tickets = tickets
        self.values: list[int] = []
        self.urgent = urgent
        self.finishing = finishing


class DecodeScheduler:
    """
    Runs decode steps on a ``StepDevice`` from one worker thread.

    ``admit`` (reactor thread) adds a request of ``tokens`` steps; the loop
    (``serve``, worker thread) launches steps over every running, unpaused
    request, collects them in order and hands their values to the reactor.
    """

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Shared, under the lock.
        self._commands: list[tuple[Command, DecodeTicket]] = []
        self._handOverPending = False
        self._stopping = False
        #: Set once the loop has ended: later requests are refused with it.
        self._closedReason: str | None = None
        #: Why the loop ended early (the device failed), once it has.
        self.brokenReason: str | None = None
        # Worker side.
        self._device: StepDevice | None = None
        self._running: dict[DecodeTicket, None] = {}  # insertion-ordered set
        self._waiting: deque[DecodeTicket] = deque()
        #: Paused requests that gave their slot up (insertion-ordered set).
        self._parked: dict[DecodeTicket, None] = {}
        self._freeSlots: list[int] = []
        self._inFlight: deque[_Step] = deque()
        self._nextRing = 0
        #: Collected steps not yet handed over, and whether one holds a first or last token.
        self._outbox: list[_Step] = []
        self._urgent = False
        # The batch: the requests the next steps advance, kept from step to
        # step until something changes (a request joins, pauses, resumes,
        # leaves or runs out), so that a step costs no work per request.
        self._batch: list[DecodeTicket] | None = None
        self._batchEntries: list[int] = []
        self._freshEntries: list[int] | None = None
        self._freshSeeds: list[int] | None = None
        self._batchIters = 0
        self._batchSteps = 0
        self._batchLeft = 0
        #: Steps launched; read from any thread for tests and metrics.
        self.steps = 0

    # Reactor thread ------------------------------------------------------

    def admit(self, iters: int, tokens: int, receiver: DecodeReceiver, refusal: str | None = None) -> DecodeTicket:
        """
        Queue a request of ``tokens`` steps at ``iters`` iterations each.

        Given a ``refusal`` (the engine cannot take work), or once the loop
        has ended, the receiver hears ``decodeFailed`` on a later reactor
        turn instead: never from inside this call, whose caller is still
        setting itself up.
        """
        ticket = DecodeTicket(self, receiver, iters, tokens)
        with self._lock:
            refusal = refusal or self._closedReason
            if refusal is None:
                self._commands.append((DecodeScheduler._admitted, ticket))
                self._wake.notify()
                return ticket
        self._reactor.callFromThread(self._failAll, [ticket], refusal)
        return ticket

    def refuseAll(self, reason: str) -> None:
        """The loop will never run (the device could not start): fail what waits and all that comes."""
        self._abandonAll(reason)

    def stop(self) -> None:
        """Ask the loop to end: requests still running get ``decodeFailed``."""
        with self._lock:
            self._stopping = True
            self._wake.notify()

    def _command(self, command: Command, ticket: DecodeTicket) -> None:
        with self._lock:
            if self._closedReason is None:  # else the ticket has been failed already
                self._commands.append((command, ticket))
                self._wake.notify()

    def _handOver(self, batch: list[tuple[DecodeTicket, list[int]]]) -> None:
        with self._lock:
            self._handOverPending = False
            self._wake.notify()
        for ticket, values in batch:
            if not ticket.cancelled:
                try:
                    ticket.receiver.tokensReady(values)
                except Exception:
                    # One broken receiver must not cost the others in this batch their tokens.
                    log.failure("a decode receiver failed on its tokens; its request is cancelled")
                    ticket.cancel()

    def _failAll(self, tickets: list[DecodeTicket], reason: str) -> None:
        for ticket in tickets:
            if not ticket.cancelled:
                ticket.cancelled = True
                try:
                    ticket.receiver.decodeFailed(reason)
                except Exception:
                    log.failure("a decode receiver failed on its failure")

    # Worker thread -------------------------------------------------------

    def serve(self, device: StepDevice) -> None:
        """
        The loop: returns once ``stop`` was called (or the device failed),
        after failing every request still admitted.
        """
        self._device = device
        self._freeSlots = list(range(device.slots - 1, -1, -1))
        reason = "the CUDA engine has stopped"
        try:
            while True:
                commands, stopping, handOverPending = self._exchange()
                for command, ticket in commands:
                    command(self, ticket)
                if stopping:
                    break
                if self._mayLaunch() and not (not handOverPending and self._urgentStepDone()):
                    self._launch()
                elif not handOverPending:
                    if self._inFlight:
                        self._collect(block=True)
                    if self._outbox and self._handOverDue():
                        self._sendOutbox()
                        if self._waiting:
                            self._fillSlots()  # a paused request may have nothing unsent now
        except Exception as e:
            reason = f"CUDA step failed: {e}"
            self.brokenReason = reason
            # Logged from the reactor thread: the log's observers (the
            # buffered request log among them) are not thread-safe.
            self._reactor.callFromThread(log.failure, "the decode loop failed; failing every request in it", Failure())
        finally:
            self._abandonAll(reason)

    def _exchange(self) -> tuple[list[tuple[Command, DecodeTicket]], bool, bool]:
        """
        Take the reactor's commands, and whether a hand-over is still with
        it; sleep until one of them changes when there is nothing to do.
        """
        with self._lock:
            while not (self._commands or self._stopping or self._hasWork(self._handOverPending)):
                self._wake.wait()
            commands, self._commands = self._commands, []
            return commands, self._stopping, self._handOverPending

    def _hasWork(self, handOverPending: bool) -> bool:
        if self._mayLaunch():
            return True
        return not handOverPending and bool(self._inFlight or self._outbox)

    def _urgentStepDone(self) -> bool:
        """
        Whether the oldest step carries a first or last token and has
        completed: handing that over comes before topping the queue up, or a
        burst of ``depth`` launches would hold a request's first token back.
        Asked of the device only for such steps, a few per request.
        """
        inFlight = self._inFlight
        return bool(inFlight) and inFlight[0].urgent and self._device is not None and self._device.stepDone(inFlight[0].ring)

    def _mayLaunch(self) -> bool:
        if len(self._inFlight) >= self._depth():
            return False
        if self._batch is not None:
            return True
        return any(not ticket.paused and ticket.toLaunch > 0 for ticket in self._running)

    def _depth(self) -> int:
        assert self._device is not None
        return self._device.depth

    def _admitted(self, ticket: DecodeTicket) -> None:
        if not ticket.cancelled and ticket.toLaunch > 0:
            self._waiting.append(ticket)
            self._fillSlots()

    def _fillSlots(self) -> None:
        if self._waiting and not self._freeSlots:
            self._park()
        if self._waiting and self._freeSlots:
            self._charge()
        while self._waiting and self._freeSlots:
            ticket = self._waiting.popleft()
            ticket.slot = self._freeSlots.pop()
            self._running[ticket] = None

    def _park(self) -> None:
        """
        Free the slots of paused requests with nothing in flight or unsent,
        for the requests waiting: their last value is known (``seed``), so
        they can go on from it in any slot later.
        """
        paused = [ticket for ticket in self._running if ticket.paused]
        if not paused:
            return
        busy = {id(ticket) for step in self._inFlight for ticket in step.tickets}
        busy.update(id(ticket) for step in self._outbox for ticket in step.tickets)
        for ticket in paused:
            if len(self._freeSlots) >= len(self._waiting):
                break
            if id(ticket) not in busy:
                del self._running[ticket]
                self._freeSlots.append(ticket.slot)
                ticket.parked = ticket.fresh = True
                self._parked[ticket] = None

    def _unpark(self, ticket: DecodeTicket) -> None:
        del self._parked[ticket]
        ticket.parked = False
        self._waiting.append(ticket)
        self._fillSlots()

    def _charge(self) -> None:
        """End the current batch: charge its requests the steps launched with it."""
        batch = self._batch
        if batch is not None:
            launched = self._batchSteps
            for ticket in batch:
                ticket.toLaunch -= launched
            self._batch = None
            self._batchSteps = 0

    def _retire(self, ticket: DecodeTicket) -> None:
        """
        Free a request's slot for the next one at once: steps run in order,
        and a newcomer's first step starts its chain afresh (``FRESH``)
        whatever earlier steps left in the slot.
        """
        if ticket in self._running:
            del self._running[ticket]
            self._freeSlots.append(ticket.slot)
            self._fillSlots()

    def _leave(self, ticket: DecodeTicket) -> None:
        """A cancelled request: out of the batch, and nothing more delivered."""
        self._charge()
        ticket.gone = True
        self._retire(ticket)
        self._parked.pop(ticket, None)
        if ticket in self._waiting:
            self._waiting.remove(ticket)

    def _newBatch(self) -> list[DecodeTicket]:
        """The requests ready to advance (those of the first one's iteration count), in slot order of arrival."""
        ready = [ticket for ticket in self._running if not ticket.paused and ticket.toLaunch > 0]
        iters = ready[0].iters
        tickets = [ticket for ticket in ready if ticket.iters == iters]
        self._batch = tickets
        self._batchIters = iters
        self._batchEntries = [ticket.slot for ticket in tickets]
        self._batchLeft = min(ticket.toLaunch for ticket in tickets)
        if any(ticket.fresh for ticket in tickets):
            self._freshEntries = [ticket.slot | FRESH if ticket.fresh else ticket.slot for ticket in tickets]
            self._freshSeeds = [ticket.seed for ticket in tickets]
            for ticket in tickets:
                ticket.fresh = False
        return tickets

    def _launch(self) -> None:
        """Launch one step over the batch; end the batch when one of its requests has run out."""
        assert self._device is not None
        tickets = self._batch if self._batch is not None else self._newBatch()
        entries, seeds = self._freshEntries, self._freshSeeds
        urgent = entries is not None  # a first token
        if entries is None:
            entries = self._batchEntries
        else:
            self._freshEntries = self._freshSeeds = None
        ring = self._nextRing
        self._nextRing = (ring + 1) % self._device.depth
        self._device.launchStep(ring, self._batchIters, entries, seeds)
        self.steps += 1
        self._batchSteps += 1
        self._batchLeft -= 1
        finishing: list[DecodeTicket] = []
        if self._batchLeft == 0:
            self._charge()
            finishing = [ticket for ticket in tickets if ticket.toLaunch == 0]
            urgent = True  # a last token
        self._inFlight.append(_Step(ring, tickets, urgent, finishing))

    def _collect(self, block: bool) -> None:
        """Take completed steps in launch order (waiting for the oldest if ``block``)."""
        assert self._device is not None
        device = self._device
        if block and self._inFlight:
            device.waitStep(self._inFlight[0].ring)
        while self._inFlight and device.stepDone(self._inFlight[0].ring):
            step = self._inFlight.popleft()
            step.values = device.stepResults(step.ring, len(step.tickets))
            self._outbox.append(step)
            if step.urgent:
                self._urgent = True
            for ticket in step.finishing:
                self._retire(ticket)

    def _handOverDue(self) -> bool:
        """
        Hand over now, or gather another step first?  A first token (time to
        first token) and a last one (the request's end) go at once, as does
        everything once ``COALESCE_STEPS`` steps are gathered or nothing more
        is coming; a stream's middle tokens otherwise wait for a few more
        steps, so each wake-up of the reactor carries more of them.
        """
        return self._urgent or len(self._outbox) >= COALESCE_STEPS or not self._inFlight

    def _sendOutbox(self) -> None:
        """
        Hand the collected steps over as each request's values in order.
        Consecutive steps of one batch are turned from rows (a step's
        values) into columns (a request's) in one ``zip``, not token by token.
        """
        steps, self._outbox = self._outbox, []
        self._urgent = False
        perTicket: dict[DecodeTicket, list[int]] = {}
        start, count = 0, len(steps)
        while start < count:
            tickets = steps[start].tickets
            end = start + 1
            while end < count and steps[end].tickets is tickets:
                end += 1
            columns = zip(*[step.values for step in steps[start:end]], strict=True)
            for ticket, column in zip(tickets, columns, strict=True):
                if ticket.gone:
                    continue
                held = perTicket.get(ticket)
                if held is None:
                    perTicket[ticket] = list(column)
                else:
                    held.extend(column)
            start = end
        for ticket, values in perTicket.items():
            ticket.seed = values[-1]
        with self._lock:
            self._handOverPending = True
        self._reactor.callFromThread(self._handOver, list(perTicket.items()))

    def _abandonAll(self, reason: str) -> None:
        """
        Hand over what was computed, then fail every request not finished:
        each request the reactor admitted hears either all its tokens or a failure.
        """
        if self._outbox:
            self._sendOutbox()
        with self._lock:
            commands, self._commands = self._commands, []
            self._closedReason = reason
        tickets = list(self._running) + list(self._waiting) + list(self._parked)
        tickets += [ticket for command, ticket in commands if command is DecodeScheduler._admitted]
        self._running.clear()
        self._waiting.clear()
        self._parked.clear()
        self._inFlight.clear()
        if tickets:
            self._reactor.callFromThread(self._failAll, tickets, reason)
