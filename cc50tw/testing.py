"""
Tools for testing and measuring CC50 servers, in the spirit of
``twisted.internet.testing`` and ``treq.testing``: shipped with the package
so that tests, benchmarks and users' own suites share one implementation.

- ``SlowReader``: a client that stops reading (backpressure tests).
- ``TerminalFrameChecker``: the exactly-once terminal frame promise, checked
  frame by frame for every request on a connection; ``CheckingClient`` is a
  client connection built on it.
- ``run_soak`` / ``soak_server``: mixed traffic over many connections with
  random cancels and disconnects, every request checked by a
  ``TerminalFrameChecker``; ``ProcessSampler`` watches the server's RSS and
  open file descriptors meanwhile.  Any CC50 server can be pointed at them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from cc50tw.codec import (
    DoneStats,
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    Oversized,
    ProtocolError,
    decode_done,
    decode_error,
    encode_cancel,
    encode_credit,
    encode_infer,
)
from cc50tw.endpoints import client_description
from cc50tw.receiver import CC50Receiver, setTcpNoDelay
from cc50tw.stats import summarize


class SlowReader(Protocol):
    """
    A client that sends ``requests`` long requests at once and then reads
    nothing until ``startReading`` is called, checking on the way that every
    request gets exactly ``tokens`` chunks of ``token`` and one DONE after them.

    It stops reading by pausing its own transport, which closes the TCP
    window exactly as an application that never calls recv() does.
    """

    def __init__(self, requests: int, tokens: int, token: bytes) -> None:
        self.requests = requests
        self.tokens = tokens
        self.token = token
        self.decoder = FrameDecoder(1 << 20)
        self.chunks: dict[int, int] = {}
        self.done: dict[int, int] = {}
        self.problems: list[str] = []
        self.finished: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"".join(
                encode_infer(req_id, "slow", self.tokens, credit_bytes=0xFFFFFFFF)
                for req_id in range(1, self.requests + 1)
            )
        )
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def startReading(self) -> Deferred[None]:
        self.transport.resumeProducing()  # type: ignore[union-attr]
        return self.finished

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            assert isinstance(frame, Frame)
            if frame.type == MessageType.RESP_CHUNK:
                if frame.req_id in self.done:
                    self.problems.append(f"chunk after DONE for request {frame.req_id}")
                if frame.payload != self.token:
                    self.problems.append(f"unexpected chunk {frame.payload!r} for request {frame.req_id}")
                self.chunks[frame.req_id] = self.chunks.get(frame.req_id, 0) + 1
            elif frame.type == MessageType.RESP_DONE:
                self.done[frame.req_id] = decode_done(frame).tokens
                if len(self.done) == self.requests:
                    self.finished.callback(None)
            else:
                self.problems.append(f"unexpected frame type {frame.type} for request {frame.req_id}")

    def verify(self) -> list[str]:
        """Everything that went wrong; empty when every byte arrived in order."""
        problems = list(self.problems)
        expected = {req_id: self.tokens for req_id in range(1, self.requests + 1)}
        if self.chunks != expected:
            problems.append(f"chunk counts differ from {self.tokens} per request")
        if self.done != expected:
            problems.append(f"DONE token counts differ from {self.tokens} per request")
        return problems


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_fds(pid: int | str = "self") -> int:
    """Open file descriptors of a process, from /proc (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The largest RSS a process has had (``VmHWM``), from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class ProcessSampler:
    """RSS and open file descriptors of a (server) process, sampled on demand."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.peak_fds = 0
        self.samples = 0

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def fds(self) -> int:
        return open_fds(self.pid)

    def sample(self) -> tuple[int, int]:
        rss, fds = self.rss(), self.fds()
        self.peak_rss = max(self.peak_rss, rss, peak_rss_bytes(self.pid))
        self.peak_fds = max(self.peak_fds, fds)
        self.samples += 1
        return rss, fds


# Exactly-once terminal frames -----------------------------------------------------


@dataclass
class RequestRecord:
    """What one request has received so far, and what it was expected to receive."""

    req_id: int
    #: Tokens a DONE must report (None: not known, e.g. another backend).
    expected_tokens: int | None
    sent_at: float = 0.0
    ended_at: float | None = None
    chunk_frames: int = 0
    chunk_bytes: int = 0
    #: MessageType.RESP_DONE or RESP_ERR once the terminal frame came.
    terminal: int | None = None
    error_code: int | None = None
    error_message: str = ""
    done: DoneStats | None = None
    #: The client sent REQ_CANCEL: CANCELLED is then an expected outcome.
    cancel_sent: bool = False
    #: The client closed the connection with this request in flight, on purpose.
    abandoned: bool = False
    #: Given up on: no terminal frame within the client's deadline.
    timed_out: bool = False

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    @property
    def outcome(self) -> str:
        """``done``, the error code's name, ``abandoned`` or ``pending``."""
        if self.terminal == MessageType.RESP_DONE:
            return "done"
        if self.terminal == MessageType.RESP_ERR:
            try:
                return ErrorCode(self.error_code or 0).name
            except ValueError:
                return f"error {self.error_code}"
        return "abandoned" if self.abandoned else "pending"


class TerminalFrameChecker:
    """
    The protocol's central promise, checked frame by frame on one connection:
    every request gets exactly one terminal frame (RESP_DONE or RESP_ERR),
    nothing for that request follows it, and the chunk bytes agree with
    DONE's token count.

    Tell it about every request sent (``sent``; req_ids must not be reused on
    the connection, so that a late frame cannot pass for a new request's) and
    every frame received (``frame``).  Breaches go to ``problems``, as text.
    ``bytes_per_token`` is what every token weighs on the wire (6 for the toy
    backend's ``" token"``); None for backends whose tokens vary, which leaves
    the ordering checks.
    """

    def __init__(self, bytes_per_token: int | None = 6, label: str = "") -> None:
        self.bytes_per_token = bytes_per_token
        self.label = label
        self.requests: dict[int, RequestRecord] = {}
        self.problems: list[str] = []

    def _problem(self, text: str) -> None:
        self.problems.append(f"{self.label}{': ' if self.label else ''}{text}")

    def sent(self, req_id: int, expected_tokens: int | None = None, now: float | None = None) -> RequestRecord:
        if req_id in self.requests:
            raise ValueError(f"req_id {req_id} was already used on this connection")
        record = RequestRecord(req_id, expected_tokens, time.monotonic() if now is None else now)
        self.requests[req_id] = record
        return record

    def cancelled(self, req_id: int) -> None:
        record = self.requests.get(req_id)
        if record is not None and not record.finished:
            record.cancel_sent = True

    def frame(self, frame: Frame) -> RequestRecord | None:
        """Account one frame from the server; returns its request's record, if it has one."""
        record = self.requests.get(frame.req_id)
        if record is None:
            if frame.type == MessageType.RESP_ERR:
                error = decode_error(frame)
                self._problem(f"RESP_ERR for req_id {frame.req_id}, never sent: {error.code} {error.message!r}")
            else:
                self._problem(f"frame type {frame.type} for req_id {frame.req_id}, never sent")
            return None
        if record.abandoned:
            return record  # in flight when we closed: whatever the server managed to send
        if record.finished:
            what = "a chunk" if frame.type == MessageType.RESP_CHUNK else f"a second terminal frame (type {frame.type})"
            self._problem(f"request {frame.req_id}: {what} after its {record.outcome} terminal frame")
            return record
        if frame.type == MessageType.RESP_CHUNK:
            record.chunk_frames += 1
            record.chunk_bytes += len(frame.payload)
            if not frame.payload:
                self._problem(f"request {frame.req_id}: an empty RESP_CHUNK")
            self._checkBound(record)
        elif frame.type == MessageType.RESP_DONE:
            record.terminal = frame.type
            record.ended_at = time.monotonic()
            try:
                record.done = done = decode_done(frame)
            except ProtocolError as e:
                self._problem(f"request {frame.req_id}: undecodable RESP_DONE: {e.message}")
                return record
            if record.expected_tokens is not None and done.tokens != record.expected_tokens:
                self._problem(
                    f"request {frame.req_id}: DONE says {done.tokens} tokens, expected {record.expected_tokens}"
                )
            if done.generated_tokens is not None and done.generated_tokens != done.tokens:
                self._problem(f"request {frame.req_id}: DONE tokens {done.tokens} != generated {done.generated_tokens}")
            if self.bytes_per_token is not None and record.chunk_bytes != done.tokens * self.bytes_per_token:
                self._problem(
                    f"request {frame.req_id}: {record.chunk_bytes} chunk bytes for a DONE of {done.tokens} tokens "
                    f"({self.bytes_per_token} bytes each)"
                )
        elif frame.type == MessageType.RESP_ERR:
            record.terminal = frame.type
            record.ended_at = time.monotonic()
            error = decode_error(frame)
            record.error_code, record.error_message = error.code, error.message
        else:
            self._problem(f"request {frame.req_id}: unexpected frame type {frame.type}")
        return record

    def _checkBound(self, record: RequestRecord) -> None:
        if self.bytes_per_token is None or record.expected_tokens is None:
            return
        limit = record.expected_tokens * self.bytes_per_token
        if record.chunk_bytes > limit:
            self._problem(f"request {record.req_id}: {record.chunk_bytes} chunk bytes, more than {limit} possible")

    def abandon(self) -> list[RequestRecord]:
        """The client is closing the connection on purpose: what is in flight is abandoned, not lost."""
        pending = self.pending()
        for record in pending:
            record.abandoned = True
        return pending

    def pending(self) -> list[RequestRecord]:
        """Requests still waiting for their terminal frame (abandoned ones excluded)."""
        return [r for r in self.requests.values() if not r.finished and not r.abandoned]


class CheckingClient(CC50Receiver):
    """
    A client connection that holds the server to the exactly-once promise:
    every frame goes through a ``TerminalFrameChecker``, and ``finished``
    fires when a request has its terminal frame (or the connection is lost).
    It never grants credit: each request's window is its ``credit_bytes``.
    """

    MAX_LENGTH = 16 << 20

    def __init__(self, bytes_per_token: int | None = None) -> None:
        self.checker = TerminalFrameChecker(bytes_per_token)
        self.ids = itertools.count(1)
        self.lost: Deferred[None] = Deferred()
        self.closedBy: Failure | None = None
        self._waiters: dict[int, list[Deferred[RequestRecord]]] = {}

    def connectionMade(self) -> None:
        setTcpNoDelay(self.transport)

    def infer(
        self, prompt: str, max_tokens: int, credit_bytes: int = 0, expected_tokens: int | None = None
    ) -> RequestRecord:
        req_id = next(self.ids)
        record = self.checker.sent(req_id, expected_tokens)
        self.transport.write(encode_infer(req_id, prompt, max_tokens, credit_bytes))  # type: ignore[union-attr]
        return record

    def cancel(self, req_id: int) -> None:
        self.checker.cancelled(req_id)
        self.transport.write(encode_cancel(req_id))  # type: ignore[union-attr]

    def finished(self, record: RequestRecord) -> Deferred[RequestRecord]:
        """Fires with ``record`` once it has its terminal frame, or once the connection is gone."""
        if record.finished or self.closedBy is not None:
            done: Deferred[RequestRecord] = Deferred()
            done.callback(record)
            return done
        waiter: Deferred[RequestRecord] = Deferred()
        self._waiters.setdefault(record.req_id, []).append(waiter)
        return waiter

    def frameReceived(self, frame: Frame) -> None:
        record = self.checker.frame(frame)
        if record is not None and record.finished:
            for waiter in self._waiters.pop(record.req_id, []):
                waiter.callback(record)

    def lengthLimitExceeded(self, header: Oversized) -> None:
        self.checker.problems.append(f"server sent a {header.length}-byte frame")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def streamCorrupted(self, error: ProtocolError) -> None:
        self.checker.problems.append(f"server stream corrupted: {error.message}")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closedBy = reason
        waiters, self._waiters = self._waiters, {}
        for req_id, pending in waiters.items():
            for waiter in pending:
                waiter.callback(self.checker.requests[req_id])
        self.lost.callback(None)


# Soak --------------------------------------------------------------------------------


@dataclass
class SoakConfig:
    """Mixed traffic: how much, and how hostile."""

    connections: int = 500
    seconds: float = 60.0
    seed: int = 8
    #: Mean pause (exponential) between one connection's actions: with 500
    #: connections, 2 s gives about 250 actions per second in all.
    think_seconds: float = 2.0
    #: Ordinary requests ask for 1..max_tokens tokens (a few ask for 0: the server's default).
    max_tokens: int = 200
    #: The server's --max-tokens, what a request for 0 tokens gets.
    default_max_tokens: int = 256
    #: Tokens of the requests that are cancelled or abandoned (they must still be streaming then).
    long_tokens: int = 20_000
    cancel_probability: float = 0.08
    disconnect_probability: float = 0.03
    credit_probability: float = 0.10
    #: A request without its terminal frame this long after it was sent is lost.
    request_timeout: float = 30.0
    bytes_per_token: int | None = 6


@dataclass
class SoakStats:
    """What a soak did and saw; ``failures`` lists everything that must not happen."""

    actions: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    cancels_sent: int = 0
    disconnects: int = 0
    connections_opened: int = 0
    unexpected_closes: int = 0
    unexpected_errors: int = 0
    lost: int = 0
    chunk_bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        found = list(self.problems)
        if self.unexpected_closes:
            found.append(f"{self.unexpected_closes} connections closed by the server")
        if self.unexpected_errors:
            found.append(f"{self.unexpected_errors} requests ended with an error nobody caused")
        if self.lost:
            found.append(f"{self.lost} requests lost (no terminal frame)")
        return found

    def lines(self) -> list[str]:
        latency = summarize(self.latencies_ms)
        outcomes = ", ".join(f"{name}={count}" for name, count in sorted(self.outcomes.items()))
        actions = ", ".join(f"{name}={count}" for name, count in sorted(self.actions.items()))
        return [
            f"soak: {self.seconds:.0f}s, {self.connections_opened} connections opened, {self.requests} requests "
            f"({self.requests / max(self.seconds, 1e-9):.0f}/s), {self.chunk_bytes / 1e6:.1f} MB of chunks",
            f"  actions: {actions}",
            f"  outcomes: {outcomes}",
            f"  injected: {self.cancels_sent} cancels, {self.disconnects} disconnects",
            f"  ordinary request latency: p50 {latency.p50:.2f} ms, p99 {latency.p99:.2f} ms, max {latency.maximum:.2f} ms",
            f"  unexpected closes {self.unexpected_closes}, unexpected errors {self.unexpected_errors}, "
            f"lost {self.lost}, protocol problems {len(self.problems)}",
        ]


@dataclass
class _Active:
    """Client-side state of one request in flight."""

    record: RequestRecord
    window: int = 0  # credit window to grant back as chunks arrive; 0: never grant
    ungranted: int = 0
    cancel_after: int | None = None  # send REQ_CANCEL once this many chunk bytes came
    disconnect_after: int | None = None  # close the connection once this many chunk bytes came
    ordinary: bool = False


class SoakConnection(CC50Receiver):
    """One soak connection: one action at a time, each checked by a ``TerminalFrameChecker``."""

    MAX_LENGTH = 16 << 20

    def __init__(self, driver: SoakDriver, number: int) -> None:
        self.driver = driver
        self.number = number
        self.checker = TerminalFrameChecker(driver.config.bytes_per_token, label=f"connection {number}")
        self.ids = itertools.count(1)
        self.active: dict[int, _Active] = {}
        self.timer: IDelayedCall | None = None
        self.closing = False  # we closed it (injected disconnect, or the end of the soak)
        self.lost: Deferred[None] = Deferred()

    # Lifecycle

    def connectionMade(self) -> None:
        setTcpNoDelay(self.transport)
        self.driver.opened(self)
        self.schedule(self.driver.rng.uniform(0, self.driver.config.think_seconds))

    def schedule(self, delay: float) -> None:
        self.timer = self.driver.reactor.callLater(delay, self.act)

    def close(self, abort: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.driver.stats.outcomes["abandoned"] += len(self.checker.abandon())
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if not self.closing:
            self.driver.stats.unexpected_closes += 1
            self.checker.problems.append(
                f"connection {self.number}: closed by the server ({reason.getErrorMessage()}) "
                f"with {len(self.checker.pending())} requests in flight"
            )
        self.driver.closed(self)
        self.lost.callback(None)

    # Traffic

    def act(self) -> None:
        self.timer = None
        driver, config, rng = self.driver, self.driver.config, self.driver.rng
        if driver.stopping:
            self.close()
            return
        draw = rng.random()
        if draw < config.cancel_probability:
            driver.stats.actions["cancel"] += 1
            cancel_after = rng.choice([0, rng.randint(1, 8000)])
            self.infer(config.long_tokens, window=4096, cancel_after=cancel_after)
        elif draw < config.cancel_probability + config.disconnect_probability:
            driver.stats.actions["disconnect"] += 1
            after = rng.choice([0, rng.randint(1, 20000)])
            for _ in range(rng.randint(1, 2)):
                self.infer(config.long_tokens, disconnect_after=after or None)
            if not after:
                self.close(abort=rng.random() < 0.5)  # before any answer: maybe before the server read the requests
        elif draw < config.cancel_probability + config.disconnect_probability + config.credit_probability:
            driver.stats.actions["credit"] += 1
            window = rng.choice([1, 16, 64, 600])
            for _ in range(rng.randint(1, 2)):
                tokens = rng.randint(1, 20 if window == 1 else config.max_tokens)
                self.infer(tokens, window=window, ordinary=True)
        else:
            driver.stats.actions["burst"] += 1
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                tokens = 0 if rng.random() < 0.05 else rng.randint(1, config.max_tokens)
                self.infer(tokens, ordinary=True)

    def infer(
        self,
        max_tokens: int,
        window: int = 0,
        cancel_after: int | None = None,
        disconnect_after: int | None = None,
        ordinary: bool = False,
    ) -> None:
        config = self.driver.config
        req_id = next(self.ids)
        expected = max_tokens or config.default_max_tokens
        record = self.checker.sent(req_id, expected)
        self.active[req_id] = _Active(record, window, 0, cancel_after, disconnect_after, ordinary)
        self.driver.stats.requests += 1
        prompt = " ".join(self.driver.rng.choice(_WORDS) for _ in range(self.driver.rng.randint(1, 12)))
        self.transport.write(encode_infer(req_id, prompt, max_tokens, window))  # type: ignore[union-attr]
        if cancel_after == 0:
            self.cancel(req_id)

    def cancel(self, req_id: int) -> None:
        self.checker.cancelled(req_id)
        self.driver.stats.cancels_sent += 1
        self.transport.write(encode_cancel(req_id))  # type: ignore[union-attr]

    def frameReceived(self, frame: Frame) -> None:
        if self.closing:
            return
        record = self.checker.frame(frame)
        state = self.active.get(frame.req_id)
        if record is None or state is None:
            return
        if frame.type == MessageType.RESP_CHUNK:
            self.driver.stats.chunk_bytes += len(frame.payload)
            if state.window:
                state.ungranted += len(frame.payload)
                if state.ungranted >= max(1, state.window // 2):
                    self.transport.write(encode_credit(frame.req_id, state.ungranted))  # type: ignore[union-attr]
                    state.ungranted = 0
            if state.cancel_after is not None and not record.cancel_sent and record.chunk_bytes >= state.cancel_after:
                self.cancel(frame.req_id)
            if state.disconnect_after is not None and record.chunk_bytes >= state.disconnect_after:
                self.close(abort=self.driver.rng.random() < 0.5)
                return
        if record.finished:
            del self.active[frame.req_id]
            self.driver.ended(record, state.ordinary, self.checker.label)
            if not self.active:
                if self.driver.stopping:
                    self.close()
                else:
                    self.schedule(self.driver.rng.expovariate(1.0 / self.driver.config.think_seconds))

    def lengthLimitExceeded(self, header: Oversized) -> None:
        self.checker.problems.append(f"connection {self.number}: server sent a {header.length}-byte frame")
        self.close(abort=True)

    def streamCorrupted(self, error: ProtocolError) -> None:
        self.checker.problems.append(f"connection {self.number}: server stream corrupted: {error.message}")
        self.close(abort=True)


_WORDS = ["alpha", "beta", "gamma", "delta", "soak", "token", "stream", "credit", "cancel", "ünïcode", "日本"]


#: Latencies a soak keeps (a uniform sample, so that hours of soak stay small).
LATENCY_SAMPLES = 100_000


class SoakDriver:
    """Keeps ``config.connections`` connections busy until the time is up, then closes them."""

    def __init__(self, reactor: Any, endpoint: str, config: SoakConfig) -> None:
        self.reactor = reactor
        self.endpoint = clientFromString(reactor, client_description(endpoint))
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = SoakStats()
        self.stopping = False
        self.open: set[SoakConnection] = set()
        self.checkers: list[TerminalFrameChecker] = []
        self._numbers = itertools.count()
        self._reconnects: set[IDelayedCall] = set()
        self.connecting = 0
        self._latencies_seen = 0
        self._sampling = random.Random(config.seed)

    def opened(self, connection: SoakConnection) -> None:
        self.stats.connections_opened += 1
        self.open.add(connection)

    def closed(self, connection: SoakConnection) -> None:
        self.open.discard(connection)
        if connection.closing and not self.stopping:
            # An injected disconnect: come back a little later, as a client would.
            call = self.reactor.callLater(self.rng.uniform(0.05, 0.5), self._reconnect)
            self._reconnects.add(call)
            self.stats.disconnects += 1

    def _reconnect(self) -> None:
        self._reconnects = {call for call in self._reconnects if call.active()}
        if not self.stopping:
            self.connect()

    def ended(self, record: RequestRecord, ordinary: bool, label: str) -> None:
        outcome = record.outcome
        self.stats.outcomes[outcome] += 1
        if outcome == "done":
            if ordinary and record.ended_at is not None:
                self._latency((record.ended_at - record.sent_at) * 1e3)
        elif not (outcome == "CANCELLED" and record.cancel_sent):
            self.stats.unexpected_errors += 1
            self.stats.problems.append(f"{label}: request {record.req_id}: {outcome}: {record.error_message}")

    def _latency(self, ms: float) -> None:
        """Keep a uniform sample of at most ``LATENCY_SAMPLES`` latencies, however long the soak."""
        self._latencies_seen += 1
        samples = self.stats.latencies_ms
        if len(samples) < LATENCY_SAMPLES:
            samples.append(ms)
        else:
            slot = self._sampling.randrange(self._latencies_seen)
            if slot < LATENCY_SAMPLES:
                samples[slot] = ms

    def connect(self) -> Deferred[SoakConnection]:
        connection = SoakConnection(self, next(self._numbers))
        self.checkers.append(connection.checker)
        self.connecting += 1
        connecting: Deferred[SoakConnection] = connectProtocol(self.endpoint, connection)

        def connected(result: SoakConnection) -> SoakConnection:
            self.connecting -= 1
            return result

        def failed(failure: Failure) -> None:
            self.connecting -= 1
            self.stats.problems.append(f"could not connect: {failure.getErrorMessage()}")

        connecting.addCallbacks(connected, failed)
        return connecting

    def sweep(self) -> None:
        """Give up on requests past their deadline: they are lost."""
        now = time.monotonic()
        for checker in self.checkers:
            for record in checker.pending():
                if not record.timed_out and now - record.sent_at > self.config.request_timeout:
                    record.timed_out = True
                    self.stats.lost += 1
                    checker.problems.append(
                        f"{checker.label}: request {record.req_id} has no terminal frame after "
                        f"{self.config.request_timeout:g}s ({record.chunk_bytes} chunk bytes so far)"
                    )

    async def run(self, sample: Callable[[], object] | None = None) -> SoakStats:
        started = time.monotonic()
        sweeper = LoopingCall(self._tick, sample)
        sweeper.clock = self.reactor
        sweeper.start(1.0, now=True)
        try:
            for start in range(0, self.config.connections, 50):
                # Connect in groups, so the listen backlog never overflows.
                for _ in range(min(50, self.config.connections - start)):
                    self.connect()
                await deferLater(self.reactor, 0.05, lambda: None)
            await deferLater(self.reactor, max(0.0, self.config.seconds - (time.monotonic() - started)), lambda: None)
            self.stopping = True
            for call in self._reconnects:
                if call.active():
                    call.cancel()
            for connection in list(self.open):
                if not connection.active:
                    connection.close()
            # Those mid-action close when it ends; wait for them, up to the request deadline.
            deadline = time.monotonic() + self.config.request_timeout + 5
            while (self.open or self.connecting) and time.monotonic() < deadline:
                await deferLater(self.reactor, 0.1, lambda: None)
                self.sweep()
            for connection in list(self.open):
                connection.checker.problems.append(f"connection {connection.number}: still open at the end")
                connection.close(abort=True)
        finally:
            sweeper.stop()
        self.sweep()
        self.stats.lost += sum(1 for c in self.checkers for r in c.pending() if not r.timed_out)
        for checker in self.checkers:
            self.stats.problems.extend(checker.problems)
        self.stats.seconds = time.monotonic() - started
        return self.stats

    def _tick(self, sample: Callable[[], object] | None) -> None:
        self.sweep()
        if sample is not None:
            sample()


async def run_soak(
    reactor: Any, endpoint: str, config: SoakConfig, sample: Callable[[], object] | None = None
) -> SoakStats:
    """Run one soak against the server at ``endpoint``; ``sample`` is called once a second."""
    return await SoakDriver(reactor, endpoint, config).run(sample)


@dataclass
class SoakReport:
    """A soak with a warm-up, and the server's resources before, during and after."""

    warmup: SoakStats
    main: SoakStats
    cold_rss: int
    cold_fds: int
    baseline_rss: int
    baseline_fds: int
    peak_rss: int
    peak_fds: int
    final_rss: int
    final_fds: int

    def lines(self) -> list[str]:
        mib = 1 << 20
        return self.main.lines() + [
            f"  server RSS: cold {self.cold_rss / mib:.1f} MiB, baseline after warm-up {self.baseline_rss / mib:.1f} MiB, "
            f"peak {self.peak_rss / mib:.1f} MiB, after {self.final_rss / mib:.1f} MiB "
            f"({(self.final_rss - self.baseline_rss) / mib:+.1f})",
            f"  server open fds: cold {self.cold_fds}, baseline {self.baseline_fds}, peak {self.peak_fds}, "
            f"after {self.final_fds}",
        ]


#: How far a soak's final RSS may end above its post-warm-up baseline.  The
#: measured growth is well under 1 MiB (benchmarks/RESULTS.md); a leak of even
#: 1 KiB per request exceeds this within a few minutes of soak.
SOAK_RSS_TOLERANCE = 16 << 20
#: How many more open descriptors than at the baseline a soak may leave (none expected).
SOAK_FD_TOLERANCE = 0


def soak_failures(
    report: SoakReport, rss_tolerance: int = SOAK_RSS_TOLERANCE, fd_tolerance: int = SOAK_FD_TOLERANCE
) -> list[str]:
    """Everything that went wrong: the warm-up's and the soak's failures, then the resources."""
    failures = report.warmup.failures + report.main.failures
    if report.final_fds > report.baseline_fds + fd_tolerance:
        failures.append(f"server has {report.final_fds} open fds after the soak, baseline {report.baseline_fds}")
    if report.final_rss > report.baseline_rss + rss_tolerance:
        failures.append(
            f"server RSS {report.final_rss / (1 << 20):.1f} MiB after the soak, baseline "
            f"{report.baseline_rss / (1 << 20):.1f} MiB (tolerance {rss_tolerance >> 20} MiB)"
        )
    return failures


async def settle(reactor: Any, sampler: ProcessSampler, fds: int, timeout: float = 15.0) -> int:
    """Wait (up to ``timeout``) until the process has at most ``fds`` open; returns what it has."""
    deadline = time.monotonic() + timeout
    current = sampler.fds()
    while current > fds and time.monotonic() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
        current = sampler.fds()
    return current


async def soak_server(
    reactor: Any, endpoint: str, pid: int, config: SoakConfig, warmup_seconds: float = 10.0
) -> SoakReport:
    """
    Warm up (the same traffic, ``warmup_seconds``), take the baseline once
    every connection is closed, soak, and measure again once it has closed.

    The baseline comes after the warm-up because a fresh process has not yet
    grown its allocator's pools and caches to their working size; growth from
    there on is what a leak looks like.
    """
    sampler = ProcessSampler(pid)
    cold_rss, cold_fds = sampler.sample()
    warm = await run_soak(
        reactor,
        endpoint,
        dataclasses.replace(config, seconds=warmup_seconds, seed=config.seed + 1),
        sampler.sample,
    )
    baseline_fds = await settle(reactor, sampler, cold_fds)
    await deferLater(reactor, 0.5, lambda: None)
    baseline_rss, baseline_fds = sampler.sample()
    main = await run_soak(reactor, endpoint, config, sampler.sample)
    final_fds = await settle(reactor, sampler, baseline_fds)
    await deferLater(reactor, 0.5, lambda: None)
    final_rss, final_fds = sampler.sample()
    return SoakReport(
        warm,
        main,
        cold_rss,
        cold_fds,
        baseline_rss,
        baseline_fds,
        sampler.peak_rss,
        sampler.peak_fds,
        final_rss,
        final_fds,
    )
