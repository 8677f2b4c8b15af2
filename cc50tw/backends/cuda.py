"""
The toy backend's unit of work on an NVIDIA GPU, through PyCUDA.

``spin_kernel`` is the C++ original's kernel (the probe still checks it);
requests run as decode steps of ``step_kernel``, one launch per step for
every running request, scheduled by ``cc50tw.backends.batching``.  Two
constraints shape this module:

* The reactor thread must never wait on the GPU.  A CUDA context is current
  on one thread at a time, so the engine gives the GPU a thread of its own:
  that worker owns the context, launches the steps, waits on their events
  (which blocks only the worker), and hands the values to the reactor with
  ``callFromThread``.

* CUDA does not survive ``fork()``.  ``twistd`` builds the backend, then
  daemonises, so nothing here may initialise the driver in the process that
  builds it: the check that CUDA works (``probe_cuda``) runs in a short-lived
  child process, and the worker thread starts from ``startBackend``, after
  any fork.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from cc50tw.backends.batching import DEFAULT_DEPTH, DEFAULT_SLOTS, DecodeReceiver, DecodeScheduler, DecodeTicket
from cc50tw.backends.lcg import spin_lane
from cc50tw.errors import BackendError

if TYPE_CHECKING:
    from cc50tw.backends.toy import ToyEngine

log = Logger()

#: The C++ original's kernel.  PyCUDA's ``SourceModule`` wraps it in
#: ``extern "C"``, so the symbol keeps this name.
KERNEL_SOURCE = r"""
__global__ void spin_kernel(unsigned iters, unsigned *out)
{
    unsigned x = threadIdx.x + blockIdx.x * blockDim.x;
    for (unsigned i = 0; i < iters; ++i) {
        x = x * 1664525u + 1013904223u;
    }
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        *out = x;
    }
}
"""

DEFAULT_GRID = 8
DEFAULT_BLOCK = 256

#: Iterations the probe runs and checks against the CPU reference: enough to
#: catch a miscompiled loop, few enough to cost nothing.
PROBE_ITERS = 1000

#: The probe compiles the kernel with nvcc the first time (PyCUDA caches the
#: result on disk), which can take seconds on a cold machine.
PROBE_TIMEOUT = 180.0

NO_DEVICE = "no CUDA device"

# Telling people why CUDA is not used -------------------------------------


def reason_from_import_error(error: ImportError) -> str:
    """
    Why ``import pycuda.driver`` failed, in words a person can act on.

    A missing driver shows up as an ``ImportError`` naming ``libcuda.so.1``
    (PyCUDA's extension links against it), which is not a missing package.
    """
    text = str(error)
    if "libcuda" in text:
        return "libcuda.so.1 missing (no NVIDIA driver)"
    name = (getattr(error, "name", None) or "").split(".")[0]
    if isinstance(error, ModuleNotFoundError) and name == "pycuda":
        return "pycuda not installed"
    if isinstance(error, ModuleNotFoundError) and name == "numpy":
        return "numpy not installed (pycuda needs it at import time)"
    return f"pycuda does not import: {text}"


def reason_from_init_error(error: BaseException) -> str:
    """Why ``cuInit`` failed; a driver with no GPU behind it is the common case."""
    text = str(error)
    if "no CUDA-capable device" in text or "CUDA_ERROR_NO_DEVICE" in text:
        return NO_DEVICE
    return f"cuInit failed: {text}"


@attrs.frozen
class CUDAProbe:
    """What ``probe_cuda`` found: ``reason`` is None when CUDA can be used."""

    reason: str | None
    device_name: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None


def probe_here(grid: int = DEFAULT_GRID, block: int = DEFAULT_BLOCK, iters: int = PROBE_ITERS) -> dict[str, Any]:
    """
    Import PyCUDA, find a device, compile and run ``spin_kernel`` once.

    This initialises the CUDA driver in the calling process, so the server
    only calls it in a child process (``probe_cuda``).  Returns a dict for
    JSON: ``reason`` (or None), ``device`` and the kernel's ``value``.
    """
    try:
        import numpy
        import pycuda.driver as cuda
    except ImportError as e:
        return {"reason": reason_from_import_error(e)}
    try:
        cuda.init()
    except Exception as e:
        return {"reason": reason_from_init_error(e)}
    if cuda.Device.count() == 0:
        return {"reason": NO_DEVICE}
    device = cuda.Device(0)
    name = str(device.name())
    try:
        context = device.make_context()
    except Exception as e:
        return {"reason": f"cannot create a CUDA context on {name}: {e}", "device": name}
    try:
        from pycuda.compiler import SourceModule

        try:
            module = SourceModule(KERNEL_SOURCE)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return {"reason": f"spin_kernel does not compile on {name}: {first}", "device": name}
        kernel = module.get_function("spin_kernel")
        out = cuda.mem_alloc(4)
        host = numpy.zeros(1, numpy.uint32)
        kernel(numpy.uint32(iters), out, block=(block, 1, 1), grid=(grid, 1))
        cuda.memcpy_dtoh(host, out)
        out.free()
        del kernel, module
        return {"reason": None, "device": name, "value": int(host[0])}
    except Exception as e:
        return {"reason": f"spin_kernel failed on {name}: {e}", "device": name}
    finally:
        context.pop()
        context.detach()


def _probe_main() -> None:
    """Entry point of the probe's child process: one JSON line on stdout."""
    grid, block, iters = (int(argument) for argument in sys.argv[1:4])
    print(json.dumps(probe_here(grid, block, iters)))


def probe_cuda(grid: int = DEFAULT_GRID, block: int = DEFAULT_BLOCK, timeout: float = PROBE_TIMEOUT) -> CUDAProbe:
    """
    Can this machine run ``spin_kernel``?  Asked without touching CUDA here.

    A missing PyCUDA is told without a child process; everything else
    (driver, device, nvcc, the kernel's answer) is checked in one, so that
    this process can still fork and use CUDA afterwards.
    """
    if importlib.util.find_spec("pycuda") is None:
        return CUDAProbe("pycuda not installed")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
    command = [
        sys.executable,
        "-c",
        "from cc50tw.backends.cuda import _probe_main; _probe_main()",
        str(grid),
        str(block),
        str(PROBE_ITERS),
    ]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return CUDAProbe(f"the CUDA probe took longer than {timeout:g}s")
    except OSError as e:
        return CUDAProbe(f"the CUDA probe could not run: {e}")
    lines = child.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1])
    except (IndexError, ValueError):
        detail = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        return CUDAProbe(f"the CUDA probe failed: {detail}")
    device = found.get("device")
    if found.get("reason"):
        return CUDAProbe(str(found["reason"]), device)
    expected = spin_lane(PROBE_ITERS)
    if found.get("value") != expected:
        return CUDAProbe(f"spin_kernel computed {found.get('value')} on {device}, the CPU reference {expected}", device)
    return CUDAProbe(None, device)


