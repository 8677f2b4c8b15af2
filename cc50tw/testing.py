"""
Tools for testing and measuring CC50 servers, in the spirit of
``twisted.internet.testing`` and ``treq.testing``: shipped with the package
so that tests, benchmarks and users' own suites share one implementation.

- ``SlowReader``: a client that stops reading (backpressure tests).
- ``TerminalFrameChecker``: the exactly-once terminal frame promise, checked
  frame by frame for every request on a connection.
- ``run_soak`` / ``soak_server``: mixed traffic over many connections with
  random cancels and disconnects, every request checked by a
  ``TerminalFrameChecker``; ``ProcessSampler`` watches the server's RSS and
  open file descriptors meanwhile.  Any CC50 server can be pointed at them.
"""

from __future__ import annotations

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
