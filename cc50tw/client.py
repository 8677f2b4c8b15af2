"""
The CC50 client library.

``connect`` gives a ``CC50Client`` over any endpoint string (or ``HOST:PORT``);
``client.infer`` starts a request and returns a ``Response`` that can be
consumed three ways: ``async for text in response`` (under ``ensureDeferred``),
``response.onChunk = callback``, or ``response.collect()`` for the whole text
and the DONE statistics.  Many requests run concurrently on one connection.

Generation options (``model=``, ``temperature=``, ``stop=``...) are checked
when ``infer`` is called, so a typo or a value out of range is an
``OptionsError`` at the line that made it, not a BAD_REQUEST a round trip
later; ``client.capabilities()`` says which of them the server honours and
which models it serves.  A request that carried options gets its finish
reason ("stop", "length") in ``stats.finish_reason``.

Credit is granted back to the server as the application consumes text, so a
consumer that stops reading stops the server's backend for that request, and
nothing piles up in the client without bound.

Nothing waits forever unless asked to: ``connect(..., timeout=)`` bounds the
connection (and the HELLO), ``infer(..., timeout=)`` one request's whole life;
a request that runs out of time is cancelled on the wire (REQ_CANCEL) and
fails with ``ClientTimeout``.  ``response.cancel()`` stops the request at once
on this side too: text already buffered is dropped.
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import numbers
import random as _random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, fail, gatherResults, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from cc50tw.codec import (
    DEFAULT_CREDIT_BYTES,
    DoneStats,
    ErrorCode,
    Frame,
    MessageType,
    Oversized,
    ProtocolError,
    decode_done,
    decode_error,
    encode_cancel,
    encode_credit,
    encode_hello,
    encode_infer,
)
from cc50tw.endpoints import client_description
from cc50tw.errors import ClientError
from cc50tw.generation import GenerationOptions, OptionsError, encodeOptions
from cc50tw.receiver import CC50Receiver, setTcpNoDelay

_utf8Decoder = codecs.getincrementaldecoder("utf-8")


class ClientTimeout(ClientError):
    """
    No answer in time: raised by this library, not sent by the server, so it
    carries the TIMEOUT code (for code that handles every ``ClientError``
    alike) and reads as what happened.  ``req_id`` is 0 for a connection
    that timed out.
    """

    def __init__(self, req_id: int, seconds: float, message: str) -> None:
        super().__init__(req_id, ErrorCode.TIMEOUT, message)
        self.seconds = seconds

    def __str__(self) -> str:
        return self.message


def _cancelledByClient(req_id: int) -> ClientError:
    return ClientError(req_id, ErrorCode.CANCELLED, "cancelled by the client")


class Completion(NamedTuple):
    text: str
    stats: DoneStats

    @property
    def finish_reason(self) -> str | None:
        """
        Why generation stopped ("stop", "length", ...); ``None`` unless the
        request carried generation options, since only then does the server
        know this client reads the field.
        """
        return self.stats.finish_reason


class Capabilities(NamedTuple):
    """
    What the server's HELLO reply says about it (docs/protocol.md, "Capabilities").

    An older server's reply is its name alone: then ``options`` is empty and
    ``models`` is ``None`` ("not said", as opposed to an empty list).
    """

    #: The server's name and version, ``cc50tw/0.1.0``.
    name: str
    #: The generation options its backend honours, by wire name; any other is refused.
    options: tuple[str, ...] = ()
    #: The models it serves, or ``None`` when it does not say.
    models: tuple[str, ...] | None = None
    #: The whole capabilities object, so keys newer than this client are not lost.
    details: Mapping[str, Any] = {}


def _names(value: object) -> tuple[str, ...] | None:
    """A JSON list of strings as a tuple; ``None`` for anything else, which a newer or odd server may send."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return tuple(value)


def parseHello(payload: bytes) -> Capabilities:
    """
    A server's HELLO payload: its name, then optionally a newline and a JSON
    object.  Never raises: what cannot be read is treated as not said, so a
    server that is older (name only) or newer (other keys) still answers.
    """
    nameBytes, _, rest = payload.partition(b"\n")
    name = nameBytes.decode("utf-8", "replace").strip()
    try:
        details = json.loads(rest.decode("utf-8")) if rest.strip() else {}
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; a hostile server may nest deeply
        details = {}
    if not isinstance(details, dict):
        details = {}
    return Capabilities(name, _names(details.get("options")) or (), _names(details.get("models")), details)