# Choosing the engine -------------------------------------------------------


class CUDAUnavailable(ValueError):
    """
    ``--toy-device=cuda`` was asked for on a machine where CUDA cannot run: a
    ``ValueError``, so ``twistd cc50`` reports it as the option's problem.
    """


def select_engine(
    device: str,
    reactor: Any,
    grid: int = DEFAULT_GRID,
    block: int = DEFAULT_BLOCK,
    probe: Callable[[int, int], CUDAProbe] = probe_cuda,
) -> ToyEngine | CUDAEngine:
    """
    The engine for ``--toy-device``: ``cpu``, ``cuda`` (or fail), or ``auto``.

    ``auto`` says once, in the log, why it did not use the GPU, because a
    silent fallback is how a benchmark ends up measuring the wrong thing.
    """
    from cc50tw.backends.lcg import CPUEngine

    if device == "cpu":
        return CPUEngine(reactor, reactor.getThreadPool())
    found = probe(grid, block)
    if found.available:
        return CUDAEngine(reactor, grid, block, found.device_name)
    if device == "cuda":
        raise CUDAUnavailable(f"--toy-device=cuda, but CUDA cannot be used here: {found.reason}")
    log.info(
        "toy backend: --toy-device=auto chose the CPU fallback: {reason}",
        reason=found.reason,
    )
    return CPUEngine(reactor, reactor.getThreadPool())


# The engine ------------------------------------------------------------------

#: One decode step for every request in it: ``blocksPerRequest`` blocks per
#: request, each thread running the C++ original's LCG loop.  A request's
#: chain lives in ``state[slot]``: its first step in a slot (``FRESH`` set)
#: starts from its ``seeds`` value (0 for a new request, the last value for
#: one that gave its slot up while paused), each later step from the last
#: step's value, as a real decoder's next
#: token depends on the last one.  Lane 0 of a request (thread 0 of its first
#: block) carries the chain and reports it; the other lanes are the work the
#: toy stands for, started from the same value (a later block of a large
#: grid can start after lane 0 has written the next one: only unobserved
#: lanes then differ).  ``entries`` and ``out`` live in host memory mapped
#: into the device, so a step costs one launch and one event, no copies.
STEP_KERNEL_SOURCE = r"""
__global__ void step_kernel(unsigned iters, unsigned blocksPerRequest, const unsigned *entries,
                            const unsigned *seeds, unsigned *state, unsigned *out)
{
    __shared__ unsigned start, slot;
    const unsigned request = blockIdx.x / blocksPerRequest;
    const unsigned block = blockIdx.x % blocksPerRequest;
    if (threadIdx.x == 0) {
        const unsigned entry = entries[request];
        slot = entry & 0x7fffffffu;
        start = (entry & 0x80000000u) ? seeds[request] : state[slot];
    }
    __syncthreads();
    unsigned x = start + threadIdx.x + block * blockDim.x;
    for (unsigned i = 0; i < iters; ++i) {
        x = x * 1664525u + 1013904223u;
    }
    if (threadIdx.x == 0 && block == 0) {
        state[slot] = x;
        out[request] = x;
    }
}
"""


