"""
The toy backend's unit of work, computed on the CPU.

The C++ original launches ``spin_kernel`` (8 blocks of 256 threads, each
running ``iters`` LCG steps) once per token and keeps thread 0's final value.
Only thread 0's value is observable, so the CPU fallback runs that one lane:
it produces the same ``x`` as the GPU (tests compare them) while doing work
proportional to ``iters``, which is what the toy exists to simulate.  It is
labelled a CPU fallback everywhere it is reported.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

LCG_MULTIPLIER = 1664525
LCG_INCREMENT = 1013904223
U32 = 0xFFFFFFFF


def spin_lane(iters: int, lane: int = 0, seed: int = 0) -> int:
    """Thread ``lane``'s final ``x`` after ``iters`` steps from ``seed``, exactly as the kernels compute it."""
    x = (seed + lane) & U32
    for _ in range(iters):
        x = (x * LCG_MULTIPLIER + LCG_INCREMENT) & U32
    return x


def spin_chain(iters: int, tokens: int) -> list[int]:
    """
    A request's token values on the GPU's decode steps: each token's lane 0
    starts from the previous token's value, the first from 0.
    """
    values, x = [], 0
    for _ in range(tokens):
        x = spin_lane(iters, 0, x)
        values.append(x)
    return values


class CPUEngine:
    """
    Runs the per-token work in a thread pool so the reactor never waits on it.

    Zero iterations need no thread hop at all, which keeps ``--toy-iters 0``
    a pure measurement of the data plane.
    """

    description = "CPU fallback (pure-Python LCG, lane 0 only, in a thread pool)"

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool
        self.launches = 0

    def spin(self, iters: int, seed: int = 0) -> Deferred[int]:
        self.launches += 1
        if iters == 0:
            return succeed(seed)
        return deferToThreadPool(self._reactor, self._pool, spin_lane, iters, 0, seed)

    def spinNow(self, iters: int, tokens: int = 1) -> int | None:
        if iters:
            return None
        self.launches += tokens
        return 0