def generationOptions(
    options: GenerationOptions | None = None,
    *,
    model: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    system: str | None = None,
    repeat_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> GenerationOptions:
    """
    ``options`` with the keyword arguments that are not ``None`` set on it:
    ``infer``'s options, checked (``OptionsError`` naming the option) and
    encoded to make sure they fit, so nothing is sent that the server would
    refuse for its form.  ``stop`` may be one string.
    """
    given: dict[str, Any] = {
        name: value
        for name, value in (
            ("model", model),
            ("temperature", temperature),
            ("top_p", top_p),
            ("top_k", top_k),
            ("min_p", min_p),
            ("seed", seed),
            ("system", system),
            ("repeat_penalty", repeat_penalty),
            ("presence_penalty", presence_penalty),
            ("frequency_penalty", frequency_penalty),
            ("extra", extra),
        )
        if value is not None
    }
    if stop is not None:
        # One string is one stop string, as OpenAI's API takes it; iterating it would give its characters.
        try:
            given["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        except TypeError:
            raise OptionsError(f"option 'stop' must be a string or a list of strings, got {stop!r}") from None
    if options is None:
        options = GenerationOptions()
    elif not isinstance(options, GenerationOptions):
        raise TypeError(f"options must be a GenerationOptions, not {type(options).__name__}")
    try:
        result = attrs.evolve(options, **given) if given else options
    except TypeError as e:  # attrs' own complaint about an argument
        raise OptionsError(f"options: {e}") from None
    encodeOptions(result)  # OptionsError when the block is too large
    return result


class Response:
    """One request's answer as it arrives."""

    def __init__(self, client: CC50ClientProtocol, req_id: int, window: int) -> None:
        self.req_id = req_id
        self._stats: DoneStats | None = None
        self._doneWaiters: list[Deferred[DoneStats]] = []
        self.startedAt = time.perf_counter()
        self.firstChunkAt: float | None = None
        self.finishedAt: float | None = None
        self.chunkFrames = 0
        self.chunkBytes = 0
        self._client = client
        self._window = window
        self._ungranted = 0
        #: An incremental UTF-8 decoder while a character is split across
        #: chunks (or a chunk is not valid UTF-8); None on the fast path.
        self._decoder: codecs.IncrementalDecoder | None = None
        self._queue: deque[tuple[str, int]] = deque()
        self._waiter: Deferred[None] | None = None
        self._finished = False
        self._failure: Failure | None = None
        self._onChunk: Callable[[str], object] | None = None
        #: Set by ``cancel()``: nothing more is delivered, iteration raises.
        self._cancelled = False
        self._timeoutCall: IDelayedCall | None = None

    # Consumption -----------------------------------------------------------

    @property
    def onChunk(self) -> Callable[[str], object] | None:
        return self._onChunk

    @onChunk.setter
    def onChunk(self, callback: Callable[[str], object] | None) -> None:
        """Deliver text to ``callback`` as it arrives (text already queued first)."""
        self._onChunk = callback
        if callback is not None:
            while self._queue:
                text, size = self._queue.popleft()
                callback(text)
                self._consumed(size)

    @property
    def done(self) -> Deferred[DoneStats]:
        """
        Fires with the DONE statistics, or fails with ``ClientError``.

        Each access gives a new Deferred, so one caller consuming the result
        (or the error) never leaves another with nothing, and an error that
        nobody asked for is not logged as unhandled.
        """
        if self._finished:
            if self._failure is not None:
                return fail(self._failure)
            assert self._stats is not None
            return succeed(self._stats)
        waiter: Deferred[DoneStats] = Deferred()
        self._doneWaiters.append(waiter)
        return waiter

    def collect(self) -> Deferred[Completion]:
        parts: list[str] = []
        self.onChunk = parts.append
        return self.done.addCallback(lambda stats: Completion("".join(parts), stats))

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> str:
        while not self._queue:
            if self._cancelled:
                self._raiseCancelled()
            if self._finished:
                if self._failure is not None:
                    self._failure.raiseException()
                raise StopAsyncIteration
            self._waiter = Deferred()
            await self._waiter
        text, size = self._queue.popleft()
        self._consumed(size)
        return text

    def _raiseCancelled(self) -> None:
        """After ``cancel()``: the request's own error if it had one (a timeout, say), else CANCELLED."""
        if self._failure is not None:
            self._failure.raiseException()
        raise _cancelledByClient(self.req_id)

    def cancel(self) -> None:
        """
        Stop the request.  The server is asked to stop its work (REQ_CANCEL);
        on this side it stops at once: text already buffered is dropped,
        nothing more reaches ``onChunk``, and iterating raises ``ClientError``
        CANCELLED.  ``done`` still gives the server's verdict: CANCELLED, or
        the DONE statistics if the request finished before the cancel arrived.
        """
        if self._cancelled:
            return
        self._cancelled = True
        self._queue.clear()
        if not self._finished:
            self._client.sendFrame(encode_cancel(self.req_id))
        self._wake()

    def _timedOut(self, seconds: float) -> None:
        """
        The request's ``timeout`` ran out: cancel it on the wire (the server
        frees its slot), and fail it here now, without waiting for the
        server's reply, which may never come.
        """
        self._timeoutCall = None
        if self._finished:
            return
        if not self._cancelled:  # else the REQ_CANCEL is already on its way
            self._client.sendFrame(encode_cancel(self.req_id))
        self._client._forget(self.req_id)
        self._cancelled = True  # anything still queued is dropped; iteration raises the timeout
        self._queue.clear()
        self._finish(None, Failure(ClientTimeout(self.req_id, seconds, f"no answer within {seconds:g} s")))

    # From the protocol -----------------------------------------------------

    def _consumed(self, size: int) -> None:
        """Return credit in batches of half a window, so grants stay rare."""
        self._ungranted += size
        if self._ungranted >= self._window // 2 and not self._finished and not self._cancelled:
            self._client.sendFrame(encode_credit(self.req_id, self._ungranted))
            self._ungranted = 0

    def _chunkReceived(self, payload: bytes) -> None:
        # Called once per chunk frame, so written for speed: see the work log
        # in benchmarks/README.md for what each shortcut measured.
        if self._cancelled:
            return  # the application asked to stop: nothing more for it
        if self.firstChunkAt is None:
            self.firstChunkAt = time.perf_counter()
        size = len(payload)
        self.chunkFrames += 1
        self.chunkBytes += size
        decoder = self._decoder
        if decoder is None:
            try:
                # Whole characters (nearly every chunk): what the incremental
                # decoder would give from its empty state, at a quarter of the cost.
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                decoder = self._decoder = _utf8Decoder("replace")
                text = decoder.decode(payload)
                if not decoder.getstate()[0]:
                    self._decoder = None
        else:
            text = decoder.decode(payload)
            if not decoder.getstate()[0]:
                self._decoder = None  # no partial character held: back to the fast path
        onChunk = self._onChunk
        if onChunk is not None:
            onChunk(text)
            # _consumed, inlined
            self._ungranted += size
            if self._ungranted >= self._window // 2 and not self._finished:
                self._client.sendFrame(encode_credit(self.req_id, self._ungranted))
                self._ungranted = 0
        else:
            self._queue.append((text, size))
            self._wake()

    def _finish(self, stats: DoneStats | None, failure: Failure | None) -> None:
        self._finished = True
        self.finishedAt = time.perf_counter()
        timeoutCall, self._timeoutCall = self._timeoutCall, None
        if timeoutCall is not None and timeoutCall.active():
            timeoutCall.cancel()
        tail = self._decoder.decode(b"", final=True) if self._decoder is not None else ""
        if tail and not self._cancelled:
            self._queue.append((tail, 0))
            if self._onChunk is not None:
                self._onChunk(tail)
        self._failure = failure
        self._stats = stats
        self._wake()
        waiters, self._doneWaiters = self._doneWaiters, []
        for waiter in waiters:
            if failure is not None:
                waiter.errback(failure)
            elif stats is not None:
                waiter.callback(stats)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)


class CC50ClientProtocol(CC50Receiver):
    """A client connection; create requests with ``infer``."""

    MAX_LENGTH = 16 << 20

    def __init__(self, clock: IReactorTime | None = None) -> None:
        """
        ``clock`` schedules request timeouts (``connect`` passes its reactor);
        without one, the global reactor is used when a timeout is asked for.
        """
        self.clock = clock
        self._chunkReceiver = self._chunkArrived
        self._responses: dict[int, Response] = {}
        self._ids = itertools.count(1)
        self._closed: Failure | None = None
        #: Those waiting for the server's HELLO reply (``hello``, ``capabilities``).
        self._helloWaiters: list[Deferred[bytes]] = []
        #: The server's last HELLO payload: its name and capabilities, which do
        #: not change while the connection lasts, so they are asked for once.
        self.helloPayload: bytes | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        setTcpNoDelay(self.transport)

    def hello(self, token: bytes) -> Deferred[bytes]:
        """
        Send HELLO with ``token`` (the server's shared secret, or empty when
        it has none); fires with the server's reply: its name, and after a
        newline its capabilities (``parseHello`` reads them).
        """
        waiter = self._waitForHello()
        self.sendFrame(encode_hello(token))
        return waiter

    def _waitForHello(self) -> Deferred[bytes]:
        def forget(waiter: Deferred[bytes]) -> None:
            # Cancelled (a timeout): the reply, if it comes, is for the others.
            if waiter in self._helloWaiters:
                self._helloWaiters.remove(waiter)

        if self._closed is not None:
            return fail(self._closed)
        waiter: Deferred[bytes] = Deferred(forget)
        self._helloWaiters.append(waiter)
        return waiter

    def capabilities(self, timeout: float | None = None) -> Deferred[Capabilities]:
        """
        What the server says about itself: its name, the generation options
        it honours and the models it serves, so a program can pick a model
        or leave out an option the server would refuse.

        A connection that authenticated already has the answer (HELLO's
        reply); otherwise a HELLO with an empty token asks for it, which a
        server without ``--auth-token-file`` answers (one with it closes the
        connection: connect with the token instead).  ``timeout`` (seconds)
        gives up with ``ClientTimeout``.
        """
        _checkTimeout(timeout)
        if self.helloPayload is not None:
            return succeed(parseHello(self.helloPayload))
        if self._helloWaiters:  # a HELLO is on its way: share its answer
            answer = self._waitForHello()
        else:
            answer = self.hello(b"")
        if timeout is not None:

            def timedOut(result: Any, seconds: float) -> Any:
                if isinstance(result, Failure):
                    return Failure(ClientTimeout(0, seconds, f"no answer to HELLO within {seconds:g} s"))
                return result

            answer.addTimeout(timeout, self._clock(), onTimeoutCancel=timedOut)
        return answer.addCallback(parseHello)

    def infer(
        self,
        prompt: str,
        max_tokens: int = 0,
        credit_bytes: int = 0,
        timeout: float | None = None,
        *,
        options: GenerationOptions | None = None,
        model: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        system: str | None = None,
        repeat_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Response:
        """
        Start a request.  With ``timeout`` (seconds), a request not finished
        by then is cancelled on the wire and fails with ``ClientTimeout``.

        The generation options (``options``, and the keywords, which override
        its fields) are checked here: a wrong type or a value out of range
        raises ``OptionsError`` (a ``ValueError``) before anything is sent.
        Those left ``None`` are the server's defaults; with none set, the
        frame is the C++ client's, byte for byte.  Whether the server
        honours an option is its call: one it cannot honour ends the request
        with BAD_REQUEST naming it (``capabilities()`` says which it does).
        """
        _checkTimeout(timeout)
        _checkCredit(credit_bytes)
        chosen = generationOptions(
            options,
            model=model,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            stop=stop,
            system=system,
            repeat_penalty=repeat_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            extra=extra,
        )
        req_id = next(self._ids)
        # Encoded before the request exists, so a prompt or count that cannot
        # be encoded leaves nothing behind, as a bad option does.
        frame = encode_infer(req_id, prompt, max_tokens, credit_bytes, chosen)
        response = Response(self, req_id, credit_bytes or DEFAULT_CREDIT_BYTES)
        if self._closed is not None:
            response._finish(None, self._closed)
            return response
        self._responses[req_id] = response
        self.transport.write(frame)  # type: ignore[union-attr]
        if timeout is not None:
            response._timeoutCall = self._clock().callLater(timeout, response._timedOut, timeout)
        return response

    def _clock(self) -> IReactorTime:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor  # type: ignore[assignment]
        assert self.clock is not None
        return self.clock

    def _forget(self, req_id: int) -> None:
        """Stop tracking a request: frames that still arrive for it are dropped."""
        self._responses.pop(req_id, None)

    def sendFrame(self, data: bytes) -> None:
        if self._closed is None:
            self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> Deferred[None]:
        if self._closed is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
        return self.lost if not self.lost.called else succeed(None)

    @property
    def inFlight(self) -> int:
        return len(self._responses)

    def _chunkArrived(self, req_id: int, payload: bytes) -> bool:
        """
        A RESP_CHUNK, straight from the decoder.  Once the connection is
        closing nothing more is delivered (as ``dataReceived`` does for other
        frames), and the true return value stops the decoder.
        """
        transport = self.transport
        if transport is None or transport.disconnecting:  # type: ignore[attr-defined]
            return True
        response = self._responses.get(req_id)
        if response is not None:
            response._chunkReceived(payload)
        return False

    def frameReceived(self, frame: Frame) -> None:
        kind = frame.type
        if kind == MessageType.RESP_CHUNK:  # only when frames are fed here by hand; see _chunkArrived
            self._chunkArrived(frame.req_id, frame.payload)
            return
        if kind == MessageType.RESP_DONE:
            done = self._responses.pop(frame.req_id, None)
            if done is not None:
                try:
                    stats = decode_done(frame)
                except ProtocolError as e:
                    done._finish(None, Failure(ClientError(frame.req_id, e.code, e.message)))
                else:
                    done._finish(stats, None)
            return
        if kind == MessageType.HELLO:
            self.helloPayload = frame.payload
            waiters, self._helloWaiters = self._helloWaiters, []
            for waiter in waiters:
                waiter.callback(frame.payload)
            return
        if kind == MessageType.RESP_ERR:
            error = decode_error(frame)
            failed = self._responses.pop(frame.req_id, None)
            if failed is not None:
                failed._finish(None, Failure(ClientError(frame.req_id, error.code, error.message)))
            elif frame.req_id == 0:
                # A connection-level error (bad stream, too many connections):
                # every request on this connection is affected.
                self._failAll(Failure(ClientError(0, error.code, error.message)))
            return
        # Anything else from a server is ignored: a newer server may send
        # frame types this client does not know.

    def lengthLimitExceeded(self, header: Oversized) -> None:
        self._failAll(
            Failure(ClientError(header.req_id, ErrorCode.TOO_LARGE, f"server sent a {header.length}-byte frame"))
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def streamCorrupted(self, error: ProtocolError) -> None:
        self._failAll(Failure(ClientError(0, error.code, f"server stream corrupted: {error.message}")))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = reason
        self._failAll(reason)
        self.lost.callback(None)

    def _failAll(self, failure: Failure) -> None:
        waiters, self._helloWaiters = self._helloWaiters, []
        for waiter in waiters:
            waiter.errback(failure)
        responses, self._responses = self._responses, {}
        for response in responses.values():
            response._finish(None, failure)


#: The smallest window that holds any UTF-8 character.  The server never
#: splits a character, and this client grants credit back as it reads, so
#: with a smaller window a character longer than it would never be sent.
MIN_CREDIT_BYTES = 4


def _checkCredit(credit_bytes: int) -> None:
    """Refuse a window (other than 0, the default) too small to hold every character."""
    if 0 < credit_bytes < MIN_CREDIT_BYTES:
        raise ValueError(
            f"credit_bytes must be 0 (the default window) or at least {MIN_CREDIT_BYTES}, got {credit_bytes}: "
            "a window smaller than one UTF-8 character can stall the answer for good"
        )


def _checkTimeout(timeout: object) -> None:
    """
    Refuse a ``timeout`` that is neither ``None`` nor a positive, finite number of seconds.

    Checked here, with the argument named, because otherwise the mistake
    surfaces later and far away: NaN as an ``AssertionError`` inside
    Twisted's ``callLater``, a string as a bare ``TypeError`` from ``<=``,
    infinity as an overflow in the reactor's poll.
    """
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__} ({timeout!r})")
    if not 0 < float(timeout) < math.inf:  # False for NaN too
        raise ValueError(
            f"timeout must be a positive, finite number of seconds (or None for no limit), got {timeout!r}"
        )


CC50Client = CC50ClientProtocol


async def _connect(reactor: Any, description: str, token: bytes | None) -> CC50ClientProtocol:
    endpoint = clientFromString(reactor, client_description(description))
    protocol = await connectProtocol(endpoint, CC50ClientProtocol(reactor))
    if token is not None:
        try:
            await protocol.hello(token)
        except BaseException:
            # A wrong token, or the timeout cancelling the wait: the
            # connection is of no use to anyone, and nobody else will close it.
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            raise
    return protocol


def connect(
    reactor: Any, description: str, token: bytes | None = None, timeout: float | None = None
) -> Deferred[CC50ClientProtocol]:
    """
    Connect to a CC50 server: ``tcp:HOST:PORT``, ``unix:PATH``, ``HOST:PORT``,
    or ``tls:HOST:PORT:trustRoots=CA_DIR`` (a directory whose ``*.pem`` files
    are the trusted CAs; add ``certificate=`` and ``privateKey=`` for a client
    certificate).  With ``token``, authenticate (HELLO) before returning, so a
    wrong token fails here, not on a request.  With ``timeout`` (seconds),
    a connection (and HELLO) not done by then is abandoned and the Deferred
    fails with ``ClientTimeout``.
    """
    _checkTimeout(timeout)
    connecting = Deferred.fromCoroutine(_connect(reactor, description, token))
    if timeout is not None:

        def timedOut(result: Any, seconds: float) -> Any:
            # Called only when the timeout fired; cancelling gives CancelledError,
            # or ConnectingCancelledError from an endpoint still connecting.
            if isinstance(result, Failure):
                what = "connection" if token is None else "authenticated connection (HELLO answered)"
                return Failure(ClientTimeout(0, seconds, f"no {what} to {description} within {seconds:g} s"))
            return result

        connecting.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)
    return connecting


# A pool of connections that retries --------------------------------------------


#: What a server answers when it did not start the request, or could not
#: start it anywhere: sending the request again cannot make it run twice
#: (docs/protocol.md, "Error codes").  UPSTREAM_UNAVAILABLE is in the set
#: only for requests that had received no chunk (``RetryPolicy.retryable``).
RETRYABLE_CODES = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.OVERLOADED, ErrorCode.UPSTREAM_UNAVAILABLE})


