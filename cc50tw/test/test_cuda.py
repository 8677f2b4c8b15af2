"""
Tests for the toy backend's CUDA engine and for choosing between GPU and CPU.

The engine tests need a real GPU (PyCUDA, a driver, a device, nvcc) and are
skipped elsewhere with the reason the probe found; ``benchmarks/gpu/
run_on_gpu.sh`` runs them on the lent GPU machine.  The selection tests run
everywhere, because what a GPU-less machine does with ``--toy-device`` is
behaviour people rely on too.
"""

from __future__ import annotations

import time
from itertools import pairwise
from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial import unittest

from cc50tw.backends.cuda import (
    NO_DEVICE,
    CUDAEngine,
    CUDAProbe,
    CUDAUnavailable,
    probe_cuda,
    reason_from_import_error,
    reason_from_init_error,
    select_engine,
)
from cc50tw.backends.lcg import CPUEngine, spin_chain, spin_lane
from cc50tw.backends.toy import TOKEN_TEXT, BatchedToyStream, ToyBackend, build
from cc50tw.errors import BackendError
from cc50tw.interfaces import InferenceRequest
from cc50tw.tap import Options
from cc50tw.test.fakes import RecordingSink

reactor: Any = globalReactor

#: Asked once per test run: it compiles the kernel in a child process.
PROBE = probe_cuda()

