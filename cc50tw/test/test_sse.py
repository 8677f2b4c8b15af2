"""
Tests for the incremental SSE parser and the UTF-8-safe text assembler.

The property tests cut recorded and generated streams at every possible
place, because that is what TCP does to them.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cc50tw.sse import SSEError, SSEEvent, SSEParser, TextAssembler
from cc50tw.test.optional import HYPOTHESIS

# What llama-server build 11434 sent for a /completion request with
# n_predict 3 (trimmed timings), byte for byte.
LLAMA_COMPLETION = (
    b'data: {"index":0,"content":" the","tokens":[301],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":3}\n\n'
    b'data: {"index":0,"content":" caf\xc3\xa9","tokens":[77,140],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":2,"tokens_evaluated":3}\n\n'
    b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"m",'
    b'"tokens_predicted":3,"tokens_evaluated":3,"stop_type":"limit","truncated":false,'
    b'"timings":{"prompt_n":3,"prompt_ms":1.2,"predicted_n":3,"predicted_ms":2.0}}\n\n'
)


def parseWhole(data: bytes) -> list[SSEEvent]:
    return SSEParser().feed(data)


def parseSplit(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    previous = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events.extend(parser.feed(data[previous:cut]))
        previous = cut
    return events


class SSEParserTests(SynchronousTestCase):
    def test_recordedCompletionStream(self) -> None:
        events = parseWhole(LLAMA_COMPLETION)
        self.assertEqual([json.loads(e.data)["content"] for e in events], [" the", " café", ""])
        self.assertEqual({e.event for e in events}, {"message"})
        self.assertTrue(json.loads(events[-1].data)["stop"])

    def test_everySplitOfTheRecordedStream(self) -> None:
        """One read per byte, and every two-way cut, give the same events as one read."""
        whole = parseWhole(LLAMA_COMPLETION)
        self.assertEqual(parseSplit(LLAMA_COMPLETION, list(range(len(LLAMA_COMPLETION)))), whole)
        for cut in range(len(LLAMA_COMPLETION) + 1):
            self.assertEqual(parseSplit(LLAMA_COMPLETION, [cut]), whole, f"cut at {cut}")

    def test_lineEndings(self) -> None:
        """LF, CRLF and lone CR all end lines, mixed in one stream."""
        data = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r\ndata: e\n\r"
        self.assertEqual([e.data for e in parseWhole(data)], ["a", "b", "c", "d\ne"])

    def test_crlfSplitAcrossReads(self) -> None:
        """A CR ending one read and the LF starting the next are one line ending, not two."""
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: x\r"), [])
        # If the LF were a second line ending, "x" would be dispatched here.
        self.assertEqual(parser.feed(b"\n"), [])
        self.assertEqual(parser.feed(b"data: y\r"), [])
        self.assertEqual(parser.feed(b"\r\n"), [SSEEvent("x\ny")])

    def test_crAtEndThenData(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: x\r"), [])
        self.assertEqual(parser.feed(b"\rdata: y\n\n"), [SSEEvent("x"), SSEEvent("y")])

    def test_severalEventsInOneRead(self) -> None:
        data = b"".join(b"data: %d\n\n" % i for i in range(50))
        self.assertEqual([e.data for e in parseWhole(data)], [str(i) for i in range(50)])

    def test_commentsAndPings(self) -> None:
        """Comment lines (llama-server's ':' ping) produce nothing and do not split events."""
        data = b":\n\n: keep-alive\ndata: a\n: inside\ndata: b\n\n:\n\n"
        self.assertEqual(parseWhole(data), [SSEEvent("a\nb")])

    def test_multiLineData(self) -> None:
        self.assertEqual(parseWhole(b"data: one\ndata:two\ndata:  three\ndata\n\n"), [SSEEvent("one\ntwo\n three\n")])

    def test_emptyDataIsAnEvent(self) -> None:
        self.assertEqual(parseWhole(b"data:\n\n"), [SSEEvent("")])

    def test_eventWithoutDataIsNotDispatched(self) -> None:
        self.assertEqual(parseWhole(b"event: ping\n\nid: 7\n\n\n\n"), [])

    def test_fields(self) -> None:
        """event, id and retry are kept; id persists; unknown fields are ignored."""
        events = parseWhole(b"event: error\nid: 7\nretry: 1500\nfoo: bar\ndata: x\n\ndata: y\n\n")
        self.assertEqual(events, [SSEEvent("x", "error", "7", 1500), SSEEvent("y", "message", "7", None)])

    def test_commonEventThenOtherFields(self) -> None:
        """
        The path for what inference servers send (one ``data: `` line, then a
        blank one) hands every other shape of event to the general rules.
        """
        data = (
            b"data: first\n\n"
            b"data: a\nretry: 5\n\n"
            b"data: b\nevent: named\n\n"
            b"data: c\ndata: d\n\n"
            b"data: e\nerror: ignored with data\n\n"
            b"id: 9\ndata: f\n\n"
            b"data: g\n\n"
        )
        expected = [
            SSEEvent("first"),
            SSEEvent("a", "message", None, 5),
            SSEEvent("b", "named"),
            SSEEvent("c\nd"),
            SSEEvent("e"),
            SSEEvent("f", "message", "9"),
            SSEEvent("g", "message", "9"),
        ]
        self.assertEqual(parseWhole(data), expected)
        self.assertEqual(parseSplit(data, list(range(len(data)))), expected)

    def test_fieldWithoutColon(self) -> None:
        self.assertEqual(parseWhole(b"data\ndata\n\n"), [SSEEvent("\n")])

    def test_onlyOneLeadingSpaceIsStripped(self) -> None:
        self.assertEqual(parseWhole(b"data:   x \n\n"), [SSEEvent("  x ")])

    def test_invalidRetryAndIdWithNul(self) -> None:
        events = parseWhole(b"id: 1\nretry: soon\ndata: a\n\nid: x\x00y\ndata: b\n\n")
        self.assertEqual(events, [SSEEvent("a", "message", "1", None), SSEEvent("b", "message", "1", None)])

    def test_byteOrderMark(self) -> None:
        self.assertEqual(parseWhole(b"\xef\xbb\xbfdata: x\n\n"), [SSEEvent("x")])
        # Only at the very start of the stream.
        self.assertEqual(parseWhole(b"data: x\n\n\xef\xbb\xbfdata: y\n\n"), [SSEEvent("x")])

    def test_multiByteCharacterSplitAcrossReads(self) -> None:
        data = "data: 日本🙂\n\n".encode()
        for cut in range(len(data) + 1):
            self.assertEqual(parseSplit(data, [cut]), [SSEEvent("日本🙂")])

    def test_partialEventAtEndIsPending(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: complete\n\ndata: partial\n"), [SSEEvent("complete")])
        self.assertTrue(parser.pending)
        self.assertEqual(parser.feed(b"\n"), [SSEEvent("partial")])
        self.assertFalse(parser.pending)

    def test_oversizedLineIsRefused(self) -> None:
        parser = SSEParser(max_event_bytes=100)
        parser.feed(b"data: " + b"x" * 90)
        with self.assertRaises(SSEError):
            parser.feed(b"x" * 20)

    def test_oversizedEventIsRefused(self) -> None:
        """Many short lines without a blank line count towards one event."""
        parser = SSEParser(max_event_bytes=100)
        with self.assertRaises(SSEError):
            for _ in range(20):
                parser.feed(b"data: 0123456789\n")

    def test_sizeLimitResetsPerEvent(self) -> None:
        parser = SSEParser(max_event_bytes=100)
        for _ in range(100):
            self.assertEqual(parser.feed(b"data: 0123456789\n\n"), [SSEEvent("0123456789")])


class TextAssemblerTests(SynchronousTestCase):
    def test_bytesSplitMidCharacter(self) -> None:
        """No output ever ends in part of a character, and the sum is the text."""
        text = "aé日🙂z"
        data = text.encode()
        for cut in range(len(data) + 1):
            assembler = TextAssembler()
            first = assembler.decode(data[:cut])
            second = assembler.decode(data[cut:])
            self.assertEqual(first + second + assembler.finish(), text)
            first.encode("utf-8")  # a lone surrogate would raise here
            self.assertTrue(text.startswith(first))

    def test_oneByteAtATime(self) -> None:
        assembler = TextAssembler()
        out = []
        for byte in "🙂🚀".encode():
            out.append(assembler.decode(bytes([byte])))
        self.assertEqual(out, ["", "", "", "🙂", "", "", "", "🚀"])
        self.assertFalse(assembler.holding)

    def test_incompleteAtEndBecomesReplacement(self) -> None:
        assembler = TextAssembler()
        self.assertEqual(assembler.decode(b"ok\xf0\x9f"), "ok")
        self.assertTrue(assembler.holding)
        self.assertEqual(assembler.finish(), "\ufffd")

    def test_invalidBytesBecomeReplacement(self) -> None:
        self.assertEqual(TextAssembler().decode(b"a\xffb"), "a\ufffdb")

    def test_surrogatePairSplitAcrossJSONEvents(self) -> None:
        """A JSON escape "\\ud83d" in one event and "\\ude42" in the next is one character."""
        first = json.loads('{"content": "hi \\ud83d"}')["content"]
        second = json.loads('{"content": "\\ude42!"}')["content"]
        assembler = TextAssembler()
        out1 = assembler.text(first)
        out2 = assembler.text(second)
        self.assertEqual((out1, out2), ("hi ", "🙂!"))
        (out1 + out2).encode("utf-8")

    def test_surrogatePairInOnePiece(self) -> None:
        self.assertEqual(TextAssembler().text("\ud83d\ude42"), "🙂")

    def test_loneSurrogatesBecomeReplacement(self) -> None:
        assembler = TextAssembler()
        self.assertEqual(assembler.text("a\ude42b"), "a\ufffdb")
        self.assertEqual(assembler.text("\ud83d"), "")
        self.assertEqual(assembler.text("x"), "\ufffdx")
        self.assertEqual(assembler.text("\ud83d"), "")
        self.assertEqual(assembler.finish(), "\ufffd")

    def test_emptyPiecesKeepTheHeldHalf(self) -> None:
        assembler = TextAssembler()
        self.assertEqual(assembler.text("\ud83d"), "")
        self.assertEqual(assembler.text(""), "")
        self.assertEqual(assembler.text("\ude42"), "🙂")


# Property tests need hypothesis, so they are defined only where it imports
# (cc50tw.test.optional says why).
if HYPOTHESIS.available:
    from hypothesis import given
    from hypothesis import strategies as st

    class SSEParserPropertyTests(SynchronousTestCase):
        @given(
            st.lists(
                st.tuples(
                    st.sampled_from([b"data", b"event", b"id", b":", b"retry", b"other"]),
                    st.text(alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=["Cs"])),
                ),
                max_size=12,
            ),
            st.sampled_from([b"\n", b"\r\n", b"\r"]),
            st.lists(st.integers(min_value=0, max_value=400), max_size=8),
        )
        def test_splittingNeverChangesTheEvents(
            self, lines: list[tuple[bytes, str]], newline: bytes, cuts: list[int]
        ) -> None:
            data = b""
            for index, (field, value) in enumerate(lines):
                data += field + b": " + value.encode() + newline
                if index % 3 == 2:
                    data += newline
            data += newline
            self.assertEqual(parseSplit(data, [c for c in cuts if c <= len(data)]), parseWhole(data))

    class TextAssemblerPropertyTests(SynchronousTestCase):
        @given(st.text(), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
        def test_anyCutOfAnyText(self, text: str, cuts: list[int]) -> None:
            data = text.encode("utf-8", "surrogatepass")
            assembler = TextAssembler()
            out = []
            previous = 0
            for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
                out.append(assembler.decode(data[previous:cut]))
                previous = cut
            out.append(assembler.finish())
            for piece in out:
                piece.encode("utf-8")
            self.assertEqual("".join(out), data.decode("utf-8", "replace"))

else:
    HypothesisTests = HYPOTHESIS.standIn(__name__)
