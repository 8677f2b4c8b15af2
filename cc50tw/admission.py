"""
Server-wide admission: how many backend calls run at once, how many wait.

A bounded queue is what keeps an overloaded server honest: past it, a new
request gets OVERLOADED at once, rather than waiting without limit while
its client times out anyway.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredSemaphore

from cc50tw.codec import ErrorCode
from cc50tw.errors import RequestFailed


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._semaphore = DeferredSemaphore(max_concurrency)
        self._releasing = False
        self._pendingReleases = 0

    @property
    def running(self) -> int:
        return self.max_concurrency - self._semaphore.tokens

    @property
    def queued(self) -> int:
        return len(self._semaphore.waiting)

    def tryAcquire(self) -> bool:
        """Take a free slot without a Deferred, if there is one and nobody is queued ahead."""
        semaphore = self._semaphore
        if semaphore.tokens > 0 and not semaphore.waiting:
            semaphore.tokens -= 1
            return True
        return False

    def acquire(self) -> Deferred[object]:
        """
        A Deferred that fires when the request may run; cancel it to leave the queue.

        Raises ``RequestFailed`` (OVERLOADED) when the queue is full.
        """
        if self._semaphore.tokens == 0 and self.queued >= self.max_queue:
            raise RequestFailed(
                f"server overloaded: {self.max_concurrency} requests running and "
                f"{self.max_queue} queued (--max-concurrency, --max-queue); retry later",
                ErrorCode.OVERLOADED,
            )
        return self._semaphore.acquire()  # type: ignore[return-value]

    def release(self) -> None:
        """
        Free a slot, admitting the next queued request.

        That request may finish inside its own admission (a backend that
        completes synchronously) and release again; those nested releases are
        queued and run by the outermost call's loop, so a long queue cannot
        recurse deeper and deeper until the stack overflows.
        """
        semaphore = self._semaphore
        if not semaphore.waiting and not self._releasing and semaphore.tokens < semaphore.limit:
            semaphore.tokens += 1  # nobody to admit: what DeferredSemaphore.release does then
            return
        self._pendingReleases += 1
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._pendingReleases:
                self._pendingReleases -= 1
                self._semaphore.release()
        finally:
            self._releasing = False