NO_CUDA = None if PROBE.available else (NO_DEVICE if PROBE.reason == NO_DEVICE else f"{NO_DEVICE}: {PROBE.reason}")


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@inlineCallbacks
def waitFor(condition: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        yield sleep(0.002)


def toyOptions(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"toy-iters": 0, "toy-device": "auto", "toy-grid": 8, "toy-block": 256}
    options.update(overrides)
    return options


class CUDAEngineTests(unittest.TestCase):
    """The kernel on a real GPU, driven the way the toy backend drives it."""

    skip = NO_CUDA
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.engine = CUDAEngine(reactor, 8, 256, PROBE.device_name)
        self.addCleanup(self.engine.stop)
        yield self.engine.start()

    @inlineCallbacks
    def test_matchesCPUReference(self) -> Any:
        """Thread 0's final x is the CPU reference's, for no, one and the default iterations."""
        for iters in (0, 1, 20000):
            value = yield self.engine.spin(iters)
            self.assertEqual(value, spin_lane(iters), f"iters={iters}")

    @inlineCallbacks
    def test_otherLaunchShape(self) -> Any:
        """Grid and block change the work, not thread 0's answer."""
        engine = CUDAEngine(reactor, 3, 64, PROBE.device_name)
        self.addCleanup(engine.stop)
        yield engine.start()
        value = yield engine.spin(20000)
        self.assertEqual(value, spin_lane(20000))

    @inlineCallbacks
    def test_manyAtOnce(self) -> Any:
        """
        Requests queued together run together, one launch per step, past the
        engine's slots too; mixed iteration counts each get their own answer.
        """
        count = self.engine.slots + 44
        before = self.engine.launches
        values = yield gatherResults([self.engine.spin(20000) for _ in range(count)])
        self.assertEqual(values, [spin_lane(20000)] * count)
        self.assertLessEqual(self.engine.launches - before, 4)
        mixed = yield gatherResults([self.engine.spin(iters) for iters in range(50)])
        self.assertEqual(mixed, [spin_lane(iters) for iters in range(50)])

    @inlineCallbacks
    def test_chainsMatchTheCPUReference(self) -> Any:
        """
        Sixteen concurrent requests, each a chain on the device (every token
        from the last one's value), end on the CPU reference's last value.
        """
        backend = ToyBackend(reactor, self.engine, 20000)
        streams = []
        for n in range(16):
            stream = BatchedToyStream(backend, self.engine, InferenceRequest(n, "p", 64 + n), RecordingSink())
            stream.start()
            streams.append(stream)
        yield gatherResults([stream.done for stream in streams])
        for n, stream in enumerate(streams):
            self.assertEqual(stream.last_value, spin_chain(20000, 64 + n)[-1], f"request {n}")

    @inlineCallbacks
    def test_cancelledWorkIsNotLaunched(self) -> Any:
        blocker = self.engine.spin(200000)  # keeps the worker busy while the rest queue
        cancelled = [self.engine.spin(1) for _ in range(5)]
        kept = self.engine.spin(2)
        for work in cancelled:
            work.cancel()
        value = yield kept
        self.assertEqual(value, spin_lane(2))
        yield blocker
        for work in cancelled:
            yield self.assertFailure(work, CancelledError)

    @inlineCallbacks
    def test_pausedRequestsGiveTheirSlotsUp(self) -> Any:
        """
        On the GPU: with both slots held by paused requests a newcomer still
        runs, and the paused ones, resumed, go on from their last values on
        the device (seeded into whatever slot they get).
        """
        engine = CUDAEngine(reactor, 8, 256, PROBE.device_name, slots=2)
        self.addCleanup(engine.stop)
        yield engine.start()
        backend = ToyBackend(reactor, engine, 20000)
        pausedSinks = [RecordingSink(pauseEvery=5) for _ in range(2)]
        pausedStreams = [
            BatchedToyStream(backend, engine, InferenceRequest(n, "p", 40), sink) for n, sink in enumerate(pausedSinks)
        ]
        for stream in pausedStreams:
            stream.start()
        yield waitFor(lambda: all(sink.paused for sink in pausedSinks))
        newcomer = BatchedToyStream(backend, engine, InferenceRequest(9, "p", 30), RecordingSink())
        newcomer.start()
        yield newcomer.done
        self.assertEqual(newcomer.last_value, spin_chain(20000, 30)[-1])
        for sink in pausedSinks:
            sink.pauseEvery = 0
            sink.resume()
        yield gatherResults([stream.done for stream in pausedStreams])
        for stream in pausedStreams:
            self.assertEqual(stream.last_value, spin_chain(20000, 40)[-1])

    @inlineCallbacks
    def test_oneLaunchPerStep(self) -> Any:
        """Alone, a request takes one step per token; its tokens all reach the sink."""
        backend = ToyBackend(reactor, self.engine, 100)
        sink = RecordingSink()
        before = self.engine.launches
        result = yield backend.generate(InferenceRequest(1, "two words", 50), sink)
        self.assertEqual(self.engine.launches - before, 50)
        self.assertEqual(result.generated_tokens, 50)
        self.assertEqual("".join(sink.chunks), TOKEN_TEXT * 50)

    @inlineCallbacks
    def test_concurrentRequests(self) -> Any:
        """Two requests share the steps and both finish, each with all its tokens."""
        backend = ToyBackend(reactor, self.engine, 20000)
        sinks = [RecordingSink(), RecordingSink()]
        before = self.engine.launches
        results = yield gatherResults(
            [backend.generate(InferenceRequest(n, "p", 300), sink) for n, sink in enumerate(sinks)]
        )
        self.assertEqual([r.generated_tokens for r in results], [300, 300])
        self.assertEqual([len(s.chunks) for s in sinks], [300, 300])
        self.assertLess(self.engine.launches - before, 310)

    @inlineCallbacks
    def test_cancelStopsLaunches(self) -> Any:
        backend = ToyBackend(reactor, self.engine, 20000)
        generation = backend.generate(InferenceRequest(1, "p", 1_000_000), RecordingSink())
        yield waitFor(lambda: self.engine.launches >= 20)
        generation.cancel()
        yield self.assertFailure(generation, CancelledError)
        atCancel = self.engine.launches
        yield sleep(0.2)
        # Steps already enqueued when the request was cancelled may still run.
        self.assertLessEqual(self.engine.launches, atCancel + self.engine.depth)

    @inlineCallbacks
    def test_pauseStopsLaunches(self) -> Any:
        """Flow control reaches the GPU: a paused stream queues no launches."""
        backend = ToyBackend(reactor, self.engine, 20000)
        sink = RecordingSink()
        generation = backend.generate(InferenceRequest(1, "p", 1_000_000), sink)
        yield waitFor(lambda: self.engine.launches >= 10)
        producer = sink.producer
        assert producer is not None
        producer.pauseProducing()
        yield sleep(0.01)
        paused = self.engine.launches
        yield sleep(0.2)
        self.assertEqual(self.engine.launches, paused)
        producer.resumeProducing()
        yield waitFor(lambda: self.engine.launches >= paused + 10)
        generation.cancel()
        yield self.assertFailure(generation, CancelledError)

    @inlineCallbacks
    def test_reactorStaysResponsive(self) -> Any:
        """A LoopingCall keeps ticking on time through a 10,000-token request."""
        ticks: list[float] = []
        loop = LoopingCall(lambda: ticks.append(time.perf_counter()))
        loop.start(0.01)
        backend = ToyBackend(reactor, self.engine, 20000)
        try:
            result = yield backend.generate(InferenceRequest(1, "p", 10000), RecordingSink())
        finally:
            loop.stop()
        self.assertEqual(result.generated_tokens, 10000)
        gaps = [later - earlier for earlier, later in pairwise(ticks)]
        self.assertTrue(gaps, "the request finished before the LoopingCall ticked twice")
        self.assertLess(max(gaps), 0.5, f"longest gap between 10 ms ticks: {max(gaps) * 1e3:.1f} ms")

    @inlineCallbacks
    def test_stoppedEngineFailsWork(self) -> Any:
        yield self.engine.stop()
        yield self.assertFailure(self.engine.spin(1), BackendError)

    @inlineCallbacks
    def test_selectCUDA(self) -> Any:
        """--toy-device=cuda on a GPU machine gives the CUDA engine, named after the card."""
        engine = select_engine("cuda", reactor)
        assert isinstance(engine, CUDAEngine)
        self.addCleanup(engine.stop)
        self.assertIn(str(PROBE.device_name), engine.description)
        value = yield engine.spin(7)
        self.assertEqual(value, spin_lane(7))


def probeSaying(reason: str | None) -> Any:
    def probe(grid: int, block: int) -> CUDAProbe:
        return CUDAProbe(reason, None if reason else "Fake GPU")

    return probe


def probeNotExpected(grid: int, block: int) -> CUDAProbe:
    raise AssertionError("--toy-device=cpu must not probe for CUDA")


class SelectionTests(unittest.TestCase):
    """--toy-device on any machine: what is chosen, and what is said about it."""

    def test_reasonNoDriver(self) -> None:
        error = ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")
        self.assertEqual(reason_from_import_error(error), "libcuda.so.1 missing (no NVIDIA driver)")

    def test_reasonNoPyCUDA(self) -> None:
        error = ModuleNotFoundError("No module named 'pycuda'", name="pycuda")
        self.assertEqual(reason_from_import_error(error), "pycuda not installed")

    def test_reasonNoNumpy(self) -> None:
        error = ModuleNotFoundError("No module named 'numpy'", name="numpy")
        self.assertIn("numpy not installed", reason_from_import_error(error))

    def test_reasonNoDevice(self) -> None:
        # What pycuda._driver.RuntimeError says with a driver and no GPU.
        error = RuntimeError("cuInit failed: no CUDA-capable device is detected")
        self.assertEqual(reason_from_init_error(error), "no CUDA device")

    def test_reasonOtherInitFailure(self) -> None:
        error = RuntimeError("cuInit failed: unknown error")
        self.assertEqual(reason_from_init_error(error), "cuInit failed: cuInit failed: unknown error")

    def test_autoFallsBackWithOneLogLine(self) -> None:
        with capturedLogs() as events:
            engine = select_engine("auto", reactor, probe=probeSaying("no CUDA device"))
        self.assertIsInstance(engine, CPUEngine)
        said = [e for e in events if e.get("log_namespace") == "cc50tw.backends.cuda"]
        self.assertEqual(len(said), 1)
        self.assertEqual(said[0]["reason"], "no CUDA device")

    def test_cudaWithoutCUDARaises(self) -> None:
        error = self.assertRaises(
            CUDAUnavailable,
            select_engine,
            "cuda",
            reactor,
            probe=probeSaying("libcuda.so.1 missing (no NVIDIA driver)"),
        )
        self.assertIn("--toy-device=cuda", str(error))
        self.assertIn("libcuda.so.1 missing (no NVIDIA driver)", str(error))

    def test_autoWithNoWorkIsTheCPU(self) -> None:
        """--toy-iters=0 has nothing to offload: auto does not launch a kernel per token for it."""
        from cc50tw.backends import cuda, toy

        chosen: list[str] = []

        def choose(device: str, reactor: Any, grid: int, block: int) -> CPUEngine:
            chosen.append(device)
            return CPUEngine(reactor, reactor.getThreadPool())

        self.patch(cuda, "select_engine", choose)
        with capturedLogs() as events:
            toy.build(toyOptions(**{"toy-iters": 0}), reactor)
        self.assertIn("--toy-device=auto uses the CPU", " ".join(e.get("log_format", "") for e in events))
        toy.build(toyOptions(**{"toy-iters": 5}), reactor)
        toy.build(toyOptions(**{"toy-iters": 0, "toy-device": "cuda"}), reactor)
        self.assertEqual(chosen, ["cpu", "auto", "cuda"])

    def test_cpuDoesNotProbe(self) -> None:
        self.assertIsInstance(select_engine("cpu", reactor, probe=probeNotExpected), CPUEngine)

    def test_options(self) -> None:
        options = Options()
        options.parseOptions(["--toy-device=CPU", "--toy-grid=4", "--toy-block=128"])
        self.assertEqual((options["toy-device"], options["toy-grid"], options["toy-block"]), ("cpu", 4, 128))
        defaults = Options()
        defaults.parseOptions([])
        self.assertEqual((defaults["toy-device"], defaults["toy-grid"], defaults["toy-block"]), ("auto", 8, 256))

    def test_badOptions(self) -> None:
        for argument in ("--toy-device=gpu", "--toy-block=2048", "--toy-block=0", "--toy-grid=0", "--toy-grid=8388608"):
            self.assertRaises(usage.UsageError, Options().parseOptions, [argument])


class ThisMachineTests(unittest.TestCase):
    """The real probe's verdict on a machine without CUDA (this suite's CI)."""

    if PROBE.available:
        skip = "CUDA is available here"

    def test_autoPicksCPUAndSaysWhy(self) -> None:
        with capturedLogs() as events:
            backend = build(toyOptions(**{"toy-iters": 20000}), reactor)
        self.assertIsInstance(backend.engine, CPUEngine)
        said = [e for e in events if e.get("log_namespace") == "cc50tw.backends.cuda"]
        self.assertEqual([e["reason"] for e in said], [PROBE.reason])
        self.assertTrue(PROBE.reason)

    def test_cudaFailsTheServiceWithTheReason(self) -> None:
        """The backend is built while options are parsed: twistd turns this UsageError into a non-zero exit."""
        options = Options()
        error = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--toy-device=cuda", "--listen=tcp:0:interface=127.0.0.1"]
        )
        self.assertIn("--toy-device=cuda", str(error))
        self.assertIn(str(PROBE.reason), str(error))