def _nonNegativeSeconds(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < math.inf:
        raise ValueError(f"{attribute.name} must be a finite number of seconds >= 0, got {value!r}")


def _atLeastOne(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """
    Which failures ``ClientPool`` sends again, how often, and how long it waits.

    A request that received a chunk is never sent again: the text already
    delivered would be repeated or contradicted by another attempt's.
    Before any chunk, OVERLOADED and SHUTTING_DOWN (a server that refused
    to start the request) and a failure to connect are retried.  A request
    the server may already have run is not, unless ``retryMaybeExecuted``:
    an LLM request is not idempotent (it costs, and sampling differs), and
    a connection lost after the request was sent, or UPSTREAM_UNAVAILABLE
    (the upstream may have started generating), leaves it unknown.
    (SHUTTING_DOWN also ends a request a draining server had started but
    not answered by ``--drain-timeout``; with the default 30 s drain that is
    a request with no text for 30 s.)  Everything else (BAD_REQUEST,
    TIMEOUT, a ``ClientTimeout``, ...) is the request's answer.

    The wait before retry ``n`` (1, 2, ...) doubles from ``initialDelay`` up
    to ``maxDelay``, and is drawn at random between half that and all of it
    ("equal jitter"): clients refused together by a draining server then
    come back spread out instead of in one burst, yet every retry waits at
    least a little.
    """

    #: Attempts in all, the first included: 1 never retries.
    attempts: int = attrs.field(default=4, validator=_atLeastOne)
    initialDelay: float = attrs.field(default=0.05, validator=_nonNegativeSeconds)
    maxDelay: float = attrs.field(default=2.0, validator=_nonNegativeSeconds)
    #: Also retry what the server may have run already (see above): opt in
    #: where a request running twice is acceptable.
    retryMaybeExecuted: bool = False

    def retryable(self, error: BaseException, streamed: bool) -> bool:
        """Whether a request that failed with ``error`` may be sent again; ``streamed``: a chunk had arrived."""
        if streamed or isinstance(error, ClientTimeout):
            return False
        if isinstance(error, ClientError):
            if error.code == ErrorCode.UPSTREAM_UNAVAILABLE:
                return self.retryMaybeExecuted
            return error.code in RETRYABLE_CODES
        if isinstance(error, ConnectError):
            return True
        return self.retryMaybeExecuted and isinstance(error, (ConnectionLost, ConnectionDone))

    def connectRetryable(self, error: BaseException) -> bool:
        """
        Whether a failure to connect may be tried again: nothing was sent,
        so any failure but a refused token (which will be refused again).
        """
        return not (isinstance(error, ClientError) and error.code == ErrorCode.UNAUTHORIZED)

    def delay(self, retry: int, random: Callable[[], float]) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first); ``random()`` is in [0, 1)."""
        ceiling = min(self.maxDelay, self.initialDelay * 2.0 ** min(retry - 1, 60))
        return ceiling / 2 + random() * ceiling / 2


class PooledCompletion(NamedTuple):
    """A request's answer through ``ClientPool``: its text and statistics, and how many attempts it took."""

    text: str
    stats: DoneStats
    #: Attempts made, the one that answered included (1: no retry).
    attempts: int
    #: The attempt that answered (its timings: ``startedAt``, ``firstChunkAt``, ``finishedAt``).
    response: Response


class _Slot:
    """One connection of a pool: its address, the connection, and who waits for it to be made."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.client: CC50ClientProtocol | None = None
        self.waiters: list[Deferred[CC50ClientProtocol]] | None = None


def _teeTo(parts: list[str], onChunk: Callable[[str], object]) -> Callable[[str], None]:
    """A chunk callback that keeps the text in ``parts`` and hands it on to ``onChunk``."""

    def both(text: str) -> None:
        parts.append(text)
        onChunk(text)

    return both


class ClientPool:
    """
    Requests over several connections to one or more servers, retried per
    ``policy`` when a server could not answer them.

    ``addresses`` are endpoint strings or ``HOST:PORT`` (a load balancer is
    one address); the pool keeps ``connections`` connections (at least one
    per address), made when first needed, and sends each request on the
    next one in turn, so requests spread over the connections and a retry
    goes to another connection (another server, when there are several).

    A connection whose server said SHUTTING_DOWN, or that was lost, is
    retired: it gets no new request, its requests in flight finish (a
    draining server lets them), and it is closed when the last one ends; the
    next request on its slot connects again, which through a balancer
    reaches a server that is still up.  ``retries`` counts every retry, and
    ``retriedRequests`` the requests that needed one.
    """

    def __init__(
        self,
        reactor: Any,
        addresses: str | Sequence[str],
        *,
        connections: int = 1,
        token: bytes | None = None,
        connectTimeout: float | None = None,
        policy: RetryPolicy | None = None,
        random: Callable[[], float] = _random.random,
        connector: Callable[[str], Awaitable[CC50ClientProtocol]] | None = None,
    ) -> None:
        """
        ``connector(address)`` makes one connection (by default ``connect``
        with ``token`` and ``connectTimeout``); tests pass fakes for it, for
        ``reactor`` (a clock: the backoff waits on it) and for ``random``.
        """
        names = [addresses] if isinstance(addresses, str) else list(addresses)
        if not names:
            raise ValueError("a ClientPool needs at least one address")
        _checkTimeout(connectTimeout)
        self._clock = reactor
        self.policy = policy if policy is not None else RetryPolicy()
        self._random = random
        if connector is None:

            def connector(address: str) -> Deferred[CC50ClientProtocol]:
                return connect(reactor, address, token, connectTimeout)

        self._connector = connector
        count = max(connections, len(names))
        self._slots = [_Slot(names[index % len(names)]) for index in range(count)]
        self._turn = 0
        self._retired: set[CC50ClientProtocol] = set()
        self._closing = False
        self.retries = 0
        self.retriedRequests = 0

    @property
    def addresses(self) -> list[str]:
        return sorted({slot.address for slot in self._slots})

    def connected(self) -> list[CC50ClientProtocol]:
        """The connections open now and taking requests."""
        return [slot.client for slot in self._slots if slot.client is not None]

    async def connectAll(self) -> None:
        """
        Make every connection now, so the first requests do not pay for it;
        the first failure is raised (it is not retried: a server that cannot
        be reached at the start is a mistake to report, not a blip).
        """
        outcomes = await DeferredList(
            [Deferred.fromCoroutine(self._clientFor(slot)) for slot in self._slots], consumeErrors=True
        )
        for ok, result in outcomes:
            if not ok:
                assert isinstance(result, Failure)
                result.raiseException()

    def _nextSlot(self) -> _Slot:
        slot = self._slots[self._turn % len(self._slots)]
        self._turn += 1
        return slot

    async def _clientFor(self, slot: _Slot) -> CC50ClientProtocol:
        """The slot's connection, connecting (once, for every request waiting) when it has none."""
        client = slot.client
        if client is not None and client._closed is None:
            return client
        slot.client = None
        waiter: Deferred[CC50ClientProtocol] = Deferred()
        if slot.waiters is not None:
            slot.waiters.append(waiter)
            return await waiter
        slot.waiters = [waiter]

        def made(client: CC50ClientProtocol) -> None:
            waiters, slot.waiters = slot.waiters or [], None
            if self._closing:
                client.close()
                error: Failure = Failure(ConnectionDone("the pool was closed"))
                for each in waiters:
                    each.errback(error)
                return
            slot.client = client
            client.lost.addCallback(lambda _: self._lost(slot, client))
            for each in waiters:
                each.callback(client)

        def failed(failure: Failure) -> None:
            waiters, slot.waiters = slot.waiters or [], None
            for each in waiters:
                each.errback(failure)

        Deferred.fromCoroutine(self._connectTo(slot.address)).addCallbacks(made, failed)
        return await waiter

    async def _connectTo(self, address: str) -> CC50ClientProtocol:
        return await self._connector(address)

    def _lost(self, slot: _Slot, client: CC50ClientProtocol) -> None:
        self._retired.discard(client)
        if slot.client is client:
            slot.client = None

    def _retire(self, slot: _Slot, client: CC50ClientProtocol) -> None:
        """No new requests on ``client``; it closes once those in flight end."""
        if slot.client is client:
            slot.client = None
        if client._closed is None:
            self._retired.add(client)
            self._closeIfIdle(client)

    def _closeIfIdle(self, client: CC50ClientProtocol) -> None:
        if client in self._retired and client.inFlight == 0:
            self._retired.discard(client)
            client.close()

    async def infer(
        self,
        prompt: str,
        max_tokens: int = 0,
        credit_bytes: int = 0,
        timeout: float | None = None,
        *,
        options: GenerationOptions | None = None,
        onChunk: Callable[[str], object] | None = None,
    ) -> PooledCompletion:
        """
        One request, retried per the policy: its whole text, statistics and
        attempt count.  ``onChunk`` gets the text as it arrives; only one
        attempt ever delivers any, since one that received text is not
        retried.  ``timeout`` bounds the whole request: connecting, every
        attempt and the waits between them.  Cancelling it cancels the
        attempt under way on the wire.  The last attempt's error is raised
        when the request cannot be answered.
        """
        _checkTimeout(timeout)
        if options is not None:
            generationOptions(options)  # a bad option fails now, not once per attempt
        policy = self.policy
        deadline = None if timeout is None else self._clock.seconds() + timeout
        attempt = 0
        while True:
            attempt += 1
            slot = self._nextSlot()
            try:
                client = await self._within(self._clientFor(slot), deadline)
            except CancelledError:
                raise  # the caller gave up: nothing to retry
            except Exception as e:
                if self._closing or attempt >= policy.attempts or not policy.connectRetryable(e):
                    raise
            else:
                parts: list[str] = []
                left = None if deadline is None else max(0.001, deadline - self._clock.seconds())
                response = client.infer(prompt, max_tokens, credit_bytes, left, options=options)
                response.onChunk = parts.append if onChunk is None else _teeTo(parts, onChunk)
                try:
                    stats = await response.done
                except CancelledError:
                    response.cancel()  # REQ_CANCEL on the wire: the server stops the work
                    raise
                except Exception as e:
                    if isinstance(e, ClientError) and e.code == ErrorCode.SHUTTING_DOWN or client._closed is not None:
                        self._retire(slot, client)
                    if (
                        self._closing
                        or attempt >= policy.attempts
                        or not policy.retryable(e, response.chunkFrames > 0)
                    ):
                        raise
                else:
                    return PooledCompletion("".join(parts), stats, attempt, response)
                finally:
                    self._closeIfIdle(client)
            self.retries += 1
            if attempt == 1:
                self.retriedRequests += 1
            wait = policy.delay(attempt, self._random)
            if deadline is not None and self._clock.seconds() + wait >= deadline:
                raise ClientTimeout(0, ErrorCode.TIMEOUT, f"no answer within {timeout:g}s, retries included")
            await deferLater(self._clock, wait, lambda: None)

    def _within(self, waiting: Any, deadline: float | None) -> Any:
        """``waiting`` (a coroutine or Deferred), failed with ``ClientTimeout`` if not done by ``deadline``."""
        d = ensureDeferred(waiting)
        if deadline is None:
            return d
        left = deadline - self._clock.seconds()

        def timedOut(result: object, timeout: float) -> object:
            raise ClientTimeout(0, ErrorCode.TIMEOUT, "no connection within the request's timeout")

        return d.addTimeout(max(0.0, left), self._clock, onTimeoutCancel=timedOut)

    def close(self) -> Deferred[None]:
        """Close every connection (requests still in flight fail); no request is retried after this."""
        self._closing = True
        clients = {slot.client for slot in self._slots if slot.client is not None} | self._retired
        for slot in self._slots:
            slot.client = None
        self._retired = set()
        return gatherResults([client.close() for client in clients]).addCallback(lambda _: None)


__all__ = [
    "CC50Client",
    "CC50ClientProtocol",
    "Capabilities",
    "ClientPool",
    "ClientTimeout",
    "Completion",
    "GenerationOptions",
    "OptionsError",
    "PooledCompletion",
    "RETRYABLE_CODES",
    "Response",
    "RetryPolicy",
    "connect",
    "generationOptions",
    "parseHello",
]
