"""
RESP_DONE's one-pack path (``stream.resultFrame``, ``codec.encode_plain_done``)
held to the general one it skips (``doneFrame(doneStats(...))``).

The one-pack path exists for speed alone (issue 18: a request answered at once
spends a fair part of its time on its terminal frame), so for every input it
must give the very bytes the general path gives, and for an input it cannot
take (a count out of range, a clock stepped back, a float count, options that
ask for the finish reason) it must hand over to the general path, not raise.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import TestCase

from cc50tw.codec import DoneStats, encode_done, encode_plain_done
from cc50tw.generation import NO_OPTIONS, GenerationOptions
from cc50tw.interfaces import GenerationResult
from cc50tw.stream import doneFrame, doneStats, resultFrame
from cc50tw.test.optional import HYPOTHESIS


class SubclassedResult(GenerationResult):
    """A backend's own result type: not the one-pack path's to read."""


class ResultFrameTests(TestCase):
    def test_subclassedResultTakesTheGeneralPath(self) -> None:
        result = SubclassedResult(2, 3, "stop")
        expected = doneFrame(7, doneStats(7, result, NO_OPTIONS, 1.0, 1.5, 2.0))
        self.assertEqual(resultFrame(7, result, NO_OPTIONS, 1.0, 1.5, 2.0), expected)

    def test_clockSteppedBack(self) -> None:
        """Elapsed time below zero is clamped to 0 on either path, never an exception."""
        frame = resultFrame(7, GenerationResult(2, 3), NO_OPTIONS, 10.0, 9.0, 8.0)
        self.assertEqual(frame, doneFrame(7, DoneStats(3, 0, 2, 3, 0)))


class EncodePlainDoneTests(TestCase):
    def test_outOfRangeRaises(self) -> None:
        """It does not clamp: that is for its caller's fallback (``encode_done``)."""
        for figures in [(1 << 32, 0, 0, 0), (-1, 0, 0, 0), (0, -1, 0, 0), (0, 1 << 64, 0, 0), (0, 0, 0, -1)]:
            with self.assertRaises(struct.error):
                encode_plain_done(1, *figures)


if HYPOTHESIS.available:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    SETTINGS = settings(deadline=None, max_examples=400)

    reqIds = st.integers(1, (1 << 64) - 1)
    #: Counts as backends hand them over: in range, out of range, negative, not ints at all.
    counts = st.one_of(
        st.integers(0, (1 << 32) - 1),
        st.integers(-(1 << 70), 1 << 70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.sampled_from(["3", b"3", 2.0]),
    )
    #: Clock readings, including steps back and readings no clock gives.
    times = st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False),
        st.floats(allow_nan=True, allow_infinity=True),
    )
    finishReasons = st.one_of(st.none(), st.text(max_size=40))
    options = st.sampled_from([NO_OPTIONS, GenerationOptions(model="toy"), GenerationOptions(temperature=0.5)])

    class ResultFramePropertyTests(TestCase):
        @SETTINGS
        @given(reqIds, counts, counts, finishReasons, options, times, st.one_of(st.none(), times), times)
        def test_sameBytesAsTheGeneralPath(
            self,
            reqId: int,
            prompt: object,
            generated: object,
            finishReason: str | None,
            requestOptions: GenerationOptions,
            startedAt: float,
            firstChunkAt: float | None,
            now: float,
        ) -> None:
            result = GenerationResult(prompt, generated, finishReason)  # type: ignore[arg-type]
            expected = doneFrame(reqId, doneStats(reqId, result, requestOptions, startedAt, firstChunkAt, now))
            self.assertEqual(resultFrame(reqId, result, requestOptions, startedAt, firstChunkAt, now), expected)
            self.flushLoggedErrors()  # the general path logs the figures it could not use

    class EncodePlainDonePropertyTests(TestCase):
        @SETTINGS
        @given(
            reqIds,
            st.integers(0, (1 << 32) - 1),
            st.integers(0, (1 << 64) - 1),
            st.integers(0, (1 << 32) - 1),
            st.integers(0, (1 << 64) - 1),
        )
        def test_sameBytesAsEncodeDone(self, reqId: int, tokens: int, elapsed: int, prompt: int, ttft: int) -> None:
            self.assertEqual(
                encode_plain_done(reqId, tokens, elapsed, prompt, ttft),
                encode_done(reqId, DoneStats(tokens, elapsed, prompt, tokens, ttft)),
            )

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)