class _StepDevice:
    """
    The worker thread's CUDA state for decode steps (a ``StepDevice``):
    context, compiled kernel, per-slot chain state, and ``depth`` ring
    buffers of entries and results with one event each.
    """

    def __init__(self, ordinal: int, blocksPerRequest: int, block: int, depth: int, slots: int) -> None:
        import numpy
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule

        self.depth = depth
        self.slots = slots
        cuda.init()
        device = cuda.Device(ordinal)
        self.name = str(device.name())
        self._context = device.make_context(flags=cuda.ctx_flags.MAP_HOST)
        try:
            self._module = SourceModule(STEP_KERNEL_SOURCE)
            self._kernel = self._module.get_function("step_kernel")
            self._kernel.prepare("IIPPPP")
            self._stream = cuda.Stream()
            self._state = cuda.mem_alloc(4 * slots)
            mapped = cuda.host_alloc_flags.DEVICEMAP
            self._entries = cuda.pagelocked_zeros((depth, slots), numpy.uint32, mem_flags=mapped)
            self._out = cuda.pagelocked_zeros((depth, slots), numpy.uint32, mem_flags=mapped)
            self._seeds = cuda.pagelocked_zeros((depth, slots), numpy.uint32, mem_flags=mapped)
            self._entriesAddress = int(self._entries.base.get_device_pointer())
            self._seedsAddress = int(self._seeds.base.get_device_pointer())
            self._outAddress = int(self._out.base.get_device_pointer())
            self._stateAddress = int(self._state)
            self._events = [cuda.Event(cuda.event_flags.DISABLE_TIMING) for _ in range(depth)]
        except BaseException:
            self._context.pop()
            self._context.detach()
            raise
        self._blocksPerRequest = blocksPerRequest
        self._seeded = [False] * depth
        self._block = (block, 1, 1)
        self._rowBytes = 4 * slots
        # A step's arguments differ only by ring buffer (and iteration
        # count), so they are packed once per (ring, iters) and launched
        # through the Function's own launch method: PyCUDA's
        # prepared_async_call packs them anew on every call, the largest
        # Python cost of a step.  Where that method is missing (another
        # PyCUDA), prepared_async_call it is.
        self._launchKernel: Callable[..., None] | None = getattr(self._kernel, "_launch_kernel", None)
        self._packedArguments: dict[tuple[int, int], bytes] = {}
        try:
            from pycuda._pvt_struct import pack
        except ImportError:
            self._launchKernel = None
        else:
            self._pack = pack

    def _arguments(self, ring: int, iters: int) -> tuple[Any, ...]:
        offset = ring * self._rowBytes
        return (
            iters,
            self._blocksPerRequest,
            self._entriesAddress + offset,
            self._seedsAddress + offset,
            self._stateAddress,
            self._outAddress + offset,
        )

    def launchStep(self, ring: int, iters: int, entries: Sequence[int], seeds: Sequence[int] | None = None) -> None:
        count = len(entries)
        self._entries[ring, :count] = entries
        if seeds is not None:
            self._seeds[ring, :count] = seeds
            self._seeded[ring] = True
        elif self._seeded[ring]:  # FRESH entries without seeds start from 0, not a stale seed
            self._seeds[ring, :] = 0
            self._seeded[ring] = False
        grid = (self._blocksPerRequest * count, 1)
        if self._launchKernel is not None:
            packed = self._packedArguments.get((ring, iters))
            if packed is None:
                if len(self._packedArguments) >= 4 * self.depth:  # many iteration counts: keep it bounded
                    self._packedArguments.clear()
                packed = self._packedArguments[ring, iters] = self._pack(
                    self._kernel.arg_format, *self._arguments(ring, iters)
                )
            self._launchKernel(grid, self._block, packed, 0, self._stream)
        else:
            self._kernel.prepared_async_call(grid, self._block, self._stream, *self._arguments(ring, iters))
        self._events[ring].record(self._stream)

    def stepDone(self, ring: int) -> bool:
        return bool(self._events[ring].query())

    def waitStep(self, ring: int) -> None:
        # Blocks this worker only; PyCUDA lets go of the GIL meanwhile.
        self._events[ring].synchronize()

    def stepResults(self, ring: int, count: int) -> list[int]:
        return self._out[ring, :count].tolist()  # type: ignore[no-any-return]

    def close(self) -> None:
        # Free while the context is still current, or PyCUDA complains at
        # exit about objects outliving their context.
        self._stream.synchronize()
        self._state.free()
        for pinned in (self._entries, self._seeds, self._out):
            allocation = getattr(pinned, "base", None)
            if allocation is not None and hasattr(allocation, "free"):
                allocation.free()
        del self._entries, self._seeds, self._out, self._events, self._stream, self._kernel, self._module
        self._context.pop()
        self._context.detach()


