"""
The GPU floor for issue 18(c): what the card allows for the toy's work,
measured with PyCUDA alone (no reactor, no sockets, no scheduler).

Every figure runs ``step_kernel`` (cc50tw.backends.cuda), the kernel the
server runs, so a request's tokens form a chain on the device (each token
starts from the last one's value) and the floor does exactly the server's
GPU work:

* ``chain_sync``: one request, launch + wait for each token in turn;
* ``chain_pipelined``: the same chain enqueued ahead on one stream with one
  event per token, ``LOOKAHEAD`` tokens ahead: the floor the server's one
  request is set against;
* ``streams``: N requests, each its own chain on its own stream, one launch
  per token, from one Python thread: Python's launch rate as the limit;
* ``batched``: N requests advanced by one launch per decode step
  (``blocks_per_request`` blocks each), ``LOOKAHEAD`` steps ahead.

    python benchmarks/gpu/floor_probe.py [--iters 20000] [--tokens 64]

Runs in the calling thread's CUDA context (``run`` makes one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from cc50tw.backends.batching import FRESH
from cc50tw.backends.cuda import STEP_KERNEL_SOURCE
from cc50tw.backends.lcg import spin_chain

LOOKAHEAD = 8


class Probe:
    """The compiled kernel and buffers for up to ``slots`` requests."""

    def __init__(self, blocksPerRequest: int = 8, block: int = 256, slots: int = 64) -> None:
        import numpy
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule

        self.cuda = cuda
        self.numpy = numpy
        self.module = SourceModule(STEP_KERNEL_SOURCE)
        self.kernel = self.module.get_function("step_kernel")
        self.kernel.prepare("IIPPPP")
        self.blocksPerRequest = blocksPerRequest
        self.block = (block, 1, 1)
        self.slots = slots
        self.state = cuda.mem_alloc(4 * slots)
        self.out = cuda.mem_alloc(4 * slots)
        self.seeds = cuda.to_device(numpy.zeros(slots, dtype=numpy.uint32))  # every chain starts from 0
        # Two entry vectors per slot count: the first step (FRESH) and the rest.
        self.fresh = cuda.to_device(numpy.arange(slots, dtype=numpy.uint32) | numpy.uint32(FRESH))
        self.chained = cuda.to_device(numpy.arange(slots, dtype=numpy.uint32))

    def launch(self, stream: Any, requests: int, iters: int, first: bool, slot: int = 0) -> None:
        entries = int(self.fresh if first else self.chained) + 4 * slot
        self.kernel.prepared_async_call(
            (self.blocksPerRequest * requests, 1),
            self.block,
            stream,
            iters,
            self.blocksPerRequest,
            entries,
            int(self.seeds) + 4 * slot,
            int(self.state),
            int(self.out) + 4 * slot,
        )

    def lastValues(self, requests: int) -> list[int]:
        host = self.numpy.zeros(requests, self.numpy.uint32)
        self.cuda.memcpy_dtoh(host, self.out)
        return [int(v) for v in host]

    def chainSync(self, iters: int, tokens: int) -> float:
        stream = self.cuda.Stream()
        event = self.cuda.Event(self.cuda.event_flags.DISABLE_TIMING)
        started = time.perf_counter()
        for token in range(tokens):
            self.launch(stream, 1, iters, token == 0)
            event.record(stream)
            event.synchronize()
        return time.perf_counter() - started

    def chainPipelined(self, iters: int, tokens: int, requests: int = 1) -> float:
        """``requests`` > 1: the batched variant, one launch per step for all of them."""
        cuda = self.cuda
        stream = cuda.Stream()
        events = [cuda.Event(cuda.event_flags.DISABLE_TIMING) for _ in range(LOOKAHEAD)]
        started = time.perf_counter()
        for token in range(tokens):
            ring = token % LOOKAHEAD
            if token >= LOOKAHEAD:
                events[ring].synchronize()  # the token LOOKAHEAD back is done: its value could be read
            self.launch(stream, requests, iters, token == 0)
            events[ring].record(stream)
        stream.synchronize()
        return time.perf_counter() - started

    def streamsPerRequest(self, iters: int, tokens: int, requests: int) -> float:
        cuda = self.cuda
        streams = [cuda.Stream() for _ in range(requests)]
        events = [[cuda.Event(cuda.event_flags.DISABLE_TIMING) for _ in range(LOOKAHEAD)] for _ in streams]
        started = time.perf_counter()
        for token in range(tokens):
            ring = token % LOOKAHEAD
            for n, stream in enumerate(streams):
                if token >= LOOKAHEAD:
                    events[n][ring].synchronize()
                self.launch(stream, 1, iters, token == 0, slot=n)
                events[n][ring].record(stream)
        for stream in streams:
            stream.synchronize()
        return time.perf_counter() - started


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def measure(iters: int = 20000, tokens: int = 64, repeats: int = 50) -> dict[str, Any]:
    """The floor's figures, in the current CUDA context."""
    probe = Probe()
    for _ in range(5):  # warm-up: module load, clocks
        probe.chainPipelined(iters, tokens)
    result: dict[str, Any] = {"iters": iters, "tokens": tokens, "lookahead": LOOKAHEAD, "repeats": repeats}
    result["chain_sync_ms"] = median_ms([probe.chainSync(iters, tokens) for _ in range(repeats)])
    result["chain_pipelined_ms"] = median_ms([probe.chainPipelined(iters, tokens) for _ in range(repeats)])
    result["chain_matches_cpu"] = probe.lastValues(1)[0] == spin_chain(iters, tokens)[-1]
    long = 512
    result["streams_tokens_per_s"] = {
        str(n): n * long / statistics.median([probe.streamsPerRequest(iters, long, n) for _ in range(5)])
        for n in (1, 16)
    }
    result["batched_tokens_per_s"] = {
        str(n): n * long / statistics.median([probe.chainPipelined(iters, long, n) for _ in range(5)])
        for n in (1, 4, 16, 32)
    }
    return result


def run(iters: int, tokens: int, repeats: int) -> dict[str, Any]:
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).make_context()
    try:
        return measure(iters, tokens, repeats)
    finally:
        context.pop()
        context.detach()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(sys.argv[1:])
    print(json.dumps(run(args.iters, args.tokens, args.repeats), indent=1))
