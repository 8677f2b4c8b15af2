"""
The toy backend's unit of work on an NVIDIA GPU, through PyCUDA.

``spin_kernel`` is the C++ original's kernel, launched once per token.  Two
constraints shape this module:

* The reactor thread must never wait on the GPU.  A CUDA context is current
  on one thread at a time, so the engine gives the GPU a thread of its own:
  that worker owns the context, launches the kernel, waits for it by copying
  the result back (which blocks only the worker), and hands the value to the
  reactor with ``callFromThread``.  Requests share the one worker through a
  FIFO queue, which is also the order one GPU queue would run them in; each
  toy stream has at most one token in that queue, so streams take turns.
  The worker launches every token waiting (one kernel each) before it waits
  once for all of them, so concurrent streams keep the GPU busy.

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
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

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

#: Most launches the worker queues before it waits for them.  Each token is
#: still one launch; taking every token already waiting (one per busy
#: stream) and waiting once for all of them keeps the GPU busy while Python
#: does the per-token bookkeeping, which is what many concurrent streams need.
MAX_BATCH = 256


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
) -> ToyEngine:
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


class _Job:
    """One token's launch, as queued for the worker."""

    __slots__ = ("iters", "deferred", "cancelled")

    def __init__(self, iters: int) -> None:
        self.iters = iters
        self.cancelled = False
        self.deferred: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[int]) -> None:
        # Read by the worker without a lock: at worst a job cancelled as it
        # is taken still runs, and its result is then dropped.
        self.cancelled = True


class _Device:
    """The worker thread's CUDA state: context, compiled kernel, result words."""

    def __init__(self, ordinal: int, grid: int, block: int) -> None:
        import numpy
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule

        self._cuda = cuda
        cuda.init()
        device = cuda.Device(ordinal)
        self.name = str(device.name())
        self._context = device.make_context()
        try:
            self._module = SourceModule(KERNEL_SOURCE)
            self._kernel = self._module.get_function("spin_kernel")
            self._kernel.prepare("IP")
            # One output word per launch of a batch, reused by every batch:
            # only the worker launches, and it reads a batch back before the
            # next one starts.
            self._out = cuda.mem_alloc(4 * MAX_BATCH)
            self._address = int(self._out)
            self._host = cuda.pagelocked_empty(MAX_BATCH, numpy.uint32)
        except BaseException:
            self._context.pop()
            self._context.detach()
            raise
        self._grid = (grid, 1)
        self._block = (block, 1, 1)

    def launch(self, iters: int, slot: int = 0) -> None:
        """Queue one launch (it returns before the kernel runs); its ``x`` goes to word ``slot``."""
        self._kernel.prepared_call(self._grid, self._block, iters, self._address + 4 * slot)

    def results(self, count: int) -> list[int]:
        """
        Thread 0's ``x`` of the last ``count`` launches, slots 0 to count - 1.

        The synchronous copy on the launches' stream is how the worker waits
        for them: it blocks this thread only, and returns once they are done.
        """
        host = self._host[:count]
        self._cuda.memcpy_dtoh(host, self._out)
        return [int(value) for value in host]

    def close(self) -> None:
        # Free while the context is still current, or PyCUDA complains at
        # exit about objects outliving their context.
        self._out.free()
        pinned = getattr(self._host, "base", None)
        if pinned is not None and hasattr(pinned, "free"):
            pinned.free()
        del self._host, self._kernel, self._module
        self._context.pop()
        self._context.detach()


class CUDAEngine:
    """
    Runs ``spin_kernel`` once per token on a worker thread that owns the GPU.

    ``spin`` may be called from the reactor thread only.  Cancelling the
    Deferred it returns drops the launch if it has not started yet; a result
    that arrives after cancellation is discarded.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        grid: int = DEFAULT_GRID,
        block: int = DEFAULT_BLOCK,
        device_name: str | None = None,
        ordinal: int = 0,
    ) -> None:
        self.grid = grid
        self.block = block
        self.description = (
            f"CUDA spin_kernel<<<{grid}, {block}>>> on {device_name or f'CUDA device {ordinal}'} "
            "(PyCUDA, one worker thread)"
        )
        #: Kernels launched; written by the worker thread only.
        self.launches = 0
        self._reactor = reactor
        self._ordinal = ordinal
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = False
        self._error: str | None = None
        self._readyWaiters: list[Deferred[None]] = []
        self._stopping = False
        self._exited = False
        self._exitWaiters: list[Deferred[None]] = []

    # Lifecycle -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start the worker; fire when the kernel is compiled and the GPU ready.

        Fails with ``BackendError`` if the context or the kernel cannot be
        made; every ``spin`` then fails the same way.
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
        """End the worker after the launches already queued; fire once it has exited."""
        if self._thread is None or self._exited:
            return succeed(None)
        if not self._stopping:
            self._stopping = True
            self._jobs.put(None)
        waiter: Deferred[None] = Deferred()
        self._exitWaiters.append(waiter)
        return waiter

    def spinNow(self, iters: int) -> int | None:
        return None  # every token is a kernel launch, observed asynchronously

    def spin(self, iters: int) -> Deferred[int]:
        if self._stopping:
            return fail(BackendError("the CUDA engine has stopped"))
        if self._error is not None:
            return fail(BackendError(self._error))
        if self._thread is None:
            self.start()
        job = _Job(iters)
        self._jobs.put(job)
        return job.deferred

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

    def _deliver(self, done: list[tuple[_Job, int]]) -> None:
        for job, value in done:
            if not job.deferred.called:
                job.deferred.callback(value)

    def _fail(self, jobs: list[_Job], failure: Failure) -> None:
        for job in jobs:
            if not job.deferred.called:
                job.deferred.errback(failure)

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
                device = _Device(self._ordinal, self.grid, self.block)
            except Exception as e:
                error = f"the CUDA engine could not start: {e}"
                call(self._started, error)
                self._serve(None, error)
                return
            call(self._started, None)
            try:
                self._serve(device, None)
            finally:
                device.close()
        finally:
            call(self._workerExited)

    def _take(self) -> tuple[list[_Job], bool]:
        """Wait for work; return every job waiting (up to a batch), and whether to stop after them."""
        taken = [self._jobs.get()]
        while len(taken) < MAX_BATCH:
            try:
                taken.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        # Nothing is queued after the stop sentinel: spin() refuses work once stopping.
        return [job for job in taken if job is not None and not job.cancelled], None in taken

    def _serve(self, device: _Device | None, error: str | None) -> None:
        call = self._reactor.callFromThread
        while True:
            jobs, stop = self._take()
            if jobs and device is None:
                call(self._fail, jobs, Failure(BackendError(error or "the CUDA engine is not running")))
            elif jobs and device is not None:
                try:
                    for slot, job in enumerate(jobs):
                        device.launch(job.iters, slot)
                        self.launches += 1
                    values = device.results(len(jobs))
                except Exception as e:
                    call(self._fail, jobs, Failure(BackendError(f"CUDA launch failed: {e}")))
                else:
                    call(self._deliver, list(zip(jobs, values, strict=True)))
            if stop:
                return
