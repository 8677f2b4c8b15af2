"""
Replies sent in the read that earned them, not a reactor turn later.

A Twisted socket transport's ``write`` only queues: the bytes go out when the
reactor next polls, finds the socket writable and calls the transport's
``doWrite``.  For a client waiting on each answer that is a whole reactor
turn (a poll and its bookkeeping) between the answer being ready and its
leaving, measured at about 35 µs of a 1-token round trip's 190 µs on the
2-core VM (issue 18).  asyncio's transports send at once when nothing is
queued; this gives a CC50 connection the same, for the replies one read
produced.

Replies written outside a read (the GPU's hand-overs, the bridge's tokens
as the upstream's read delivers them, a timer's) have no read to end: a
connection gathers them, and ``SendAtPassEnd`` sends each connection's in
one ``writeNowFor`` call at the end of the reactor's pass (a ``callLater(0)``
shared by every connection), when nothing is queued before them.  Under load
this matters beyond latency: a queued write costs the reactor two
``epoll_ctl`` calls (start and stop watching for writability), a poll
result and a ``doWrite`` besides its ``send``, and each of those system
calls lets go of the GIL, which the GPU's worker thread then holds through
its next burst of launches (issue 18c).  Gathering first keeps a connection
that carries many requests at one send per pass, not one per token.

Only a transport that is a ``FileDescriptor`` (TCP and unix sockets) is sent
on directly: its ``doWrite`` is known to take a socket that is not writable
(it sends nothing and stays registered for writing) and a failed send (the
error comes back and the reactor, polling the socket again, ends the
connection).  Any other transport (TLS, the ``haproxy:`` wrapper, a
test's) is left to send when the reactor gets to it, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


def sendNowFor(transport: object) -> Callable[[], None] | None:
    """
    A callable that sends what ``transport`` has queued, now; None for a
    transport that is not a socket's ``FileDescriptor``.
    """
    if not isinstance(transport, FileDescriptor):
        return None
    descriptor = transport

    def sendNow() -> None:
        # Not while closing: its doWrite would finish the close and hand the
        # reactor's part (connectionLost) back to a caller that is not the
        # reactor.  Not while its producer is paused: a doWrite that empties
        # the buffer would resume that producer from inside its own read.
        if descriptor.connected and not descriptor.disconnecting and not descriptor.producerPaused:
            # An error returned here is the reactor's to act on: the socket
            # stays registered for writing, the reactor's own doWrite meets
            # the same error and ends the connection.
            try:
                descriptor.doWrite()
            except Exception:
                # Twisted's sockets return errors, never raise them; one that
                # did must not be taken for the caller's failure (an answer
                # already written recorded as lost).  The reactor tries again.
                log.failure("sending a reply at once failed; the reactor will send it")

    return sendNow


def writeNowFor(transport: object) -> Callable[[bytes], None] | None:
    """
    A callable that writes to ``transport`` and sends at once what the socket
    takes, when nothing is queued before it; None for a transport that is
    not a socket's ``FileDescriptor``.  What it relies on is
    ``FileDescriptor.writeSomeData``'s contract: send what the socket takes
    now, and return how much, or the error (a TCP or unix socket's is one
    ``send``).
    """
    if not isinstance(transport, FileDescriptor):
        return None
    connection = transport

    def writeNow(data: bytes) -> None:
        # Only with nothing queued (the bytes must leave in order), the
        # connection open and not closing (its close waits for the queue to
        # empty, which the reactor must see) and its producer not paused.
        if (
            connection.connected
            and not connection.disconnecting
            and not connection._writeDisconnecting
            and not connection.producerPaused
            and not connection.dataBuffer
            and not connection._tempDataLen
        ):
            try:
                sent = connection.writeSomeData(data)
            except Exception:
                log.failure("sending a reply at once failed; the reactor will send it")
                sent = 0
            if not isinstance(sent, int) or sent < 0:
                # The socket failed: queued, the reactor meets the same error
                # on its next write and ends the connection as it always has.
                sent = 0
            if sent >= len(data):
                return
            data = data[sent:]
        connection.write(data)

    return writeNow


class SendAtPassEnd:
    """
    Calls each ``send`` it is given once, at the end of the reactor's
    current pass: one ``callLater(0)`` for every connection that wrote
    outside a read meanwhile.  Twisted runs a ``callLater(0)`` made while it
    runs thread calls (the GPU's hand-overs) in the same pass, and one made
    while it handles I/O (the bridge's upstream reads) before it polls
    again, so nothing waits for a poll.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._sends: list[Callable[[], None]] = []
        self._call: IDelayedCall | None = None

    def add(self, send: Callable[[], None]) -> None:
        self._sends.append(send)
        if self._call is None:
            self._call = self._reactor.callLater(0, self._sendAll)

    def _sendAll(self) -> None:
        self._call = None
        sends, self._sends = self._sends, []
        for send in sends:
            try:
                send()
            except Exception:
                # One connection's failure must not keep the others' replies back.
                log.failure("sending replies written outside a read failed")