class _OneToken:
    """A ``DecodeReceiver`` for ``spin``: a request of one token, as a Deferred."""

    def __init__(self) -> None:
        self.ticket: DecodeTicket | None = None
        self.deferred: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[int]) -> None:
        if self.ticket is not None:
            self.ticket.cancel()

    def tokensReady(self, values: list[int]) -> None:
        if not self.deferred.called:
            self.deferred.callback(values[-1])

    def decodeFailed(self, reason: str) -> None:
        if not self.deferred.called:
            self.deferred.errback(BackendError(reason))


class CUDAEngine:
    """
    Runs the toy's requests as decode steps on a worker thread that owns the GPU.

    ``admit`` (reactor thread only) puts a request into the continuous batch;
    its tokens come back to its ``DecodeReceiver`` on the reactor thread.
    ``spin`` is a request of one token, for callers that want one value.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        grid: int = DEFAULT_GRID,
        block: int = DEFAULT_BLOCK,
        device_name: str | None = None,
        ordinal: int = 0,
        depth: int = DEFAULT_DEPTH,
        slots: int = DEFAULT_SLOTS,
    ) -> None:
        self.grid = grid
        self.block = block
        self.depth = depth
        self.slots = slots
        self.description = (
            f"CUDA step_kernel, {grid} blocks of {block} threads per request, on "
            f"{device_name or f'CUDA device {ordinal}'} (PyCUDA, continuous batching: one launch per "
            f"decode step for up to {slots} requests, {depth} steps ahead)"
        )
        self.scheduler = DecodeScheduler(reactor)
        self._reactor = reactor
        self._ordinal = ordinal
        self._thread: threading.Thread | None = None
        self._ready = False
        self._error: str | None = None
        self._readyWaiters: list[Deferred[None]] = []
        self._stopping = False
        self._exited = False
        self._exitWaiters: list[Deferred[None]] = []

    @property
    def launches(self) -> int:
        """Kernels launched: one per decode step, whatever the number of requests in it."""
        return self.scheduler.steps

    # Lifecycle -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start the worker; fire when the kernel is compiled and the GPU ready.

        Fails with ``BackendError`` if the context or the kernel cannot be
        made; every request then fails the same way.
        """
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._work, name="cc50-cuda-worker", daemon=True)
            self._thread.start()
        if self._error is not None:
            return fail(BackendError(self._error))
        if self._ready:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._readyWaiters.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """End the worker, failing requests still in the batch; fire once it has exited."""
        self._stopping = True
        if self._thread is None or self._exited:
            return succeed(None)
        self.scheduler.stop()
        waiter: Deferred[None] = Deferred()
        self._exitWaiters.append(waiter)
        return waiter

    def admit(self, iters: int, tokens: int, receiver: DecodeReceiver) -> DecodeTicket:
        refusal = self._refusal()
        if refusal is None and self._thread is None:
            self.start()
        return self.scheduler.admit(iters, tokens, receiver, refusal)

    def _refusal(self) -> str | None:
        if self._stopping:
            return "the CUDA engine has stopped"
        return self.brokenReason

    @property
    def brokenReason(self) -> str | None:
        """Why the engine cannot take work (it did not start, or the device failed), or None."""
        return self._error or self.scheduler.brokenReason

    def spin(self, iters: int) -> Deferred[int]:
        """One token's value (a chain's first), for callers that want a single value: a request of one token."""
        receiver = _OneToken()
        receiver.ticket = self.admit(iters, 1, receiver)
        return receiver.deferred

    # On the reactor thread -------------------------------------------------

    def _started(self, error: str | None) -> None:
        self._ready = error is None
        self._error = error
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(BackendError(error))

    def _workerExited(self) -> None:
        self._exited = True
        waiters, self._exitWaiters = self._exitWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    # On the worker thread --------------------------------------------------

    def _work(self) -> None:
        call = self._reactor.callFromThread
        try:
            try:
                device = _StepDevice(self._ordinal, self.grid, self.block, self.depth, self.slots)
            except Exception as e:
                error = f"the CUDA engine could not start: {e}"
                call(self._started, error)
                self.scheduler.refuseAll(error)
                return
            call(self._started, None)
            try:
                self.scheduler.serve(device)
            finally:
                device.close()
        finally:
            call(self._workerExited)
