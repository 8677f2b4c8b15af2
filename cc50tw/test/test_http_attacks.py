"""
Attacks on the HTTP upstream backends (cc50tw.backends.http) as a hostile or
buggy upstream would make them, in memory: the real Agent over fake
connections (``FakeUpstream``), a ``MemoryReactorClock``.

Tests in ``BugTests`` show bugs found in review and fail on the code they
were written against; every other class is a regression test of an attack
that held.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet import error as netError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.codec import ErrorCode
from cc50tw.errors import BackendError
from cc50tw.interfaces import GenerationResult
from cc50tw.test.test_llama_server import (
    LAST_CHUNK,
    Harness,
    RecordingSink,
    chunk,
    completionEvents,
    errorResponse,
    event,
    sseHead,
)
from cc50tw.test.test_upstream_pool import A, B, C, Pool, error

CHAT = "/v1/chat/completions"


def chatEvent(content: str | None = None, reasoning: str | None = None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    return event(choices=[{"index": 0, "delta": delta, "finish_reason": finish}])


def raw(data: str) -> bytes:
    """An SSE data event from raw JSON text (for lone surrogates written as escapes)."""
    return b"data: " + data.encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = event(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 7})


def response429(retryAfter: bytes, body: bytes = b'{"error":{"message":"slow down MARK"}}') -> bytes:
    return (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: " + retryAfter + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def failed(results: list[object]) -> BackendError:
    return error(results)


# Bugs ----------------------------------------------------------------------------------


class FoundInReviewTests(SynchronousTestCase):
    """Bugs the review of the http package found, each fixed; kept as regression tests."""

    def flushLater(self, *kinds: type[BaseException]) -> None:
        """The exception escapes into an unhandled Deferred, logged when it is collected."""

        def flush() -> None:
            gc.collect()
            self.flushLoggedErrors(*kinds)

        self.addCleanup(flush)

    def test_retryAfterThatIsDigitButNotANumber(self) -> None:
        """
        ``Retry-After: \\xb2`` ("²" in latin-1): ``str.isdigit`` is true, ``float``
        raises, the exception escapes ``_httpError`` inside a Deferred callback:
        no retry, no hold-off, and the request hangs until the first-event
        timeout (300 s by default), then fails as TIMEOUT without the 429.
        """
        self.flushLater(ValueError)
        p = Pool()
        results, _ = p.generate()
        p.upstreams[A].send(response429(b"\xb2"))
        self.assertEqual(p.posts(B), 1, "the 429 should move the request to B at once")

    def test_errorBodyThatNeverEndsLosesTheStatus(self) -> None:
        """
        A 503 whose (chunked) body never ends: nothing bounds the body read
        but the first-event clock, so the request waits 300 s and then says
        "sent no event" (TIMEOUT), with the 503 and its message lost; the
        upstream is not held unhealthy nor the request retried.
        """
        p = Pool()
        results, _ = p.generate()
        p.upstreams[A].send(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b'{"error":{"message":"Loading model MARK"}}')
        )
        p.reactor.advance(p.backend.settings.first_event_timeout + 1)
        # What the taxonomy promises for a 503: retried on B, A out of routing.
        self.assertEqual(p.posts(B), 1)
        self.assertFalse(p.backend.pool.isUp(p.member(A)))

    def test_deeplyNestedErrorBodyHangs(self) -> None:
        """
        An HTTP 500 whose body is ``[[[[...`` (under 64 KiB): ``json.loads``
        raises RecursionError, which ``httpFault`` does not catch (only
        ValueError); the request hangs until the first-event timeout.
        """
        self.flushLater(RecursionError)
        h = Harness()
        h.generate()
        h.upstream.send(errorResponse(500, b"Oops", b"[" * 50000))
        self.assertEqual(len(h.results), 1, "no terminal result for an HTTP 500")

    def test_deeplyNestedEventIsMalformedNotAConnectionFailure(self) -> None:
        """
        An event whose data is ``[[[[...``: RecursionError escapes the
        dialect (``_load`` catches ValueError only), out of the HTTP
        parser, which gives the connection up: the request ends as
        UPSTREAM_UNAVAILABLE "closed the connection mid-stream" and the
        upstream is counted unhealthy, instead of a malformed event
        (BACKEND_ERROR, not held against it).
        """
        h = Harness()
        h.generate()
        h.upstream.send(sseHead() + chunk(b"data: " + b"[" * 50000 + b"\n\n"))
        e = h.error()
        self.flushLoggedErrors(RecursionError)
        self.assertEqual(e.code, ErrorCode.BACKEND_ERROR, e.message)
        self.assertEqual(h.backend.pool.members[0].failures, 0)

    def test_newConnectionClosedBeforeAnsweringGoesToAnotherUpstream(self) -> None:
        """
        docs/backends.md: "closed before answering on a new connection ...
        UPSTREAM_UNAVAILABLE, retried: yes".  Every first attempt is treated
        as a possibly stale pooled connection, so the one retry is spent on
        a fresh connection to the same dead upstream and B, healthy, never
        sees the request.
        """
        p = Pool()
        results, _ = p.generate()
        p.upstreams[A].lose(netError.ConnectionDone())  # a brand-new connection
        self.assertEqual(p.posts(B), 1, f"B never tried: {results}")
        self.assertEqual(len(p.upstreams[A].connections), 1, "a fresh retry on A as if the connection were stale")

    def test_crashLoopingUpstreamBackOffNeverGrows(self) -> None:
        """
        An upstream that answers 200 + event-stream headers and then drops
        the connection (a crashing worker behind a proxy): ``succeeded`` runs
        on the headers and resets the failures in a row, so the back-off
        never doubles (it would for refused connections) and the upstream
        is back in routing every ``--llama-backoff`` seconds forever.
        """
        p = Pool(backoff=2.0)
        p.member(B).weight = 0.01  # so that every new request goes to A while A is up
        for round in range(3):
            results, _ = p.generate()
            self.assertEqual(p.member(A).outstanding, 1, f"round {round}: request went to A")
            p.upstreams[A].send(sseHead())
            p.upstreams[A].lose(netError.ConnectionLost())
            p.complete(B)
            down = p.member(A).downUntil - p.reactor.seconds()
            self.assertAlmostEqual(down, 2.0 * 2**round, 6, f"round {round}")
            p.reactor.advance(down + 0.1)

    def test_finishReasonErrorIsNotADone(self) -> None:
        """
        A chat stream whose choice finishes with ``finish_reason: "error"``
        (OpenRouter / gateways) or ``"abort"`` (vLLM) and then ``[DONE]``:
        the partial answer ends as RESP_DONE.
        """
        for reason in ("error", "abort"):
            h = Harness(CHAT)
            h.generate()
            h.upstream.send(
                sseHead() + chunk(chatEvent("partial")) + chunk(chatEvent(finish=reason)) + chunk(DONE) + LAST_CHUNK
            )
            self.assertIsInstance(h.results[0], Failure, f"{reason}: {h.results}")

    def test_endlessKeepAliveCommentsNeverEnd(self) -> None:
        """
        After one token, an upstream that sends only ``:`` comments, forever:
        each resets the idle clock, so the request never ends (no
        --max-request-seconds by default), holding a slot and the client.
        """
        h = Harness(idle_timeout=60)
        _, sink = h.generate()
        h.upstream.send(sseHead() + chunk(completionEvents(["a"])[0]))
        for _ in range(200):  # 100 minutes
            h.reactor.advance(30)
            h.upstream.send(chunk(b":\n\n"))
        self.assertEqual(sink.text, "a")
        self.assertEqual(len(h.results), 1, "still streaming after 100 minutes of keep-alive comments only")

    def test_errorMessageOfAnInStreamErrorIsBoundedForLogs(self) -> None:
        """
        A 1 MiB error message in an event (or a 60 KiB one in a JSON error
        body): ``errorMessage`` cuts only non-dict shapes to 500 characters,
        so the whole message is kept in the BackendError and the request log
        (the RESP_ERR itself is cut by the codec).  Minor.
        """
        h = Harness(CHAT)
        h.generate()
        h.upstream.send(sseHead() + chunk(event(error={"message": "M" * (1 << 20)})))
        e = h.error()
        self.assertLess(len(e.message), 4096, "the whole 1 MiB message is kept (logs, lastError)")


# What held -------------------------------------------------------------------------------


class RetryAfterTests(SynchronousTestCase):
    def test_hugeAndPastRetryAfter(self) -> None:
        p = Pool()
        results, _ = p.generate()
        p.upstreams[A].send(response429(b"9" * 400))
        self.assertEqual(p.member(A).downUntil - p.reactor.seconds(), 300.0)
        p.upstreams[B].send(response429(b"Wed, 21 Oct 2015 07:28:00 GMT", b'{"error":{"message":"B busy MARK"}}'))
        e = failed(results)
        self.assertEqual(e.code, ErrorCode.OVERLOADED)
        self.assertIn("B busy MARK", e.message)
        self.assertEqual((p.posts(A), p.posts(B)), (1, 1))
        # B's hold-off is zero: it takes the next request at once.
        self.assertTrue(p.backend.pool.isUp(p.member(B)))
        p.generate()
        self.assertEqual(p.posts(B), 2)

    def test_garbageRetryAfterUsesTheBackOff(self) -> None:
        p = Pool(backoff=3.0)
        p.generate()
        p.upstreams[A].send(response429(b"soon-ish"))
        self.assertEqual(p.member(A).downUntil - p.reactor.seconds(), 3.0)
        self.assertEqual(p.member(A).failures, 0)

    def test_429StormOnEveryUpstreamStillServesAndNeverHangs(self) -> None:
        p = Pool([A, B, C])
        for n in range(5):
            results, _ = p.generate()
            for url in (A, B, C):
                if p.member(url).outstanding:
                    p.upstreams[url].send(response429(b"300"))
            for url in (A, B, C):
                if p.member(url).outstanding:
                    p.upstreams[url].send(response429(b"300"))
            self.assertEqual(failed(results).code, ErrorCode.OVERLOADED, n)
        self.assertLessEqual(sum(p.posts(url) for url in (A, B, C)), 10)
        self.assertEqual(p.backend.pool.upCount(), 0)
        # All held off: panic mode still sends, and a good answer ends the hold.
        results, _ = p.generate()
        busy = [url for url in (A, B, C) if p.member(url).outstanding]
        self.assertEqual(len(busy), 1)
        p.complete(busy[0])
        self.assertIsInstance(results[0], GenerationResult)
        self.assertTrue(p.backend.pool.isUp(p.member(busy[0])))
        self.assertEqual([p.member(url).failures for url in (A, B, C)], [0, 0, 0])


class PostCountTests(SynchronousTestCase):
    def test_neverMoreThanTwoPosts(self) -> None:
        """stale -> fresh -> 503, over three upstreams: two POSTs."""
        p = Pool([A, B, C])
        results, _ = p.generate()
        p.upstreams[A].lose(netError.ConnectionDone())
        p.upstreams[A].send(errorResponse(503, b"Unavailable", b'{"error":{"message":"loading MARK"}}'))
        for url in (B, C):
            if p.posts(url):
                p.upstreams[url].send(errorResponse(503, b"Unavailable", b"{}"))
        e = failed(results)
        self.assertIn("HTTP 503", e.message)
        self.assertEqual(sum(p.posts(url) for url in (A, B, C)), 2)

    def test_noRetryAfterText(self) -> None:
        p = Pool()
        results, sink = p.generate()
        p.upstreams[A].send(sseHead() + chunk(completionEvents(["a"])[0]))
        p.upstreams[A].lose(netError.ConnectionLost())
        self.assertEqual(failed(results).code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertEqual(p.posts(B), 0)
        self.assertEqual(sink.text, "a")

    def test_droppedReasoningOnlyThenBreakIsRetried(self) -> None:
        """Nothing reached the client (its reasoning dropped): the break moves to B."""
        h = _ChatPool(reasoning=False)
        results, sink = h.generate()
        h.upstreams[A].send(sseHead() + chunk(chatEvent(reasoning="thinking...")))
        h.upstreams[A].lose(netError.ConnectionLost())
        self.assertEqual(h.posts(B), 1)
        h.upstreams[B].send(sseHead() + chunk(chatEvent("ok", finish="stop")) + chunk(USAGE) + chunk(DONE) + LAST_CHUNK)
        self.assertEqual(results, [GenerationResult(3, 7, "stop")])
        self.assertEqual(sink.text, "ok")


class _ChatPool(Pool):
    def __init__(self, **options: Any) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from cc50tw.backends.llama_server import LlamaServerBackend
        from cc50tw.test.test_upstream_pool import FakeUpstreams

        self.reactor = MemoryReactorClock()
        self.upstreams = FakeUpstreams(self.reactor, [A, B])
        options.setdefault("health_interval", 0)
        self.backend = LlamaServerBackend(self.reactor, [A, B], CHAT, http=self.upstreams.client(), **options)
        self.results = []


class FlowControlTests(SynchronousTestCase):
    def test_pausedThroughARetry(self) -> None:
        """Paused before any text; A fails (503); B's attempt starts paused, and streams on resume."""
        p = Pool(idle_timeout=5, first_event_timeout=5)
        sink = RecordingSink()
        results, _ = p.generate(sink=sink)
        assert sink.producer is not None
        sink.producer.pauseProducing()
        p.upstreams[A].send(errorResponse(503, b"Unavailable", b"{}"))
        self.assertEqual(p.posts(B), 1)
        p.upstreams[B].send(sseHead() + chunk(completionEvents(["x", "y"])[0]))
        self.assertTrue(p.upstreams[B].transport().producerState == "paused")
        p.reactor.advance(1000)  # far past both clocks: the silence is ours
        self.assertEqual((results, sink.writes), ([], []))
        sink.producer.resumeProducing()
        self.assertEqual(sink.text, "x")
        for e in completionEvents(["x", "y"])[1:]:
            p.upstreams[B].send(chunk(e))
        p.upstreams[B].send(LAST_CHUNK)
        self.assertEqual(sink.text, "xy")
        self.assertIsInstance(results[0], GenerationResult)
        self.assertTrue(p.backend.pool.isUp(p.member(B)))

    def test_tinyCreditIdleClockRearmsAfterResume(self) -> None:
        h = Harness(idle_timeout=10)
        sink = RecordingSink(pauseOnWrite=True)
        h.generate(sink=sink)
        h.upstream.send(sseHead() + chunk(completionEvents(["a", "b"])[0]))
        self.assertEqual(sink.writes, ["a"])
        h.reactor.advance(1000)
        self.assertEqual(h.results, [])
        self.assertEqual(h.backend.pool.members[0].failures, 0)
        assert sink.producer is not None
        sink.producer.resumeProducing()
        h.reactor.advance(11)  # now the upstream is silent: its clock runs again
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_failureWhilePausedEndsOnResume(self) -> None:
        h = Harness()
        sink = RecordingSink(pauseOnWrite=True)
        h.generate(sink=sink)
        h.upstream.send(sseHead() + chunk(completionEvents(["a", "b"])[0]) + chunk(completionEvents(["a", "b"])[1]))
        h.upstream.lose(netError.ConnectionLost())
        self.assertEqual(h.results, [])
        assert sink.producer is not None
        sink.producer.resumeProducing()
        self.assertEqual(sink.text, "ab")
        self.assertEqual(h.error().code, ErrorCode.UPSTREAM_UNAVAILABLE)


class BoundsTests(SynchronousTestCase):
    def test_hugeErrorBodyIsCutAndTheConnectionClosed(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            if h.results:
                break
            h.upstream.send(chunk(b"MARK" + b"x" * 65536))
        e = h.error()
        self.assertIn("HTTP 500: MARK", e.message)
        self.assertLess(len(e.message), 1000)
        self.assertTrue(h.upstream.transport().disconnecting)

    def test_eventLargerThanTheLimit(self) -> None:
        h = Harness()
        h.generate()
        h.upstream.send(sseHead())
        for _ in range(10):
            if h.results:
                break
            h.upstream.send(chunk(b"data: " + b"x" * (1 << 20)))
        e = h.error()
        self.assertEqual(e.code, ErrorCode.BACKEND_ERROR)
        self.assertIn("larger than", e.message)
        self.assertEqual(h.backend.pool.members[0].failures, 0)
        self.assertTrue(h.upstream.transport().disconnecting)

    def test_bodyThatNeverEndsAfterTheAnswer(self) -> None:
        """Done at max_tokens; the body goes on: drained for idle_timeout at most, then closed."""
        h = Harness(idle_timeout=7)
        h.generate(max_tokens=1)
        h.upstream.send(sseHead() + chunk(completionEvents(["a", "b"])[0]))
        self.assertEqual(h.result()[1:], (1, "length"))
        for _ in range(10):
            h.reactor.advance(1)
            h.upstream.send(chunk(completionEvents(["z"])[0]))
        self.assertTrue(h.upstream.transport().disconnecting)
        self.assertEqual(h.backend.draining, set())
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_keepAliveCommentsBeforeTheFirstEventDoNotHoldItOpen(self) -> None:
        h = Harness(first_event_timeout=10)
        h.generate()
        h.upstream.send(sseHead())
        for _ in range(12):
            h.reactor.advance(1)
            h.upstream.send(chunk(b": ping\n\n"))
        self.assertEqual(h.error().code, ErrorCode.TIMEOUT)
        self.assertEqual(h.backend.pool.members[0].failures, 0)


class ReasoningTests(SynchronousTestCase):
    def test_surrogatePairSplitAcrossReasoningEvents(self) -> None:
        h = Harness(CHAT)
        _, sink = h.generate()
        h.upstream.send(
            sseHead()
            + chunk(raw('{"choices":[{"index":0,"delta":{"reasoning_content":"hm \\ud83e"}}]}'))
            + chunk(raw('{"choices":[{"index":0,"delta":{"reasoning_content":"\\udd14","content":"A\\ud83d"}}]}'))
            + chunk(raw('{"choices":[{"index":0,"delta":{"content":"\\ude00"},"finish_reason":"stop"}]}'))
            + chunk(DONE)
            + LAST_CHUNK
        )
        self.assertEqual(sink.text, "hm \U0001f914A\U0001f600")
        self.assertIsInstance(h.results[0], GenerationResult)

    def test_reasoningOnlyDropped(self) -> None:
        h = Harness(CHAT, reasoning=False)
        _, sink = h.generate()
        h.upstream.send(
            sseHead()
            + chunk(chatEvent(reasoning="only thinking"))
            + chunk(chatEvent(finish="length"))
            + chunk(USAGE)
            + chunk(DONE)
            + LAST_CHUNK
        )
        self.assertEqual(sink.writes, [])
        self.assertEqual(h.result(), GenerationResult(3, 7, "length"))

    def test_loneHighSurrogateAtTheEndBecomesReplacement(self) -> None:
        h = Harness(CHAT)
        _, sink = h.generate()
        h.upstream.send(
            sseHead()
            + chunk(raw('{"choices":[{"index":0,"delta":{"reasoning_content":"\\ud83e"},"finish_reason":"stop"}]}'))
            + chunk(DONE)
            + LAST_CHUNK
        )
        self.assertEqual(sink.text, "\ufffd")


class MessageTests(SynchronousTestCase):
    def test_everyShapeCarriesTheUpstreamsReason(self) -> None:
        shapes = {
            "event: error": b"event: error\ndata: model crashed MARK\n\n",
            "error line": b'error: {"code":500,"message":"slot failed MARK"}\n\n',
            "data error": raw('{"error":{"message":"oom MARK","type":"server_error"}}'),
            "vllm object": raw('{"object":"error","message":"bad MARK"}') + DONE,
        }
        for name, body in shapes.items():
            h = Harness(CHAT)
            h.generate()
            h.upstream.send(sseHead() + chunk(chatEvent("t")) + chunk(body) + LAST_CHUNK)
            e = h.error()
            self.assertIn("MARK", e.message, name)
            self.assertEqual(e.code, ErrorCode.BACKEND_ERROR, name)

    def test_htmlGatewayPageIsNamed(self) -> None:
        p = Pool()
        results, _ = p.generate()
        html = b"<html><body><h1>502 Bad Gateway</h1>nginx MARK</body></html>"
        p.upstreams[A].send(errorResponse(502, b"Bad Gateway", html, b"text/html"))
        p.upstreams[B].send(errorResponse(502, b"Bad Gateway", html, b"text/html"))
        e = failed(results)
        self.assertEqual(e.code, ErrorCode.UPSTREAM_UNAVAILABLE)
        self.assertIn("HTTP 502", e.message)
        self.assertIn("MARK", e.message)
